"""Tests for L{llamaswap.bodies}: finding and rewriting the requested model."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from llamaswap import bodies
from llamaswap.config import Filters
from llamaswap.errors import BadRequest
from tests.multipart import BOUNDARY, CT, multipart


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


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=8,
)


class FilterTests(SynchronousTestCase):
    """C{rewrite} with filters edits only the affected members of the JSON object."""

    def test_other_bytes_unchanged(self) -> None:
        """Stripped members vanish with their comma; set ones change in place; new ones last."""
        raw = b'{ "model" :"qwen",  "top_k": 40,\n "temperature":0.80, "x": 1.50e3 }'
        found = bodies.from_json(raw)
        filters = Filters(strip_params=("top_k", "absent"), set_params={"temperature": 0.2})
        self.assertEqual(
            found.rewrite(None, filters),
            b'{ "model" :"qwen",\n "temperature":0.2, "x": 1.50e3 }',
        )
        filters = Filters(strip_params=("model",), set_params={"seed": 7, "stop": ("a", "b")})
        self.assertEqual(
            found.rewrite("other", filters),
            b'{ "model" :"other",  "top_k": 40,\n "temperature":0.80, "x": 1.50e3,  '
            b'"seed" :7,  "stop" :["a", "b"] }',
        )

    def test_strip_first_last_and_all(self) -> None:
        """Removing the first, the last, or every other member keeps valid JSON."""
        raw = b'{"a": 1, "model": "m", "z": 2}'
        found = bodies.from_json(raw)
        self.assertEqual(
            found.rewrite(None, Filters(strip_params=("a",))), b'{"model": "m", "z": 2}'
        )
        self.assertEqual(
            found.rewrite(None, Filters(strip_params=("z",))), b'{"a": 1, "model": "m"}'
        )
        self.assertEqual(found.rewrite(None, Filters(strip_params=("a", "z"))), b'{"model": "m"}')

    def test_set_params_by_id_follows_the_requested_name(self) -> None:
        """setParamsByID is chosen by the name the client sent, and wins over setParams."""
        filters = Filters(
            set_params={"temperature": 0.7, "top_p": 0.9},
            set_params_by_id={"hot": {"temperature": 1.5}},
        )
        hot = json.loads(bodies.from_json(b'{"model": "hot"}').rewrite(None, filters))
        self.assertEqual(hot, {"model": "hot", "temperature": 1.5, "top_p": 0.9})
        plain = json.loads(bodies.from_json(b'{"model": "m"}').rewrite(None, filters))
        self.assertEqual(plain, {"model": "m", "temperature": 0.7, "top_p": 0.9})

    def test_no_change_is_the_same_bytes(self) -> None:
        """Filters that change nothing return the original body object."""
        raw = b'{"model": "m", "n": 1}'
        found = bodies.from_json(raw)
        self.assertIs(found.rewrite(None, Filters(strip_params=("absent",))), raw)
        self.assertIs(found.rewrite("m", Filters()), raw)

    def test_duplicate_keys_and_non_utf8(self) -> None:
        """Duplicate keys are all edited; a UTF-16 body is re-serialized correctly."""
        found = bodies.from_json(b'{"model": "a", "t": 1, "t": 2}')
        self.assertEqual(
            found.rewrite(None, Filters(set_params={"t": 3})), b'{"model": "a", "t": 3, "t": 3}'
        )
        raw = json.dumps({"model": "a", "t": 1, "s": "\u00e9"}).encode("utf-16")
        edited = bodies.from_json(raw).rewrite("b", Filters(strip_params=("t",)))
        self.assertEqual(json.loads(edited), {"model": "b", "s": "\u00e9"})

    def test_multipart_ignores_filters(self) -> None:
        """Filters apply to JSON bodies only; a form keeps every part."""
        raw = multipart(("model", b"m", None), ("temperature", b"1", None))
        found = bodies.from_multipart(raw, CT)
        self.assertIs(found.rewrite(None, Filters(strip_params=("temperature",))), raw)

    def test_stream_flag(self) -> None:
        """C{stream} is true only for a JSON body with C{"stream": true}."""
        self.assertTrue(bodies.from_json(b'{"model": "m", "stream": true}').stream)
        for raw in (b'{"model": "m"}', b'{"model": "m", "stream": "true"}'):
            self.assertFalse(bodies.from_json(raw).stream)
        self.assertFalse(bodies.from_multipart(multipart(("model", b"m", None)), CT).stream)

    @given(
        st.dictionaries(st.text(), JSON_VALUES, max_size=6),
        st.sampled_from([(", ", ": "), (",", ":"), (" ,\n  ", " : ")]),
        st.lists(st.text(), max_size=4),
        st.dictionaries(st.text().filter(lambda k: k != "model"), JSON_VALUES, max_size=3),
    )
    def test_edits_match_a_dict_update(
        self,
        document: dict[str, object],
        separators: tuple[str, str],
        strip: list[str],
        values: dict[str, object],
    ) -> None:
        """Whatever the document and spacing, the result parses to the expected object."""
        document["model"] = "m"
        raw = json.dumps(document, separators=separators, ensure_ascii=False).encode()
        strip = [k for k in strip if k != "model"]
        edited = bodies.from_json(raw).rewrite(
            "new", Filters(strip_params=tuple(strip), set_params=values)
        )
        expected = {k: v for k, v in document.items() if k not in strip}
        expected.update(values, model="new")
        self.assertEqual(json.loads(edited), expected)


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
