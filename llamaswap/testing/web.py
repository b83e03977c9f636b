# -*- test-case-name: tests.test_relay,tests.test_resources -*-
"""
Fakes for the web layer's unit tests: a supervisor handing out leases, an
upstream that records what it was sent, and an HTTP client that talks to our
L{LlamaSwapSite} over a L{StringTransport} (so tests see raw bytes, can pause
the connection, and can disconnect at any moment).
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import Request

from llamaswap.config import Config, parse_config
from llamaswap.errors import ProxyError
from llamaswap.events import EventBus
from llamaswap.names import LocalTarget, Resolver
from llamaswap.process.states import State
from llamaswap.scheduling import QueueStats
from llamaswap.supervisor import Lease, ModelStatus
from llamaswap.web.site import LlamaSwapSite

CONFIG = """
models:
  alpha:
    cmd: fake --name alpha
    proxy: http://127.0.0.1:9001
    aliases: [a1, a2]
    name: Alpha
    description: the first
    metadata: {family: test, size: 7}
  beta:
    cmd: fake --name beta
    proxy: http://127.0.0.1:9002
    useModelName: beta-upstream
  author/model:
    cmd: fake --name am
    proxy: http://127.0.0.1:9003
  author:
    cmd: fake --name author
    proxy: http://127.0.0.1:9004
  hidden:
    cmd: fake --name hidden
    proxy: http://127.0.0.1:9005
    unlisted: true
profiles:
  duo: [alpha, beta]
"""


def make_config(text: str = CONFIG, **changes: Any) -> Config:
    """The test configuration (with C{attrs.evolve}-style changes)."""
    import attrs

    return attrs.evolve(parse_config(text), **changes)


class FakeSupervisor:
    """
    Hands out real L{Lease}s at once, or holds them (C{hold=True}) until the
    test calls L{grant}; C{error} makes every acquire fail with it. What its
    statuses show is the test's to set: C{states}, C{queued} and
    C{oldest_wait} by model id; C{stats} is what C{/metrics} reads.
    """

    def __init__(self, config: Config) -> None:
        self.config = config
        self.hold = False
        self.error: ProxyError | None = None
        self.acquired: list[str] = []
        self.released: list[str] = []
        self.cancelled: list[str] = []
        self.unloaded: list[str | None] = []
        self.states: dict[str, str] = {}
        self.queued: dict[str, int] = {}
        self.oldest_wait: dict[str, float] = {}
        self.reasons: dict[str, str] = {}  # why each stopping model stops
        self.stats = QueueStats()
        self.waiting: list[tuple[Deferred[Lease], Lease]] = []
        # When a list: leases report refused connections here (Lease.connection_refused),
        # one pending Deferred each, for the test to fire.
        self.refusals: list[Deferred[None]] | None = None
        # What position() answers for a held acquire: (ahead, queued), as the test sets it.
        self.place: tuple[int, int] | None = None

    def acquire(self, target: LocalTarget, *, api_key: Any = None) -> Deferred[Lease]:
        requested = target.requested
        self.acquired.append(requested)
        if self.error is not None:
            return fail(self.error)
        model = self.config.models[target.model_id]
        lease = Lease(
            model,
            target,
            lambda: self.released.append(model.id),
            None if self.refusals is None else self._refused,
        )
        if not self.hold:
            return succeed(lease)
        d: Deferred[Lease] = Deferred(lambda _: self.cancelled.append(requested))
        self.waiting.append((d, lease))
        return d

    def position(self, acquired: Deferred[Lease]) -> tuple[int, int] | None:
        held = any(d is acquired for d, _ in self.waiting)
        return self.place if held and not acquired.called else None

    def _refused(self) -> Deferred[None]:
        assert self.refusals is not None
        d: Deferred[None] = Deferred()
        self.refusals.append(d)
        return d

    def grant(self) -> None:
        """Fire every held acquire."""
        waiting, self.waiting = self.waiting, []
        for d, lease in waiting:
            if not d.called:
                d.callback(lease)

    def unload(self, model_id: str | None = None) -> Deferred[None]:
        if model_id is not None:
            try:
                model_id = Resolver(self.config).local(model_id).model_id
            except ProxyError as e:
                return fail(e)
        self.unloaded.append(model_id)
        return succeed(None)

    def status(self, model_id: str) -> ModelStatus:
        return ModelStatus(
            model_id=model_id,
            state=State(self.states.get(model_id, "stopped")),
            pid=4242 if model_id in self.states else None,
            in_flight=0,
            ttl=self.config.models[model_id].ttl,
            ttl_remaining=None,
            last_error=None,
            queued=self.queued.get(model_id, 0),
            oldest_wait=self.oldest_wait.get(model_id),
            stop_reason=self.reasons.get(model_id),
        )

    def statuses(self) -> list[ModelStatus]:
        return [self.status(m) for m in self.config.models]

    def memory_summary(self) -> dict[str, Any] | None:
        return None


class RecordingUpstream(Resource):
    """
    A model server for StubTreq: records each request and answers JSON
    C{{"method", "uri", "body", "headers"}} (or C{status}/C{answer} if set).
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[dict[str, Any]] = []
        self.status = 200
        self.answer: bytes | None = None
        self.content_type = b"application/json"

    def render(self, request: Request) -> bytes:
        assert request.content is not None
        body = request.content.read()
        seen = {
            "method": request.method.decode(),
            "uri": request.uri.decode(),
            "body": body.decode("utf-8", "replace"),
            "headers": {
                k.decode().lower(): [v.decode() for v in vs]
                for k, vs in request.requestHeaders.getAllRawHeaders()
            },
        }
        self.requests.append(seen)
        request.setResponseCode(self.status)
        request.setHeader(b"Content-Type", self.content_type)
        request.setHeader(b"X-Upstream", b"yes")
        if self.answer is not None:
            return self.answer
        return json.dumps(seen).encode()


class Response:
    """A response parsed from the raw bytes our site wrote."""

    def __init__(self, raw: bytes) -> None:
        head, sep, rest = raw.partition(b"\r\n\r\n")
        self.complete_head = bool(sep)
        lines = head.split(b"\r\n")
        status_line = lines[0].split(b" ", 2)
        self.status = int(status_line[1]) if len(status_line) > 1 else 0
        self.headers: dict[str, list[str]] = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            self.headers.setdefault(name.decode().lower(), []).append(value.strip().decode())
        self.chunked = self.header("transfer-encoding") == "chunked"
        self.body, self.complete = self._body(rest)

    def header(self, name: str) -> str | None:
        values = self.headers.get(name.lower())
        return values[0] if values else None

    def _body(self, rest: bytes) -> tuple[bytes, bool]:
        if not self.chunked:
            length = self.header("content-length")
            if length is None:
                return rest, False
            return rest[: int(length)], len(rest) >= int(length)
        out = b""
        while True:
            size_line, sep, rest = rest.partition(b"\r\n")
            if not sep:
                return out, False
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                return out, True
            if len(rest) < size + 2:
                return out + rest[:size], False
            out += rest[:size]
            rest = rest[size + 2 :]

    def json(self) -> Any:
        return json.loads(self.body)


class Exchange:
    """One client connection to the site: send bytes, read what came back."""

    def __init__(self, site: LlamaSwapSite, peer: str = "10.1.2.3") -> None:
        self.channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 8080))
        self.transport = StringTransport(
            hostAddress=IPv4Address("TCP", "127.0.0.1", 8080),
            peerAddress=IPv4Address("TCP", peer, 40000),
        )
        assert self.channel is not None
        self.channel.makeConnection(self.transport)

    def send(self, data: bytes) -> None:
        self.channel.dataReceived(data)

    def response(self) -> Response:
        return Response(self.transport.value())

    def disconnect(self) -> None:
        from twisted.internet.error import ConnectionDone

        self.channel.connectionLost(Failure(ConnectionDone()))

    @property
    def closed(self) -> bool:
        return bool(self.transport.disconnecting)


class SiteClient:
    """Drives a L{LlamaSwapSite} serving C{root} with raw HTTP/1.1 requests."""

    def __init__(
        self,
        root: Resource,
        *,
        max_body_size: int = 1024 * 1024,
        events: EventBus | None = None,
        clock: Clock | None = None,
        log_requests: bool = False,
        peer: str = "10.1.2.3",
    ) -> None:
        """C{peer}: the clients' address (another machine's, unless a test says otherwise)."""
        self.peer = peer
        self.clock = clock if clock is not None else Clock()
        self.site = LlamaSwapSite(
            root,
            max_body_size=max_body_size,
            events=events,
            reactor=self.clock,
            log_requests=log_requests,
        )

    def open(self) -> Exchange:
        return Exchange(self.site, self.peer)

    def start(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Exchange:
        """Send one request; return the exchange (to read, pause or disconnect)."""
        exchange = self.open()
        lines = [f"{method} {path} HTTP/1.1", "Host: localhost:8080"]
        for name, value in (headers or {}).items():
            lines.append(f"{name}: {value}")
        if body is not None:
            lines.append(f"Content-Length: {len(body)}")
        exchange.send("\r\n".join(lines).encode() + b"\r\n\r\n" + (body or b""))
        return exchange

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Response:
        return self.start(method, path, body, headers).response()


def post_json(client: SiteClient, path: str, obj: Any, **headers: str) -> Response:
    body = json.dumps(obj).encode()
    return client.request("POST", path, body, {"Content-Type": "application/json", **headers})


def events_of(bus: EventBus, kind: str) -> list[dict[str, Any]]:
    """Subscribe to C{bus}; the returned list fills with C{kind} events."""
    seen: list[dict[str, Any]] = []
    bus.subscribe(lambda k, data: seen.append(data) if k == kind else None)
    return seen
