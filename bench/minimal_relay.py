#!/usr/bin/env python3
"""
The smallest useful Twisted reverse proxy: a reference point for the benchmark.

It does what llamaswap's relay does on the hot path and nothing else: read the
body, send it to one fixed upstream over a persistent-connection pool, copy
the status and headers, and stream the body back. No routing, no JSON, no
model, no logging, no backpressure. Whatever it costs is the floor that
twisted.web + Agent put under any relay written on them, on this machine.

    python bench/minimal_relay.py --port 8081 --upstream http://127.0.0.1:8080
"""

from __future__ import annotations

import argparse
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

reactor: Any = _reactor
SKIP = {b"connection", b"keep-alive", b"transfer-encoding", b"content-length", b"host"}


class BytesProducer:
    """An IBodyProducer for bytes already in memory."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.length = len(body)

    def startProducing(self, consumer: Any) -> Deferred[None]:
        consumer.write(self.body)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class Copy(Protocol):
    def __init__(self, request: Request) -> None:
        self.request = request

    def dataReceived(self, data: bytes) -> None:
        self.request.write(data)

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:  # noqa: B008
        self.request.finish()


class Relay(Resource):
    isLeaf = True

    def __init__(self, agent: Agent, upstream: bytes) -> None:
        super().__init__()
        self.agent = agent
        self.upstream = upstream

    def render(self, request: Request) -> Any:  # type: ignore[override]
        assert request.content is not None
        body = request.content.read()
        headers = Headers()
        for name, values in request.requestHeaders.getAllRawHeaders():
            if name.lower() not in SKIP:
                headers.setRawHeaders(name, values)
        url = self.upstream + request.uri
        d = self.agent.request(request.method, url, headers, BytesProducer(body))

        def respond(response: IResponse) -> None:
            request.setResponseCode(response.code)
            for name, values in response.headers.getAllRawHeaders():
                if name.lower() not in SKIP:
                    request.responseHeaders.setRawHeaders(name, values)
            response.deliverBody(Copy(request))

        def failed(f: Failure) -> None:
            request.setResponseCode(502)
            request.finish()

        d.addCallbacks(respond, failed)
        return NOT_DONE_YET


class CachingEndpointFactory:
    """Agent's standard endpoint factory, one endpoint per (scheme, host, port)."""

    def __init__(self, agent: Agent) -> None:
        self._standard = agent._endpointFactory  # type: ignore[attr-defined]
        self._cache: dict[tuple[bytes, bytes, int], Any] = {}

    def endpointForURI(self, uri: Any) -> Any:
        key = (uri.scheme, uri.host, uri.port)
        endpoint = self._cache.get(key)
        if endpoint is None:
            endpoint = self._cache[key] = self._standard.endpointForURI(uri)
        return endpoint


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--upstream", required=True)
    p.add_argument("--raw-body", action="store_true", help="skip twisted.web's form parsing")
    p.add_argument("--cache-endpoints", action="store_true", help="one endpoint per upstream")
    args = p.parse_args()
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = 64
    agent = Agent(reactor, pool=pool)
    if args.cache_endpoints:
        agent = Agent.usingEndpointFactory(reactor, CachingEndpointFactory(agent), pool=pool)
    relay = Relay(agent, args.upstream.rstrip("/").encode())
    # Twisted parses form and multipart POST bodies into request.args by default,
    # through the email package: ~80 us per request for a Content-Type header alone.
    site = Site(relay, parsePOSTFormSubmission=not args.raw_body)
    site.noisy = False
    site.log = lambda request: None  # type: ignore[method-assign]  # no access log
    reactor.listenTCP(args.port, site, interface="127.0.0.1", backlog=1024)
    reactor.run()


if __name__ == "__main__":
    main()
