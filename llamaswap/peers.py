# -*- test-case-name: tests.test_resources -*-
"""
Peers: models served by another server, relayed to without a local process.

A peer's model goes through the same relay as a local one (streaming,
backpressure, cancellation, errors); only the lease differs: L{PeerLease} is
granted at once, starts nothing and releases nothing, and the request's
credentials are the peer's own C{apiKey}, never the client's.
"""

from __future__ import annotations

from twisted.web.http_headers import Headers

from llamaswap.config import ModelConfig
from llamaswap.names import PeerTarget
from llamaswap.supervisor import Lease

# The client's credentials are for us (or for nobody): never passed on to a peer.
CREDENTIAL_HEADERS = (b"authorization", b"x-api-key")


def _nothing() -> None:
    pass


class PeerLease(Lease):
    """
    A L{Lease} on a peer's model. Its C{model} describes the peer as the relay
    needs it: the qualified name as C{id}, the peer's URL, the peer's filters.
    """

    def __init__(self, target: PeerTarget) -> None:
        peer = target.peer
        model = ModelConfig(
            id=target.fqn,
            cmd=(),
            cmd_line="",
            proxy=peer.proxy,
            check_endpoint=None,
            filters=peer.filters,
            reuse_connections=peer.reuse_connections,
        )
        super().__init__(model, target, _nothing)
        self.peer = peer

    def authorize(self, headers: Headers) -> None:
        """Replace the client's credentials in C{headers} by the peer's C{apiKey}, if any."""
        for name in CREDENTIAL_HEADERS:
            headers.removeHeader(name)
        key = self.peer.api_key
        if key is not None:
            headers.setRawHeaders(b"Authorization", [b"Bearer " + key.encode("utf-8")])
            headers.setRawHeaders(b"x-api-key", [key.encode("utf-8")])
