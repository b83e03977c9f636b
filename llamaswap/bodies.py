# -*- test-case-name: tests.test_bodies -*-
"""
Finding the requested model in a request, and rewriting it for the upstream.

Three sources, as llama-swap has them: the JSON body's C{model} (whatever the
Content-Type says, as long as the body parses as JSON), the multipart form field
C{model} (audio transcriptions, image edits) and C{?model=} on GET routes.

Bodies are replayed byte for byte unless something must change: the model name
(C{useModelName}, C{profile:model}) or the model's C{filters}. Then only the
affected top-level members of the JSON object are cut out or spliced in (the rest
keeps its bytes, spacing and order), or the one multipart field is spliced.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from email.message import Message
from json import decoder as _json_decoder
from typing import Any

from attrs import frozen

from llamaswap.config import PROTECTED_PARAMS, Filters, plain_json
from llamaswap.errors import BadRequest

MISSING_MODEL = "missing or invalid 'model' key"
MISSING_FORM_MODEL = "missing or invalid 'model' parameter in form data"
MISSING_QUERY_MODEL = "missing or invalid 'model' query parameter"


@frozen
class ModelRequest:
    """
    The requested model name, and how to put another name in its place.

    C{rewrite(name)} returns the body to send upstream with C{name} as the model.
    """

    model: str
    body: bytes
    _json: dict[str, Any] | None = None
    _span: tuple[int, int] | None = None  # multipart: where the field's value lives

    @property
    def stream(self) -> bool:
        """Whether a JSON body asks for a streamed answer (C{"stream": true})."""
        return self._json is not None and self._json.get("stream") is True

    def rewrite(self, name: str | None, filters: Filters | None = None) -> bytes:
        """
        Return the body with C{name} as the model and C{filters} applied (JSON
        bodies only): the original bytes if nothing changes.
        """
        if self._json is None:
            if self._span is None or name is None or name == self.model:
                return self.body
            start, end = self._span
            return self.body[:start] + name.encode("utf-8") + self.body[end:]
        edits: dict[str, Any] = {}
        if filters:
            strip, values = filters.edits_for(self.model)
            edits.update((key, _DELETE) for key in strip if key in self._json)
            edits.update(values)
            for key in PROTECTED_PARAMS:  # the loader refuses them; never trust it alone
                edits.pop(key, None)
        if name is not None and name != self.model:
            edits["model"] = name
        if not edits:
            return self.body
        return edit_json_object(self.body, self._json, edits)


# Marks a key to remove in L{edit_json_object}.
_DELETE: Any = object()
_WHITESPACE = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()
# The string scanner json.loads uses (not in typeshed): (text, after the quote) -> (str, end).
_scanstring: Callable[[str, int], tuple[str, int]] = _json_decoder.scanstring  # type: ignore[attr-defined]


def _skip(text: str, pos: int) -> int:
    """The index of the first non-whitespace character at or after C{pos}."""
    match = _WHITESPACE.match(text, pos)
    return match.end() if match else pos


@frozen
class _Member:
    """Where one top-level member C{"key": value} sits in the JSON text."""

    key: str
    start: int  # the key's opening quote
    key_end: int  # just after the key's closing quote
    value_start: int
    end: int  # just after the value


def _scan_object(text: str) -> tuple[list[_Member], int] | None:
    """The members of a top-level JSON object and where its C{}} is; None if unsure."""
    pos = _skip(text, 0)
    if not text.startswith("{", pos):
        return None
    pos = _skip(text, pos + 1)
    members: list[_Member] = []
    if text.startswith("}", pos):
        return members, pos
    while text.startswith('"', pos):
        key, key_end = _scanstring(text, pos + 1)
        colon = _skip(text, key_end)
        if not text.startswith(":", colon):
            return None
        value_start = _skip(text, colon + 1)
        _, end = _DECODER.raw_decode(text, value_start)
        members.append(_Member(key, pos, key_end, value_start, end))
        pos = _skip(text, end)
        if text.startswith("}", pos):
            return members, pos
        if not text.startswith(",", pos):
            return None
        pos = _skip(text, pos + 1)
    return None


def _dump(value: Any) -> str:
    text = json.dumps(plain_json(value), ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate ("\ud800"): keep it escaped
        text = json.dumps(plain_json(value))
    return text


def edit_json_object(body: bytes, document: Mapping[str, Any], edits: Mapping[str, Any]) -> bytes:
    """
    Set (or, for L{_DELETE}, remove) top-level keys of the JSON object C{body}.

    Only the edited members change: every other byte (spacing, key order, number
    formatting, escapes) is kept. New keys go at the end. C{document} is C{body}
    parsed; it is re-serialized whole only for bodies that are not plain UTF-8.
    """
    scanned = None
    if not body.startswith(b"\xef\xbb\xbf"):  # json.loads accepts a BOM; the scanner not
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            pass
        else:
            scanned = _scan_object(text)
    if scanned is None:  # UTF-16/32 or a BOM: rebuild the document
        changed = {k: v for k, v in document.items() if edits.get(k, None) is not _DELETE}
        changed.update((k, v) for k, v in edits.items() if v is not _DELETE)
        return _dump(changed).encode("utf-8")
    members, close = scanned
    kept: list[tuple[str, str]] = []  # (separator before it, member text)
    previous_end = members[0].start if members else close
    for member in members:
        separator, previous_end = text[previous_end : member.start], member.end
        if member.key not in edits:
            kept.append((separator, text[member.start : member.end]))
        elif edits[member.key] is not _DELETE:
            head = text[member.start : member.value_start]
            kept.append((separator, head + _dump(edits[member.key])))
    present = {member.key for member in members}
    colon = text[members[0].key_end : members[0].value_start] if members else ": "
    comma = text[members[0].end : members[1].start] if len(members) > 1 else ", "
    for key, value in edits.items():
        if key not in present and value is not _DELETE:
            kept.append((comma, _dump(key) + colon + _dump(value)))
    prefix = text[: members[0].start] if members else text[:close]
    suffix = text[members[-1].end :] if members else text[close:]
    inner = "".join(sep + member if i else member for i, (sep, member) in enumerate(kept))
    return (prefix + inner + suffix).encode("utf-8")


def from_json(body: bytes) -> ModelRequest:
    """
    Read C{model} from a JSON object body.

    @raise BadRequest: the body is not JSON, not an object, or has no string C{model}.
    """
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise BadRequest(f"invalid JSON: {e}") from e
    except RecursionError:  # nested deeper than the interpreter's recursion limit
        raise BadRequest("invalid JSON: nested too deeply") from None
    if not isinstance(document, dict):
        raise BadRequest(MISSING_MODEL)
    model = document.get("model")
    if not isinstance(model, str) or not model.strip() or not _encodable(model):
        raise BadRequest(MISSING_MODEL)
    return ModelRequest(model, body, document)


def _encodable(text: str) -> bool:
    """False for strings with lone surrogates (C{"\\ud800"} is valid JSON, not a name)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def content_type(header: bytes | None) -> tuple[str, dict[str, str]]:
    """Split a Content-Type header into its lower-cased type and its parameters."""
    if not header:
        return "", {}
    message = Message()
    message["content-type"] = header.decode("latin-1")
    params = {
        key.lower(): value
        for key, value in (message.get_params(failobj=[]) or [])[1:]
        if isinstance(value, str)
    }
    return message.get_content_type(), params


def from_multipart(body: bytes, content_type_header: bytes | None) -> ModelRequest:
    """
    Read the C{model} field of a C{multipart/form-data} body.

    A small boundary scanner rather than a full MIME parser: uploads can be
    hundreds of megabytes and only one field's position is wanted.

    @raise BadRequest: not multipart, malformed, or no C{model} field.
    """
    kind, params = content_type(content_type_header)
    boundary = params.get("boundary", "")
    if kind != "multipart/form-data" or not boundary:
        raise BadRequest("expected a multipart/form-data body with a boundary")
    for name, start, end in _form_fields(body, boundary.encode("latin-1")):
        if name == "model":
            try:
                model = body[start:end].decode("utf-8")
            except UnicodeDecodeError:
                break
            if not model.strip():
                break
            return ModelRequest(model, body, None, (start, end))
    raise BadRequest(MISSING_FORM_MODEL)


def _form_fields(body: bytes, boundary: bytes) -> list[tuple[str, int, int]]:
    """Return C{(field name, value start, value end)} for each part of C{body}."""
    delimiter = b"--" + boundary
    fields: list[tuple[str, int, int]] = []
    pos = body.find(delimiter)
    if pos < 0 or (pos > 0 and body[pos - 2 : pos] != b"\r\n"):
        raise BadRequest("malformed multipart body: no opening boundary")
    while True:
        pos += len(delimiter)
        if body.startswith(b"--", pos):
            return fields  # the close delimiter
        line_end = body.find(b"\r\n", pos)
        if line_end < 0:
            break
        if body.startswith(b"\r\n", line_end + 2):  # a part without headers
            headers, start = b"", line_end + 4
        else:
            headers_end = body.find(b"\r\n\r\n", line_end + 2)
            if headers_end < 0:
                break
            headers, start = body[line_end + 2 : headers_end], headers_end + 4
        end = body.find(b"\r\n" + delimiter, start)
        if end < 0:
            break
        name = _disposition_name(headers)
        if name is not None:
            fields.append((name, start, end))
        pos = end + 2
    raise BadRequest("malformed multipart body: unterminated part")


def _disposition_name(headers: bytes) -> str | None:
    for line in headers.split(b"\r\n"):
        key, sep, value = line.partition(b":")
        if sep and key.strip().lower() == b"content-disposition":
            message = Message()
            message["content-disposition"] = value.strip().decode("utf-8", "replace")
            name = message.get_param("name", header="content-disposition")
            return name if isinstance(name, str) else None
    return None


def from_query(args: dict[bytes, list[bytes]]) -> str:
    """
    Read C{?model=} from a request's parsed query.

    @raise BadRequest: absent or empty.
    """
    values = args.get(b"model") or []
    model = values[0].decode("utf-8", "replace") if values else ""
    if not model.strip():
        raise BadRequest(MISSING_QUERY_MODEL)
    return model
