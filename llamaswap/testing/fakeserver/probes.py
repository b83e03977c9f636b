# -*- test-case-name: tests.test_fakeserver -*-
"""
The fake server's routes that are no inference API: llama-server's own
C{/health} and C{/props}, what the process is (C{/pid}, C{/env}), its
counters (C{/debug/*}), and the helpers tests drive to make an upstream slow,
big, streaming, failing, redirecting, echoing or dead.
"""

from __future__ import annotations

import gzip
import hashlib
import os
from itertools import chain
from urllib.parse import parse_qs

from twisted.web.server import Request

from llamaswap.testing.fakeserver.base import (
    Endpoint,
    JSONObject,
    RenderResult,
    Routes,
    Stream,
    header,
    headers_dict,
    json_response,
    query,
)
from llamaswap.testing.fakeserver.helpers import dumps, parse_duration
from llamaswap.web.sse import DONE

BIG_CHUNK = 64 * 1024
MIB = 1024 * 1024
DEFAULT_SLOW_TEXT = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


class ProbeRoutes(Routes):
    """Health, introspection, counters and the misbehaviour helpers."""

    def table(self) -> dict[str, Endpoint]:
        return {
            "": self.get(self.root),
            "health": self.get(self.health),
            "props": self.get(self.props),
            "env": self.get(self.env),
            "pid": self.get(self.pid),
            "slow-respond": self.get(self.slow_respond),
            "big": self.get(self.big),
            "sse": self.get(self.sse),
            "gzip": self.get(self.gzip),
            "exit": self.any(self.exit),
            "status": self.any(self.status),
            "echo": self.any(self.echo),
            "debug/stats": self.get(self.stats),
            "debug/disconnects": self.get(self.disconnects),
        }

    def root(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return request.method + b" " + request.uri

    def health(self, request: Request) -> bytes:
        if self.fake.loading:
            return json_response(
                request,
                {
                    "status": "loading",
                    "error": {"code": 503, "message": "Loading model", "type": "unavailable_error"},
                },
                503,
            )
        return json_response(request, {"status": "ok"})

    def env(self, request: Request) -> bytes:
        return json_response(request, dict(os.environ))

    def pid(self, request: Request) -> bytes:
        return json_response(request, {"pid": self.fake.pid, "served_by": self.name})

    def props(self, request: Request) -> bytes:
        return json_response(
            request,
            {
                "model": self.name,
                "model_path": f"/models/{self.name}.gguf",
                "total_slots": 1,
                "default_generation_settings": {"n_ctx": 4096, "n_predict": -1},
                "build_info": "fakeserver",
                "served_by": self.name,
            },
        )

    def stats(self, request: Request) -> bytes:
        return json_response(request, self.fake.stats())

    def disconnects(self, request: Request) -> bytes:
        return json_response(
            request,
            [
                {"path": d.path, "at": d.at, "frames_written": d.frames_written}
                for d in self.fake.disconnects
            ],
        )

    def slow_respond(self, request: Request) -> RenderResult:
        text = query(request, b"echo", DEFAULT_SLOW_TEXT)
        try:
            delay = parse_duration(query(request, b"delay", "0.1"))
        except ValueError:
            return self.error(request, 400, "delay: bad duration", "invalid_request_error")
        frames = [c.encode("utf-8") for c in text]
        # Go's simple-responder sleeps after each character; so do we (a pause
        # before the first one would only delay the headers).
        head, paced = frames[:1], frames[1:]
        return self.start_stream(
            request,
            Stream(head, paced, delay=delay, content_type=b"text/plain; charset=utf-8"),
        )

    def big(self, request: Request) -> RenderResult:
        try:
            size = int(float(query(request, b"mb", "1")) * MIB)
        except ValueError:
            return self.error(request, 400, "mb must be a number", "invalid_request_error")
        if size < 0:
            return self.error(request, 400, "mb must be >= 0", "invalid_request_error")
        request.setHeader(b"content-length", b"%d" % size)
        chunk = (b"0123456789abcdef" * (BIG_CHUNK // 16))[:BIG_CHUNK]
        full, rest = divmod(size, BIG_CHUNK)
        frames = chain((chunk for _ in range(full)), [chunk[:rest]] if rest else [])
        return self.start_stream(
            request, Stream((), frames, content_type=b"application/octet-stream")
        )

    def sse(self, request: Request) -> RenderResult:
        try:
            count = int(query(request, b"events", "100"))
        except ValueError:
            return self.error(request, 400, "events must be an integer", "invalid_request_error")
        try:
            # Paced like the token routes (--token-delay) unless ?delay= says otherwise.
            delay = parse_duration(query(request, b"delay", str(self.fake.options.token_delay)))
        except ValueError:
            return self.error(request, 400, "delay: bad duration", "invalid_request_error")
        # Pre-split template: formatting one number is all the per-event work.
        prefix = (
            b'data: {"object":"chat.completion.chunk","model":"'
            + dumps(self.name)[1:-1]
            + b'","choices":[{"index":0,"delta":{"content":"x"},"finish_reason":null}],"i":'
        )
        frames = (prefix + b"%d}\n\n" % i for i in range(max(count, 0)))
        return self.start_stream(request, Stream((), frames, (DONE,), delay))

    def gzip(self, request: Request) -> bytes:
        accept = request.getHeader(b"accept-encoding") or b""
        payload = dumps({"served_by": self.name, "text": "hello " * 200})
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"vary", b"Accept-Encoding")
        if b"gzip" in accept.lower():
            request.setHeader(b"content-encoding", b"gzip")
            return gzip.compress(payload, mtime=0)
        return payload

    def exit(self, request: Request) -> bytes:
        try:
            code = int(query(request, b"code", "1"))
        except ValueError:
            code = 1
        self.fake.exit_now(code, "on request (/exit)")
        return b""  # only reached when exit_process is a test double

    def status(self, request: Request) -> bytes:
        segment = request.postpath[0] if request.postpath else b""
        try:
            code = int(segment)
        except ValueError:
            code = 0
        if not 100 <= code <= 599:
            return self.error(request, 400, "status must be 100..599", "invalid_request_error")
        location = request.args.get(b"location")
        if location:
            request.setHeader(b"location", location[0])
        body: JSONObject = {"status": code, "served_by": self.name}
        if code >= 400:
            body["error"] = {"code": code, "message": f"status {code} on demand", "type": "fake"}
        return json_response(request, body, code)

    def echo(self, request: Request) -> bytes:
        raw = request.content.read() if request.content is not None else b""
        qs = request.uri.partition(b"?")[2].decode("utf-8", "replace")
        out: JSONObject = {
            "method": request.method.decode("ascii", "replace"),
            "path": request.path.decode("utf-8", "replace"),
            "query": qs,
            "args": parse_qs(qs, keep_blank_values=True),
            "headers": headers_dict(request),
            "body_length": len(raw),
            "body_sha256": hashlib.sha256(raw).hexdigest(),
            "content_length": header(request, b"content-length"),
            "transfer_encoding": header(request, b"transfer-encoding"),
            "served_by": self.name,
        }
        if len(raw) <= 65536:
            out["body"] = raw.decode("utf-8", "replace")
        return json_response(request, out)
