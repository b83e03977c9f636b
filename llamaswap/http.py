# -*- test-case-name: tests.test_relay -*-
"""
The one way we build HTTP clients to upstream servers.

Each user (relay, health checks) gets its own explicitly built pool, closed in
its owner's C{stopService}; treq's global pool would leave the reactor dirty in
tests and could bind to a different reactor.
"""

from __future__ import annotations

from http.cookiejar import DefaultCookiePolicy
from typing import Any

from treq.client import HTTPClient
from treq.cookies import IndexableCookieJar
from twisted.web.client import Agent, HTTPConnectionPool, _HTTP11ClientFactory


class _QuietClientFactory(_HTTP11ClientFactory):
    # The default factory logs "Starting/Stopping factory" for every upstream
    # connection (each health poll!), flooding the proxy log.
    noisy = False


def make_http(
    reactor: Any, *, persistent: bool = True, connect_timeout: float = 5.0
) -> tuple[HTTPClient, HTTPConnectionPool]:
    """Return a treq client and the pool to close when done."""
    pool = HTTPConnectionPool(reactor, persistent=persistent)  # type: ignore[no-untyped-call]
    pool._factory = _QuietClientFactory
    pool.maxPersistentPerHost = 16  # idle sockets kept per upstream; not a concurrency cap
    # llama-server (cpp-httplib) closes idle keep-alive sockets after 5 s: stay below.
    pool.cachedConnectionTimeout = 2
    pool.retryAutomatically = True  # idempotent methods only
    agent = Agent(reactor, connectTimeout=connect_timeout, pool=pool)  # type: ignore[no-untyped-call]
    # treq's client keeps one cookie jar for all traffic: a cookie set in one
    # user's answer would ride along on everybody's next request. Store none.
    no_cookies = IndexableCookieJar(DefaultCookiePolicy(allowed_domains=[]))
    return HTTPClient(agent, cookiejar=no_cookies), pool
