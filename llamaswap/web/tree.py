# -*- test-case-name: tests.test_resources -*-
"""
The resource tree: L{build_root} mounts every route (see docs/api.md).

The root applies what holds for every path: CORS preflight (C{OPTIONS}
anywhere is answered 204 without auth) and the C{apiKeys} check.
"""

from __future__ import annotations

import re
from typing import Any

from attrs import define
from treq.client import HTTPClient
from twisted.web.resource import IResource
from twisted.web.server import Request

from llamaswap.config import Config
from llamaswap.errors import Forbidden, Unauthorized
from llamaswap.events import EventBus
from llamaswap.logs import LogHub
from llamaswap.names import Resolver
from llamaswap.web.admin import (
    Health,
    LegacyUnload,
    LoadAPI,
    ModelList,
    Reload,
    ReloadAPI,
    Running,
    UnloadAPI,
)
from llamaswap.web.base import ErrorResource, JSONResource, Redirect, SupervisorAPI
from llamaswap.web.events import EventsResource, build_events_resource
from llamaswap.web.guard import OPEN_SEGMENTS, Guard
from llamaswap.web.logs import build_logs_resource
from llamaswap.web.metrics import build_metrics_resource
from llamaswap.web.models import FormModelRoute, ModelRoute, QueryModelRoute, UpstreamRoot
from llamaswap.web.relay import Relay
from llamaswap.web.site import request_info
from llamaswap.web.ui import build_ui_resource

# Routes whose model is named in the JSON body.
JSON_ROUTES = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/responses",
    "/v1/embeddings",
    "/v1/rerank",
    "/v1/reranking",
    "/rerank",
    "/reranking",
    "/v1/audio/speech",
    "/v1/images/generations",
    "/v1/messages",
    "/v1/messages/count_tokens",
    "/infill",
    "/completion",
    "/sdapi/v1/txt2img",
    "/sdapi/v1/img2img",
)
# JSON routes whose streamed requests may get a loading stream (sendLoadingState).
LOADING_ROUTES = frozenset({"/v1/chat/completions"})
# ... in the multipart field "model" (or JSON).
FORM_ROUTES = ("/v1/audio/transcriptions", "/v1/audio/translations", "/v1/images/edits")
# ... in ?model= for GET (JSON body for POST).
QUERY_ROUTES = ("/v1/audio/voices", "/props", "/sdapi/v1/loras")
# Versionless aliases: /v/chat/completions reaches the upstream as /chat/completions.
VERSIONLESS_ROUTES = (
    "chat/completions",
    "responses",
    "completions",
    "messages",
    "messages/count_tokens",
    "embeddings",
    "rerank",
    "reranking",
)

CORS_METHODS = b"GET, POST, PUT, PATCH, DELETE, OPTIONS"
CORS_DEFAULT_HEADERS = b"Content-Type, Authorization, Accept, X-Requested-With"
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


class Preflight(JSONResource):
    """
    C{OPTIONS} on any path: 204, with CORS headers for an allowed origin (the
    root refused the others; a request without C{Origin} gets none).
    """

    isLeaf = True

    def __init__(self, origin: bytes | None) -> None:
        super().__init__()
        self._origin = origin

    def render(self, request: Request) -> bytes:
        asked = b",".join(
            request.requestHeaders.getRawHeaders(b"access-control-request-headers", [])
        )
        names = [n.strip() for n in asked.split(b",") if _TOKEN.fullmatch(n.strip())]
        request.setResponseCode(204)
        if self._origin is None:
            return b""
        request.setHeader(b"Access-Control-Allow-Origin", self._origin)
        request.setHeader(b"Vary", b"Origin")
        request.setHeader(b"Access-Control-Allow-Methods", CORS_METHODS)
        request.setHeader(
            b"Access-Control-Allow-Headers", b", ".join(names) if names else CORS_DEFAULT_HEADERS
        )
        request.setHeader(b"Access-Control-Max-Age", b"86400")
        return b""


@define
class WebParts:
    """The resources that outlive a config reload: they keep state or clients."""

    relay: Relay
    metrics: IResource  # its counters
    events: EventsResource  # the UI's clients, the recent requests
    logs: IResource
    ui: IResource


class Root(JSONResource):
    """
    The root: for every path below it, the checks of L{Guard} (Host, browser
    origin, API key, the route's access level), then CORS for an allowed
    cross-origin request. The client it found is the request's
    (C{request_info(request).client}) for the routes' own checks.
    """

    def __init__(self, guard: Guard, parts: WebParts) -> None:
        super().__init__()
        self._guard = guard
        self.parts = parts

    def getChildWithDefault(self, path: bytes, request: Request) -> IResource:
        guard = self._guard
        if not guard.host_allowed(request):
            host = (request.getHeader(b"host") or b"").decode("latin-1")
            return ErrorResource(
                Forbidden(f"host not allowed: {host} (add it to security.allowedHosts)")
            )
        allowed, cors = guard.cross_origin(request)
        if not allowed:
            origin = (request.getHeader(b"origin") or b"(a page of another site)").decode("latin-1")
            return ErrorResource(
                Forbidden(f"origin not allowed: {origin} (add it to security.allowedOrigins)")
            )
        if cors is not None:
            request.setHeader(b"Access-Control-Allow-Origin", cors)
            request.setHeader(b"Vary", b"Origin")
        if request.method == b"OPTIONS":
            return Preflight(cors)
        if path not in OPEN_SEGMENTS:
            try:
                client = guard.client(request)
            except Unauthorized as e:
                return ErrorResource(e, {b"WWW-Authenticate": b'Basic realm="llama-swap"'})
            needed = guard.needs(path)
            if not client.may(needed):
                return ErrorResource(
                    Forbidden(
                        f"this API key may not use /{path.decode('latin-1')} "
                        f"(it needs access: {needed})"
                    )
                )
            request_info(request).client = client
        child: IResource = super().getChildWithDefault(path, request)
        return child


def mount(root: JSONResource, path: str, resource: IResource) -> None:
    """Put C{resource} at C{path}, creating JSON-only intermediate nodes."""
    node: Any = root
    *parents, leaf = path.strip("/").split("/")
    for segment in parents:
        name = segment.encode("utf-8")
        child = node.children.get(name)
        if child is None:
            child = JSONResource()
            node.putChild(name, child)
        node = child
    node.putChild(leaf.encode("utf-8"), resource)


def build_root(
    config: Config,
    *,
    supervisor: SupervisorAPI,
    logs: LogHub,
    events: EventBus,
    http: HTTPClient,
    reactor: Any,
    fresh_http: HTTPClient | None = None,
    parts: WebParts | None = None,
    reload: Reload | None = None,
    hosts: tuple[str, ...] = (),
) -> Root:
    """
    The whole HTTP API (see docs/api.md). C{http} keeps connections alive;
    C{fresh_http} (if given) opens one per request, for the model servers that
    do not reuse connections (L{Relay}). A reload builds a new root for the
    new config with the old root's L{WebParts} (C{root.parts}): the counters,
    the UI's feed and its clients live on. C{reload} mounts the reload API.
    C{hosts}: host names answered to besides the config's (the listen address).
    """
    names = Resolver(config)
    if parts is None:
        parts = WebParts(
            relay=Relay(supervisor, http, reactor, fresh_http),
            metrics=build_metrics_resource(supervisor, events, reactor),
            events=build_events_resource(config, events, supervisor, logs, clock=reactor),
            logs=build_logs_resource(logs),
            ui=build_ui_resource(),
        )
    else:
        parts.events.reconfigure(config)
    relay = parts.relay
    root = Root(Guard(config, hosts), parts)
    root.putChild(b"", Redirect(b"/ui/", 302))
    for path in JSON_ROUTES:
        # Loading streams only where llama-swap has them: OpenAI chat.
        mount(root, path, ModelRoute(relay, names, loading=path in LOADING_ROUTES))
    for path in FORM_ROUTES:
        mount(root, path, FormModelRoute(relay, names))
    for path in QUERY_ROUTES:
        mount(root, path, QueryModelRoute(relay, names))
    for path in VERSIONLESS_ROUTES:
        mount(root, f"/v/{path}", ModelRoute(relay, names, strip=b"/v"))
    models = ModelList(config, supervisor, reactor)
    mount(root, "/v1/models", models)
    mount(root, "/models", models)
    mount(root, "/upstream", UpstreamRoot(names, relay, supervisor))
    mount(root, "/running", Running(config, supervisor))
    mount(root, "/health", Health())
    mount(root, "/metrics", parts.metrics)
    mount(root, "/unload", LegacyUnload(supervisor))
    mount(root, "/api/models/unload", UnloadAPI(supervisor))
    mount(root, "/api/models/load", LoadAPI(supervisor, names))
    mount(root, "/api/events", parts.events)
    if reload is not None:
        mount(root, "/api/config/reload", ReloadAPI(reload))
    mount(root, "/logs", parts.logs)
    mount(root, "/ui", parts.ui)
    return root
