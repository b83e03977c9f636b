# -*- test-case-name: tests.test_fakeserver -*-
"""
The fake server's resource tree: every API's L{Routes.table} joined under one
root that brands, counts and logs each request, with a JSON 404 for every
path no table names (never Twisted's HTML page).
"""

from __future__ import annotations

from twisted.web.resource import IResource, Resource
from twisted.web.server import Request

from llamaswap.testing.fakeserver.anthropic import AnthropicRoutes
from llamaswap.testing.fakeserver.base import Endpoint, RenderResult, error_response
from llamaswap.testing.fakeserver.openai import OpenAIRoutes
from llamaswap.testing.fakeserver.probes import ProbeRoutes
from llamaswap.testing.fakeserver.server import FakeServer


class _NotFound(Resource):
    isLeaf = True

    def __init__(self, name: str) -> None:
        super().__init__()
        self._name = name

    def render(self, request: Request) -> bytes:
        path = request.path.decode("utf-8", "replace")
        return error_response(request, 404, f"no route for {path}", "not_found_error", self._name)


class _Node(Resource):
    """An inner node: unknown children get a JSON 404, never Twisted's HTML page."""

    def __init__(self, name: str, here: Endpoint | None = None) -> None:
        super().__init__()
        self._name = name
        self.here = here

    def getChild(self, path: bytes, request: Request) -> IResource:
        return _NotFound(self._name)

    def render(self, request: Request) -> RenderResult:
        if self.here is not None:
            return self.here.render(request)
        return _NotFound(self._name).render(request)


class _Root(_Node):
    """
    The root: traversal asks it for a child exactly once per request, which
    makes it the place to brand, count and log every request (whatever Site
    serves the tree, StubTreq's included).
    """

    def __init__(self, fake: FakeServer) -> None:
        super().__init__(fake.name)
        self._fake = fake

    def getChildWithDefault(self, path: bytes, request: Request) -> IResource:
        self._fake.on_request(request)
        return super().getChildWithDefault(path, request)  # type: ignore[no-any-return]

    def render(self, request: Request) -> RenderResult:
        # Only reached with an empty path (e.g. "OPTIONS *"): no child was asked for.
        self._fake.on_request(request)
        return super().render(request)


def build_root(fake: FakeServer) -> Resource:
    """The resource tree of the fake upstream."""
    root = _Root(fake)
    for routes in (ProbeRoutes(fake), OpenAIRoutes(fake), AnthropicRoutes(fake)):
        for path, endpoint in routes.table().items():
            _place(root, path, endpoint, fake.name)
    return root


def _place(root: _Node, path: str, endpoint: Endpoint, name: str) -> None:
    """Put C{endpoint} at C{path}, making inner nodes on the way."""
    *parents, last = (segment.encode() for segment in path.split("/"))
    node = root
    for segment in parents:
        child = node.children.get(segment)
        if not isinstance(child, _Node):
            # A leaf that also has children (/v1/messages) becomes a node.
            here = child if isinstance(child, Endpoint) else None
            child = _Node(name, here)
            node.putChild(segment, child)
        node = child
    existing = node.children.get(last)
    if isinstance(existing, _Node):
        existing.here = endpoint
    else:
        node.putChild(last, endpoint)
