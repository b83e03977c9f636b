# -*- test-case-name: tests.test_scaleout -*-
"""
The hosts behind the front, and what each one serves: C{[name=]address:port}
on the command line, the records of its C{/v1/models}.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from typing import Any

from attrs import frozen

# HAProxy's rule for proxy and server names.
_NAME = re.compile(r"[A-Za-z0-9_.:-]+")
_ADDRESS = re.compile(r"[^\s/'\"#]+:[0-9]{1,5}")


class InventoryError(Exception):
    """A host given wrongly, or one whose model list cannot be read."""


@frozen
class Host:
    """One llamaswap: its server name in HAProxy and the C{address:port} it listens on."""

    name: str
    address: str

    @property
    def url(self) -> str:
        return f"http://{self.address}"


def parse_host(text: str) -> Host:
    """
    C{[name=]address:port}, the address also as C{http://address:port/}.
    The name defaults to the address.

    @raise InventoryError: not of that form.
    """
    name, sep, address = text.partition("=")
    if not sep:
        name, address = "", text
    address = address.removeprefix("http://").rstrip("/")
    if not _ADDRESS.fullmatch(address):
        raise InventoryError(f"{text!r}: expected [name=]address:port, e.g. gpu1=10.0.0.5:8080")
    name = name or address
    if not _NAME.fullmatch(name):
        raise InventoryError(f"{text!r}: a host name may use letters, digits and _ . : - only")
    return Host(name, address)


@frozen
class Listing:
    """What one host answered on C{/v1/models}: its records, as it wrote them."""

    host: Host
    records: tuple[dict[str, Any], ...]


def names_of(record: dict[str, Any]) -> list[str]:
    """
    The names a request may use for this record's model on its host: the id
    and the model's aliases. A peer's model (C{<peer>/<model>}) is the host's
    own business and routes nowhere.
    """
    meta = record.get("meta", {}).get("llamaswap", {})
    if meta.get("type") == "peer":
        return []
    aliases = meta.get("aliases", [])
    return [record["id"], *(a for a in aliases if isinstance(a, str))]


def model_of(record: dict[str, Any]) -> str:
    """The id of the model a record stands for (with includeAliasesInList, an alias has one)."""
    meta = record.get("meta", {}).get("llamaswap", {})
    target = meta.get("modelID") if meta.get("type") == "alias" else None
    return target if isinstance(target, str) else str(record["id"])


def parse_listing(host: Host, body: bytes) -> Listing:
    """
    A host's C{/v1/models} answer, checked for the shape the plan relies on.

    @raise InventoryError: not an OpenAI model list.
    """
    try:
        answer = json.loads(body)
        data = answer["data"]
        if not isinstance(data, list) or not all(
            isinstance(r, dict) and isinstance(r.get("id"), str) for r in data
        ):
            raise TypeError("data is not a list of records with an id")
    except (ValueError, KeyError, TypeError) as e:
        raise InventoryError(f"{host.url}/v1/models: not a model list ({e})") from None
    return Listing(host, tuple(data))


def fetch_listing(host: Host, api_key: str | None = None, timeout: float = 10.0) -> Listing:
    """
    Read C{host}'s C{/v1/models} (blocking: this runs in a command, not in the proxy).

    @raise InventoryError: unreachable, refused, or not a model list.
    """
    request = urllib.request.Request(f"{host.url}/v1/models")
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read()
    except (urllib.error.URLError, OSError) as e:
        raise InventoryError(f"{host.url}/v1/models: {e}; is llamaswap running there?") from None
    return parse_listing(host, body)
