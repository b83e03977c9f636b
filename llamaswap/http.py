# -*- test-case-name: tests.test_http,tests.test_relay -*-
"""
The one way we build HTTP clients to upstream servers.

Each user (relay, health checks) gets its own explicitly built pool, closed in
its owner's C{stopService}; treq's global pool would leave the reactor dirty in
tests and could bind to a different reactor.
"""

from __future__ import annotations

import re
from http.cookiejar import DefaultCookiePolicy
from typing import Any

from hyperlink import EncodedURL
from treq.client import HTTPClient
from treq.cookies import IndexableCookieJar
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import IAddress, IConsumer
from twisted.web.client import (
    URI,
    Agent,
    HTTPConnectionPool,
    RequestTransmissionFailed,
    ResponseNeverReceived,
)
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

from llamaswap._twisted import (
    HookedConnectionPool,
    HTTP11ClientFactory,
    HTTP11ClientProtocol,
    ReplayingConnection,
    RequestNotSent,
    quiescent_callback,
    standard_endpoint_factory,
)

# Bytes read from an upstream socket per reactor turn (Twisted's default is 64 KiB).
# Each turn costs two syscalls and their Python; a 20 MB answer read 256 KiB at a
# time takes about 40 % less CPU per MB (docs/performance.md, S3).
UPSTREAM_READ_SIZE = 256 * 1024


class _UpstreamProtocol(HTTP11ClientProtocol):
    def connectionMade(self) -> None:
        super().connectionMade()
        transport: Any = self.transport
        transport.bufferSize = UPSTREAM_READ_SIZE  # tcp.Connection: the recv() size


class _QuietClientFactory(HTTP11ClientFactory):
    # The default factory logs "Starting/Stopping factory" for every upstream
    # connection (each health poll!), flooding the proxy log.
    noisy = False

    def buildProtocol(self, addr: IAddress | None) -> HTTP11ClientProtocol:
        return _UpstreamProtocol(quiescent_callback(self))  # type: ignore[no-untyped-call]


@implementer(IBodyProducer)
class _BytesProducer:
    """
    A request body already in memory, written in one go. treq's default wraps
    bytes in a FileBodyProducer, which hands them over on a later Cooperator
    tick: one more reactor turn per proxied request.
    """

    def __init__(self, body: bytes) -> None:
        self._body = body
        self.length = len(body)

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        consumer.write(self._body)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


def _body_producer(data: Any) -> IBodyProducer:
    if isinstance(data, bytes):
        return _BytesProducer(data)
    producer: IBodyProducer = IBodyProducer(data)  # treq's default: files and producers
    return producer


class _ReplayOnFreshConnection(ReplayingConnection):
    """
    A reused connection that sends its request again, once, on a new one when
    it fails before any response byte arrived.

    A server may close an idle keep-alive socket at any moment (llama-server
    closes after every streamed answer without saying so, and after 5 s idle):
    a request written into that socket dies with nothing received. Twisted
    retries that for idempotent methods without a body only; our bodies are
    in memory (L{_BytesProducer}) and can be written again, and no byte of
    the answer can have reached the client yet, so every method is safe to
    replay. A fresh connection is never retried (L{HTTPConnectionPool} wraps
    only cached ones): its failure is the server's real answer.
    """

    def should_replay(self, method: bytes, exception: Exception, body_producer: Any) -> bool:
        if not isinstance(
            exception, (RequestNotSent, RequestTransmissionFailed, ResponseNeverReceived)
        ):
            return False
        if any(f.check(CancelledError) for f in getattr(exception, "reasons", ())):
            return False  # the client left: nothing to retry for
        return body_producer is None or isinstance(body_producer, _BytesProducer)


class _Waits:
    """
    Per upstream: requests sent on new connections and not answered yet (no
    status line and headers), and how many kept connections were closed to
    free a server thread for them: at most one each.
    """

    __slots__ = ("freed", "unanswered")

    def __init__(self) -> None:
        self.unanswered = 0
        self.freed = 0

    def answered(self, result: Any) -> Any:
        self.unanswered -= 1
        self.freed = min(self.freed, self.unanswered)
        return result

    def free_one(self) -> bool:
        """Whether a connection that just finished should be closed for a waiting request."""
        if self.unanswered > self.freed:
            self.freed += 1
            return True
        return False


class _Counted:
    """A new connection whose request counts in its upstream's L{_Waits} until answered."""

    def __init__(self, connection: Any, waits: _Waits) -> None:
        self._connection = connection
        self._waits = waits

    def request(self, request: Any) -> Deferred[Any]:
        self._waits.unanswered += 1
        answer: Deferred[Any] = self._connection.request(request)
        return answer.addBoth(self._waits.answered)


class _UpstreamPool(HookedConnectionPool):
    """
    Keep-alive that never holds a server's worker while a request waits for one.

    llama-server (cpp-httplib) ties one of its few HTTP threads to each open
    connection, idle or not, until the client closes it or 5 s pass; new
    connections wait unread meanwhile (docs/llama-server.md). So a connection
    that finishes while a request sent on a new connection to the same server
    still waits for its answer is closed instead of kept: its thread may be
    the one that request needs. One such close per waiting request, no more:
    closing every finished connection while any new one waits would make a
    busy server's clients open a connection per request (each close makes the
    next request open a new one, which makes the next finished one close).
    Otherwise connections are kept and reused, and requests one after
    another share one.

    Reused connections replay a request that dies unanswered
    (L{_ReplayOnFreshConnection}).
    """

    def __init__(self, reactor: Any, persistent: bool = True) -> None:
        super().__init__(reactor, persistent)  # type: ignore[no-untyped-call]
        self._waits: dict[Any, _Waits] = {}

    def getConnection(self, key: Any, endpoint: Any) -> Deferred[Any]:
        # HTTPConnectionPool.getConnection, with our replaying wrapper in place
        # of Twisted's (which it names directly), and the counting wrapper.
        cached = self.take_idle(key)
        if cached is not None:
            replay = _ReplayOnFreshConnection(cached, lambda: self.new_connection(key, endpoint))
            return succeed(replay)  # the server serves it already: not counted
        connection = self.new_connection(key, endpoint)
        if not self.persistent:
            return connection  # closed after each answer anyway: nothing to count
        # Only a new connection may wait unread for a server thread.
        waits = self._waits.get(key)
        if waits is None:
            waits = self._waits[key] = _Waits()
        return connection.addCallback(_Counted, waits)

    def put_connection(self, key: Any, connection: Any) -> None:
        waits = self._waits.get(key)
        if waits is not None and waits.free_one():
            connection.transport.loseConnection()
            return
        self.keep_connection(key, connection)


class _CachedEndpoints:
    """
    Agent's standard endpoint factory, remembered per (scheme, host, port).

    Agent builds a new endpoint for every request, IDNA-encoding the host each
    time, even when the pool then hands out an idle connection: about 9 % of
    the instructions of a small proxied request (docs/performance.md). And a
    HostnameEndpoint resolves even C{127.0.0.1} through getaddrinfo in the
    reactor's thread pool, for each new connection; plain HTTP to an IP
    address (the usual C{proxy: http://127.0.0.1:PORT}) connects directly.
    """

    def __init__(self, reactor: Any, standard: Any, connect_timeout: float) -> None:
        self._reactor = reactor
        self._standard = standard
        self._timeout = connect_timeout
        self._endpoints: dict[tuple[bytes, bytes, int], Any] = {}

    def endpointForURI(self, uri: URI) -> Any:
        key = (uri.scheme, uri.host, uri.port)
        endpoint = self._endpoints.get(key)
        if endpoint is None:
            endpoint = self._endpoints[key] = self._build(uri)
        return endpoint

    def _build(self, uri: URI) -> Any:
        host = uri.host.decode("ascii", "replace")
        if uri.scheme == b"http" and isIPAddress(host):
            return TCP4ClientEndpoint(self._reactor, host, uri.port, timeout=self._timeout)
        if uri.scheme == b"http" and isIPv6Address(host):
            return TCP6ClientEndpoint(  # type: ignore[no-untyped-call]
                self._reactor, host, uri.port, timeout=self._timeout
            )
        return self._standard.endpointForURI(uri)


# Path and query characters that hyperlink's to_uri() leaves as they are (checked
# by exhaustive and random round trips): one "?" and a non-empty query at most.
_URI_CHAR = rb"[!$%&'()*+,\-./0-9:;=@A-Z_a-z~]"
_ORIGIN_AND_REST = re.compile(
    rb"([a-z][a-z0-9+.\-]*://[^/?#]+)(/%s*(?:\?%s+)?)" % (_URI_CHAR, _URI_CHAR)
)


class _ReadyURL(EncodedURL):
    """
    A URL whose text is already what treq would send: C{to_uri()} is itself.

    treq turns every URL into C{EncodedURL.from_text(url).to_uri().to_text()},
    which IDNA-encodes the host on each call: ~10 % of the instructions of a
    small proxied request (docs/performance.md). treq reads nothing else of it
    when no C{params} or C{cookies} are given. URL's constructor is skipped
    on purpose: nothing reads the parsed parts.
    """

    def __init__(self, text: str) -> None:
        self._ready_text = text

    def to_uri(self) -> _ReadyURL:
        return self

    def to_text(self, with_password: bool = False) -> str:
        return self._ready_text


class _UpstreamClient(HTTPClient):
    """treq's client, with a fast path for URLs hyperlink would not change."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._plain_origins: dict[bytes, bool] = {}

    def request(self, method: str, url: Any, **kwargs: Any) -> Any:
        if isinstance(url, bytes) and not kwargs.get("params") and not kwargs.get("cookies"):
            ready = self._ready(url)
            if ready is not None:
                url = ready
        return super().request(method, url, **kwargs)

    def _ready(self, url: bytes) -> _ReadyURL | None:
        match = _ORIGIN_AND_REST.fullmatch(url)
        if match is None:
            return None
        origin = match.group(1)
        plain = self._plain_origins.get(origin)
        if plain is None:
            # The origin as hyperlink would send it (case, IDNA, default port, userinfo).
            text = origin.decode("ascii") + "/"
            try:
                plain = EncodedURL.from_text(text).to_uri().to_text() == text
            except ValueError:  # what treq would raise: it still will
                plain = False
            self._plain_origins[origin] = plain
        return _ReadyURL(url.decode("ascii")) if plain else None


class _NoCookies(IndexableCookieJar):
    """
    A jar that never stores a cookie, and skips the work of trying: treq wraps
    every request in a CookieAgent that asks the jar for a Cookie header and
    hands it every response's Set-Cookie (cookiejar's locking, parsing, expiry).
    """

    def add_cookie_header(self, request: Any) -> None:
        pass  # the jar is always empty

    def extract_cookies(self, response: Any, request: Any) -> None:
        pass  # the policy refuses every cookie anyway


def make_http(
    reactor: Any, *, persistent: bool = True, connect_timeout: float = 5.0
) -> tuple[HTTPClient, HTTPConnectionPool]:
    """
    Return a treq client and the pool to close when done.

    C{persistent}: keep connections open between requests while requests to
    the same server do not overlap (L{_UpstreamPool}), and replay a request
    that fails on a reused one before any answer (once, on a fresh
    connection). Without it, every request has a connection of its own, sent
    with C{Connection: close} (C{reuseConnections: false}).
    """
    pool = _UpstreamPool(reactor, persistent=persistent)
    pool.use_protocol_factory(_QuietClientFactory)
    pool.maxPersistentPerHost = 16  # idle sockets kept per upstream; not a concurrency cap
    # llama-server (cpp-httplib) closes idle keep-alive sockets after 5 s: stay below.
    pool.cachedConnectionTimeout = 2
    standard = Agent(reactor, connectTimeout=connect_timeout, pool=pool)  # type: ignore[no-untyped-call]
    agent = Agent.usingEndpointFactory(  # type: ignore[no-untyped-call]
        reactor,
        _CachedEndpoints(reactor, standard_endpoint_factory(standard), connect_timeout),
        pool=pool,
    )
    # treq's client keeps one cookie jar for all traffic: a cookie set in one
    # user's answer would ride along on everybody's next request. Store none.
    no_cookies = _NoCookies(DefaultCookiePolicy(allowed_domains=[]))
    client = _UpstreamClient(agent, cookiejar=no_cookies, data_to_body_producer=_body_producer)
    return client, pool
