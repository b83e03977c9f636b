# -*- test-case-name: tests.test_errors -*-
"""
Errors a client can see, and their OpenAI-shaped JSON bodies.

Every failure that reaches an HTTP client is a L{ProxyError}: it carries the
status and a message, and L{error_body} renders the envelope OpenAI SDKs
parse (C{{"error": {"message", "type", "param", "code"}}}).
"""

from __future__ import annotations

import json

# status -> (type, code), following OpenAI's conventions (and llama-swap HEAD's).
_KINDS: dict[int, tuple[str, str]] = {
    400: ("invalid_request_error", "bad_request"),
    401: ("authentication_error", "unauthorized"),
    403: ("invalid_request_error", "forbidden"),
    404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    409: ("invalid_request_error", "conflict"),
    413: ("invalid_request_error", "request_too_large"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
    500: ("server_error", "internal_error"),
    501: ("server_error", "not_implemented"),
    502: ("server_error", "bad_gateway"),
    503: ("server_error", "service_unavailable"),
    504: ("server_error", "gateway_timeout"),
}


def error_kind(status: int) -> tuple[str, str]:
    """Return the OpenAI C{(type, code)} pair for an HTTP status."""
    if status in _KINDS:
        return _KINDS[status]
    if 400 <= status < 500:
        return ("invalid_request_error", "invalid_request")
    return ("server_error", "internal_error")


def error_body(status: int, message: str, code: str | None = None) -> bytes:
    """Render the OpenAI error envelope for C{status} as UTF-8 JSON bytes."""
    kind, default_code = error_kind(status)
    return json.dumps(
        {
            "error": {
                "message": message,
                "type": kind,
                "param": None,
                "code": code or default_code,
            }
        }
    ).encode("utf-8")


class ProxyError(Exception):
    """A failure with the HTTP status and message a client should see."""

    status = 500
    code: str | None = None
    retry_after: int | None = None  # seconds, sent as Retry-After (a 429 gets 1 without it)

    def __init__(
        self, message: str, status: int | None = None, *, retry_after: int | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        if retry_after is not None:
            self.retry_after = retry_after

    def body(self) -> bytes:
        return error_body(self.status, self.message, self.code)


class BadRequest(ProxyError):
    """The request itself is malformed (bad JSON, missing model, bad form)."""

    status = 400


class ModelNotFound(ProxyError):
    """The requested model, alias or profile is not configured."""

    status = 404


class BodyTooLarge(ProxyError):
    """The request body exceeds C{maxBodySize}."""

    status = 413


class QueueFull(ProxyError):
    """The request queue holds C{queue.maxLength} requests already: try again later."""

    status = 429
    code = "queue_full"


class QueueTimeout(ProxyError):
    """The request waited C{queue.timeout} seconds in the queue without being served."""

    status = 503
    code = "queue_timeout"


class StartFailed(ProxyError):
    """The model's server could not be started (exec error, early exit)."""

    status = 502


class HealthTimeout(ProxyError):
    """The model's server did not become healthy within C{healthCheckTimeout}."""

    status = 504


class UpstreamUnreachable(ProxyError):
    """The model was ready but its server refused or dropped the connection."""

    status = 502


class ShuttingDown(ProxyError):
    """llamaswap is stopping and takes no new work."""

    status = 503


class ModelTooLarge(ProxyError):
    """The model's measured memory exceeds its device's whole budget (docs/swapping.md)."""

    status = 500  # a retry cannot help: the config (or the budget) must change
    code = "model_too_large"


class InvalidConfig(ProxyError):
    """A config reload was refused: the new file is invalid (nothing changed)."""

    status = 400
    code = "invalid_config"
