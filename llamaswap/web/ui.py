# -*- test-case-name: tests.test_logs -*-
"""C{/ui/}: the static UI files in C{llamaswap/ui/}."""

from __future__ import annotations

from pathlib import Path

from twisted.web.resource import IResource
from twisted.web.server import Request

from llamaswap.errors import ProxyError
from llamaswap.web.base import JSONResource, respond_error

UI_DIR = Path(__file__).parent.parent / "ui"
UI_FILES = {
    "index.html": b"text/html; charset=utf-8",
    "app.js": b"text/javascript; charset=utf-8",
    "style.css": b"text/css; charset=utf-8",
}


def _error(request: Request, status: int, message: str) -> bytes:
    # JSON, or text/HTML when Accept asks for it: as on every other route.
    return respond_error(request, ProxyError(message, status))


class UIResource(JSONResource):
    """
    The static UI. C{/ui} redirects to C{/ui/}; extension-less paths get
    C{index.html} (the UI routes with C{#fragments}); other unknown files 404.
    """

    isLeaf = True

    def render_GET(self, request: Request) -> bytes | int:
        segments = [s.decode("utf-8", "replace") for s in request.postpath or []]
        if not segments:
            request.redirect(b"/ui/")
            return b""
        name = "/".join(segments) or "index.html"
        if name not in UI_FILES:
            if "." in segments[-1]:
                return _error(request, 404, f"not found: /ui/{name}")
            name = "index.html"
        try:
            body = (UI_DIR / name).read_bytes()
        except OSError:
            return _error(request, 404, f"not found: /ui/{name}")
        request.setHeader(b"content-type", UI_FILES[name])
        request.setHeader(b"cache-control", b"no-cache")
        request.setHeader(b"x-content-type-options", b"nosniff")
        return b"" if request.method == b"HEAD" else body


def build_ui_resource() -> IResource:
    """The resource mounted at C{/ui}."""
    return UIResource()
