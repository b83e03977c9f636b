# -*- test-case-name: tests.test_bodies -*-
"""
Finding the requested model in a request, and rewriting it for the upstream.

Three sources, as llama-swap has them: the JSON body's C{model} (whatever the
Content-Type says, as long as the body parses as JSON), the multipart form field
C{model} (audio transcriptions, image edits) and C{?model=} on GET routes.

Bodies are replayed byte for byte unless the model name must change
(C{useModelName}, C{profile:model}); only then is the JSON re-serialized or the
one multipart field spliced, so everything else reaches the upstream untouched.
"""

from __future__ import annotations

import json
from email.message import Message
from typing import Any

from attrs import frozen

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

    def rewrite(self, name: str | None) -> bytes:
        """Return the body with C{name} as the model (the original bytes if unchanged)."""
        if name is None or name == self.model:
            return self.body
        if self._json is not None:
            changed = dict(self._json)
            changed["model"] = name
            try:
                return json.dumps(changed, ensure_ascii=False).encode("utf-8")
            except UnicodeEncodeError:  # a lone surrogate ("\ud800") somewhere: keep it escaped
                return json.dumps(changed).encode("ascii")
        if self._span is not None:
            start, end = self._span
            return self.body[:start] + name.encode("utf-8") + self.body[end:]
        return self.body


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
