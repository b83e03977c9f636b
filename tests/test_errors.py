# -*- test-case-name: tests.test_errors -*-
"""
Tests for L{llamaswap.errors}: statuses of the client-visible errors and the
OpenAI-shaped JSON envelope they render.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from llamaswap.errors import (
    BadRequest,
    BodyTooLarge,
    HealthTimeout,
    ModelNotFound,
    ProxyError,
    QueueFull,
    QueueTimeout,
    ShuttingDown,
    StartFailed,
    UpstreamUnreachable,
    error_body,
    error_kind,
)


def decode(body: bytes) -> Any:
    return json.loads(body.decode("utf-8"))


class ErrorBodyTests(SynchronousTestCase):
    """error_body renders C{{"error": {message, type, param, code}}}."""

    def test_envelope(self) -> None:
        """The body has exactly OpenAI's four fields under "error"."""
        self.assertEqual(
            decode(error_body(404, "model not found: gpt-5")),
            {
                "error": {
                    "message": "model not found: gpt-5",
                    "type": "invalid_request_error",
                    "param": None,
                    "code": "not_found",
                }
            },
        )

    def test_known_statuses(self) -> None:
        """Each status we send maps to OpenAI's type and a code."""
        expected = {
            400: ("invalid_request_error", "bad_request"),
            401: ("authentication_error", "unauthorized"),
            404: ("invalid_request_error", "not_found"),
            413: ("invalid_request_error", "request_too_large"),
            429: ("rate_limit_error", "rate_limit_exceeded"),
            500: ("server_error", "internal_error"),
            502: ("server_error", "bad_gateway"),
            503: ("server_error", "service_unavailable"),
            504: ("server_error", "gateway_timeout"),
        }
        for status, kind in expected.items():
            self.assertEqual(error_kind(status), kind)
            body = decode(error_body(status, "x"))["error"]
            self.assertEqual((body["type"], body["code"]), kind)

    def test_unlisted_statuses(self) -> None:
        """Other 4xx are invalid requests; anything else is a server error."""
        self.assertEqual(error_kind(418), ("invalid_request_error", "invalid_request"))
        self.assertEqual(error_kind(599), ("server_error", "internal_error"))

    def test_explicit_code(self) -> None:
        """A code given by the caller replaces the status's default code."""
        self.assertEqual(
            decode(error_body(429, "busy", "concurrency_limit"))["error"]["code"],
            "concurrency_limit",
        )

    def test_message_is_escaped(self) -> None:
        """Quotes, newlines and non-ASCII text survive as valid JSON."""
        message = 'start failed: "llama-server" said\nerror: ü'
        self.assertEqual(decode(error_body(502, message))["error"]["message"], message)


class ProxyErrorTests(SynchronousTestCase):
    """ProxyError subclasses carry the status and render their own body."""

    def test_statuses(self) -> None:
        """Each subclass has the status the clients see."""
        expected: list[tuple[type[ProxyError], int]] = [
            (ProxyError, 500),
            (BadRequest, 400),
            (ModelNotFound, 404),
            (BodyTooLarge, 413),
            (QueueFull, 429),
            (QueueTimeout, 503),
            (StartFailed, 502),
            (HealthTimeout, 504),
            (UpstreamUnreachable, 502),
            (ShuttingDown, 503),
        ]
        for kind, status in expected:
            error = kind("boom")
            self.assertEqual(error.status, status, kind)
            self.assertEqual(error.message, "boom")
            self.assertEqual(str(error), "boom")
            self.assertIsInstance(error, ProxyError)
            self.assertEqual(decode(error.body())["error"]["message"], "boom")

    def test_status_override(self) -> None:
        """A status given to the constructor wins, for this instance only."""
        error = ProxyError("gone", status=410)
        self.assertEqual(error.status, 410)
        self.assertEqual(decode(error.body())["error"]["type"], "invalid_request_error")
        self.assertEqual(ProxyError("x").status, 500)

    def test_queue_codes(self) -> None:
        """A full queue and a queue timeout say so in their codes, and carry Retry-After."""
        full = QueueFull("the request queue is full", retry_after=3)
        body = decode(full.body())["error"]
        self.assertEqual(
            (body["type"], body["code"], full.retry_after), ("rate_limit_error", "queue_full", 3)
        )
        body = decode(QueueTimeout("waited too long").body())["error"]
        self.assertEqual((body["type"], body["code"]), ("server_error", "queue_timeout"))
        self.assertIsNone(ProxyError("x").retry_after)
