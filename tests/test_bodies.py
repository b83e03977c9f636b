"""Tests for L{llamaswap.bodies}: finding and rewriting the requested model."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from llamaswap import bodies
from llamaswap.errors import BadRequest

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


class JSONBodyTests(SynchronousTestCase):
    def test_model_found(self) -> None:
        """The model is read from the JSON object's C{model} string."""
        found = bodies.from_json(b'{"model": "qwen", "stream": true}')
        self.assertEqual(found.model, "qwen")

    def test_unchanged_body_is_replayed_byte_for_byte(self) -> None:
        """Without a new name (or the same name) the original bytes are returned."""
        raw = b'{ "model" :"qwen",  "x": 1.50 }'
        found = bodies.from_json(raw)
        self.assertIs(found.rewrite(None), raw)
        self.assertIs(found.rewrite("qwen"), raw)

    def test_rewrite_replaces_only_the_model(self) -> None:
        """A new name is put in C{model}; other keys keep their values and order."""
        found = bodies.from_json(b'{"a": 1, "model": "p:qwen", "z": "\xc3\xa9"}')
        rewritten = json.loads(found.rewrite("qwen"))
        self.assertEqual(rewritten, {"a": 1, "model": "qwen", "z": "é"})
        self.assertEqual(list(rewritten), ["a", "model", "z"])

    def test_not_json(self) -> None:
        """A body that is not JSON is a 400 naming the problem."""
        e = self.assertRaises(BadRequest, bodies.from_json, b"model=qwen")
        self.assertEqual(e.status, 400)
        self.assertIn("invalid JSON", e.message)

    def test_missing_or_invalid_model(self) -> None:
        """No C{model}, a non-string or empty one, or a non-object body: 400."""
        for raw in (b"{}", b'{"model": 3}', b'{"model": ""}', b"[1]", b'"model"'):
            e = self.assertRaises(BadRequest, bodies.from_json, raw)
            self.assertEqual(e.message, bodies.MISSING_MODEL, raw)

    @given(st.text(min_size=1).filter(lambda s: s.strip()), st.text())
    def test_rewrite_roundtrip(self, old: str, new: str) -> None:
        """Any model name can be found and replaced, whatever its characters."""
        raw = json.dumps({"model": old, "messages": [{"content": "hi"}]}).encode()
        found = bodies.from_json(raw)
        self.assertEqual(found.model, old)
        self.assertEqual(json.loads(found.rewrite(new))["model"], new)


class MultipartBodyTests(SynchronousTestCase):
    def test_model_field(self) -> None:
        """The C{model} form field names the model; file parts are skipped."""
        raw = multipart(("file", b"RIFF\x00\x01binary\r\n--", "a.wav"), ("model", b"whisper", None))
        found = bodies.from_multipart(raw, CT)
        self.assertEqual(found.model, "whisper")

    def test_rewrite_splices_only_the_field(self) -> None:
        """Rewriting changes the field's value and nothing else."""
        audio = bytes(range(256)) * 10
        raw = multipart(("model", b"p:whisper", None), ("file", audio, "a.wav"))
        found = bodies.from_multipart(raw, CT)
        rewritten = found.rewrite("whisper-large")
        self.assertEqual(rewritten, raw.replace(b"p:whisper", b"whisper-large", 1))
        self.assertEqual(bodies.from_multipart(rewritten, CT).model, "whisper-large")
        self.assertIs(found.rewrite(None), raw)

    def test_quoted_boundary_and_preamble(self) -> None:
        """A quoted boundary parameter and a preamble are understood."""
        raw = b"preamble\r\n" + multipart(("model", b"m", None), boundary="a b")
        found = bodies.from_multipart(raw, b'multipart/form-data; boundary="a b"')
        self.assertEqual(found.model, "m")

    def test_missing_field(self) -> None:
        """No C{model} field: 400 with llama-swap's message."""
        raw = multipart(("file", b"x", "a.wav"))
        e = self.assertRaises(BadRequest, bodies.from_multipart, raw, CT)
        self.assertEqual(e.message, bodies.MISSING_FORM_MODEL)

    def test_malformed(self) -> None:
        """Missing boundary, no delimiter, or an unterminated part: 400."""
        self.assertRaises(BadRequest, bodies.from_multipart, b"x", b"multipart/form-data")
        self.assertRaises(BadRequest, bodies.from_multipart, b"nothing here", CT)
        raw = f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="model"\r\n\r\nm'.encode()
        self.assertRaises(BadRequest, bodies.from_multipart, raw, CT)


class QueryTests(SynchronousTestCase):
    def test_query_model(self) -> None:
        """C{?model=} names the model; absent or empty is a 400."""
        self.assertEqual(bodies.from_query({b"model": [b"kokoro"]}), "kokoro")
        self.assertRaises(BadRequest, bodies.from_query, {})
        self.assertRaises(BadRequest, bodies.from_query, {b"model": [b""]})

    def test_content_type(self) -> None:
        """Content-Type is split into a lower-cased type and its parameters."""
        self.assertEqual(
            bodies.content_type(b"Multipart/Form-Data; Boundary=xyz"),
            ("multipart/form-data", {"boundary": "xyz"}),
        )
        self.assertEqual(bodies.content_type(None), ("", {}))
