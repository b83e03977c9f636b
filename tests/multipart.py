# -*- test-case-name: tests.test_bodies,tests.test_resources -*-
"""multipart/form-data bodies for the tests of body rewriting and of the form routes."""

from __future__ import annotations

BOUNDARY = "----llamaswapBoundary42"
CT = f"multipart/form-data; boundary={BOUNDARY}".encode()


def multipart(*parts: tuple[str, bytes, str | None], boundary: str = BOUNDARY) -> bytes:
    out = b""
    for name, value, filename in parts:
        disposition = f'form-data; name="{name}"'
        if filename:
            disposition += f'; filename="{filename}"'
        out += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n".encode()
        if filename:
            out += b"Content-Type: application/octet-stream\r\n"
        out += b"\r\n" + value + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()
