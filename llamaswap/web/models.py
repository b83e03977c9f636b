# -*- test-case-name: tests.test_resources -*-
"""
The routes that reach a model: the OpenAI/Anthropic/llama-server API paths
(the model named in the request) and C{/upstream/<model>/<path>}.

This is the edge where the requested name is resolved, once (L{Resolver}):
the target is kept on the request (L{RequestInfo.target}) and handed to the
relay, which never resolves it again.
"""

from __future__ import annotations

import html
from urllib.parse import unquote_to_bytes

from twisted.web.server import Request

from llamaswap import bodies
from llamaswap.errors import ModelNotFound, ProxyError
from llamaswap.names import LocalTarget, Resolver, Target
from llamaswap.supervisor import Lease
from llamaswap.web.base import (
    JSONResource,
    SupervisorAPI,
    read_body,
    respond,
    respond_error,
    respond_json,
)
from llamaswap.web.relay import Relay, warn_refused
from llamaswap.web.site import request_info


def resolved(request: Request, names: Resolver, requested: str) -> Target:
    """
    Resolve C{requested} for C{request} and keep the target on it.

    @raise ModelNotFound: (a 404) the name names nothing we can serve.
    """
    info = request_info(request)
    info.model = requested  # for the access log and events, even if refused
    try:
        info.target = target = names.resolve(requested)
    except ModelNotFound as e:
        warn_refused(request, e)  # as the relay logs every refusal
        raise
    return target


def request_uri(request: Request) -> bytes:
    """The path and query of C{request} as the client sent them (origin form)."""
    uri: bytes = request.uri
    if not uri.startswith(b"/"):  # absolute form: http://host/path?query
        scheme_end = uri.find(b"://")
        path_start = uri.find(b"/", scheme_end + 3 if scheme_end >= 0 else 0)
        uri = uri[path_start:] if path_start >= 0 else b"/"
    return uri


class ModelRoute(JSONResource):
    """
    C{POST} with the model in the JSON body (any Content-Type, as long as the
    body parses as JSON). C{strip} removes a path prefix before forwarding
    (C{/v/chat/completions} reaches the upstream as C{/chat/completions}).
    C{loading}: a streamed request (C{"stream": true}) may get a loading
    stream while its model starts (C{sendLoadingState}).

    The body is rewritten for the model: C{useModelName} or the profile prefix,
    then the model's C{filters} (JSON bodies only).
    """

    multipart = False

    def __init__(
        self, relay: Relay, names: Resolver, *, strip: bytes = b"", loading: bool = False
    ) -> None:
        super().__init__()
        self._relay = relay
        self._names = names
        self._strip = strip
        self._loading = loading

    def upstream_uri(self, request: Request) -> bytes:
        uri = request_uri(request)
        if self._strip and uri.startswith(self._strip):
            uri = uri[len(self._strip) :]
        return uri

    def render_POST(self, request: Request) -> bytes | int:
        request_info(request).proxied = True
        body = read_body(request)
        header = request.getHeader(b"content-type")
        # Only multipart routes need the type (the email parser is not free).
        if self.multipart and bodies.content_type(header)[0] == "multipart/form-data":
            parsed = bodies.from_multipart(body, header)
        else:
            parsed = bodies.from_json(body)

        def body_for(lease: Lease) -> bytes:
            return parsed.rewrite(lease.target.upstream_model, lease.model.filters)

        return self._relay.proxy(
            request,
            resolved(request, self._names, parsed.model),
            self.upstream_uri(request),
            body_for,
            loading=self._loading and parsed.stream,
        )


class FormModelRoute(ModelRoute):
    """C{POST} with the model in the C{multipart/form-data} field C{model} (or JSON)."""

    multipart = True


class QueryModelRoute(ModelRoute):
    """C{GET} with C{?model=} (forwarded with the query intact); C{POST} as JSON."""

    def render_GET(self, request: Request) -> bytes | int:
        request_info(request).proxied = True
        target = resolved(request, self._names, bodies.from_query(request.args))
        return self._relay.proxy(request, target, self.upstream_uri(request), lambda _: b"")


class UpstreamRoot(JSONResource):
    """
    C{/upstream}: a list of models; C{/upstream/<model>/<path>}: any method,
    passed to the model's server as C{/<path>} (escaping and query preserved).

    Model ids may contain C{/}: the longest leading run of path segments that
    names a model (id, alias or C{profile:model}) wins.

    A path matching C{upstream.ignorePaths} (static files, by default) never
    starts a model: while the model is not ready it is a 409.
    """

    isLeaf = True

    def __init__(self, names: Resolver, relay: Relay, supervisor: SupervisorAPI) -> None:
        super().__init__()
        self._names = names
        self._config = names.config
        self._relay = relay
        self._supervisor = supervisor

    def render_any(self, request: Request) -> bytes | int:
        path, _, query = request_uri(request).partition(b"?")
        # Raw (still escaped) segments after the mount point: /upstream/<a>/<b>...
        segments = path.split(b"/")[1 + len(request.prepath or []) :]
        if not segments or segments == [b""]:
            return self._index(request)
        best = 0
        target: LocalTarget | None = None
        for i in range(1, len(segments) + 1):
            name = b"/".join(unquote_to_bytes(s) for s in segments[:i]).decode("utf-8", "replace")
            try:
                target = self._names.local(name)
            except ModelNotFound:
                continue
            best = i
        if target is None:
            first = unquote_to_bytes(segments[0]).decode("utf-8", "replace")
            raise ModelNotFound(f"model not found: {first}")
        mount = b"/".join(path.split(b"/")[: 1 + len(request.prepath or [])])
        if best == len(segments):
            # /upstream/<id> -> /upstream/<id>/ so the server's relative links work.
            location = b"/".join([mount, *segments]) + b"/" + (b"?" + query if query else b"")
            request.setHeader(b"Location", location)
            status = 301 if request.method in (b"GET", b"HEAD") else 308
            return respond_json(request, {"location": location.decode("ascii", "replace")}, status)
        rest = b"/" + b"/".join(segments[best:])
        info = request_info(request)
        info.model = target.requested  # for the access log, even if refused
        info.target = target
        self._refuse_ignored(target, unquote_to_bytes(rest).decode("utf-8", "replace"))
        uri = rest + (b"?" + query if query else b"")
        info.proxied = True
        body = read_body(request)
        return self._relay.proxy(request, target, uri, lambda _: body)

    def _refuse_ignored(self, target: LocalTarget, path: str) -> None:
        """
        @raise ProxyError: 409 if C{path} matches C{upstream.ignorePaths} while
            the model is not ready (a page left open must not reload a model).
        """
        if any(p.search(path) for p in self._config.upstream_ignore_paths):
            model_id = target.model_id
            if self._supervisor.status(model_id).state != "ready":
                raise ProxyError(
                    f"model {model_id} is not loaded; path matches upstream.ignorePaths", 409
                )

    def _index(self, request: Request) -> bytes:
        if request.method not in (b"GET", b"HEAD"):
            request.setHeader(b"Allow", b"GET, HEAD")
            return respond_error(request, ProxyError("method not allowed", 405))
        ids = sorted(m.id for m in self._config.models.values() if not m.unlisted)
        accept = (request.getHeader(b"accept") or b"").lower()
        if b"text/html" in accept:
            items = "".join(
                f'<li><a href="/upstream/{html.escape(i, quote=True)}/">{html.escape(i)}</a></li>'
                for i in ids
            )
            page = (
                "<!doctype html><meta charset=utf-8><title>Models</title>"
                f"<h1>Models</h1><ul>{items}</ul>"
            )
            return respond(request, 200, page.encode("utf-8"), b"text/html; charset=utf-8")
        data = [{"id": i, "url": f"/upstream/{i}/"} for i in ids]
        return respond_json(request, {"object": "list", "data": data})
