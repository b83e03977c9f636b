# -*- test-case-name: tests.test_scaleout -*-
"""
Where each model name goes: the hosts that list it, grouped into one route
(an HAProxy backend) per distinct set of hosts, and the union of the hosts'
model lists that the front answers on C{/v1/models}.
"""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import Sequence
from typing import Any

from attrs import frozen

from llamaswap.scaleout.inventory import Host, InventoryError, Listing, model_of, names_of

# A name goes between single quotes in haproxy.cfg, which have no escape.
_UNWRITABLE = re.compile(r"['\x00-\x1f\x7f]")


@frozen
class Route:
    """The model names served by exactly these hosts, and the backend that holds them."""

    backend: str
    hosts: tuple[Host, ...]
    names: tuple[str, ...]


@frozen
class Plan:
    """
    Everything the front is built from.

    @ivar ids: each host's server id in HAProxy, derived from its name, so that
        the consistent hash places a host at the same points whatever the order
        or the number of hosts: adding or removing one moves only its models.
    @ivar aliases: each alias and the model id it names. The hash is on the
        id, so that a model asked for by any of its names stays on one host.
    @ivar skipped: names that cannot be written into haproxy.cfg (a quote or a
        control character); requests for them are answered 404 by the front.
    """

    hosts: tuple[Host, ...]
    ids: dict[str, int]
    routes: tuple[Route, ...]
    records: tuple[dict[str, Any], ...]
    aliases: dict[str, str]
    skipped: tuple[str, ...]

    @property
    def names(self) -> list[str]:
        return sorted(n for route in self.routes for n in route.names)


def server_id(name: str) -> int:
    """A stable HAProxy server id for the host called C{name} (1 to 99991)."""
    return zlib.crc32(name.encode("utf-8")) % 99991 + 1


def build_plan(listings: Sequence[Listing]) -> Plan:
    """
    Group the names the hosts list by the hosts that list them.

    @raise InventoryError: no host, two hosts with one name or one server id.
    """
    hosts = tuple(listing.host for listing in listings)
    if not hosts:
        raise InventoryError("no host given")
    ids: dict[str, int] = {}
    for host in hosts:
        if host.name in ids:
            raise InventoryError(f"two hosts are called {host.name}: name them (name=address)")
        ids[host.name] = server_id(host.name)
    if len(set(ids.values())) != len(ids):
        raise InventoryError("two host names give one HAProxy server id: rename one of them")

    served: dict[str, list[Host]] = {}
    aliases: dict[str, str] = {}
    skipped: set[str] = set()
    for listing in listings:
        for record in listing.records:
            model = model_of(record)
            for name in names_of(record):
                if not name or _UNWRITABLE.search(name) or _UNWRITABLE.search(model):
                    skipped.add(name)
                    continue
                if name != model:
                    aliases.setdefault(name, model)  # the first host's word, if they differ
                if listing.host not in served.setdefault(name, []):
                    served[name].append(listing.host)

    by_hosts: dict[tuple[Host, ...], list[str]] = {}
    for name, serving in served.items():
        by_hosts.setdefault(tuple(h for h in hosts if h in serving), []).append(name)
    routes = tuple(
        Route(
            "models_" + "_".join(str(hosts.index(h) + 1) for h in group),
            group,
            tuple(sorted(names)),
        )
        for group, names in sorted(by_hosts.items(), key=lambda item: _order(hosts, item[0]))
    )
    records = union_records(listings)
    return Plan(hosts, ids, routes, records, aliases, tuple(sorted(skipped)))


def _order(hosts: tuple[Host, ...], group: tuple[Host, ...]) -> tuple[int, ...]:
    return tuple(hosts.index(h) for h in group)


def union_records(listings: Sequence[Listing]) -> tuple[dict[str, Any], ...]:
    """
    One record per id listed by any host (the first host's, for its name,
    description and metadata), with C{meta.llamaswap.hosts}: the hosts that
    list it, by name. The C{status} is left out: it would be one host's, and
    stale. Peers' models are left out, as they route nowhere.
    """
    merged: dict[str, dict[str, Any]] = {}
    for listing in listings:
        for record in listing.records:
            rid = record["id"]
            if not names_of(record) or _UNWRITABLE.search(rid):
                continue
            if rid not in merged:
                copy = {k: v for k, v in record.items() if k != "status"}
                meta = dict(copy.get("meta", {}).get("llamaswap", {}))
                meta["hosts"] = []
                copy["meta"] = {**copy.get("meta", {}), "llamaswap": meta}
                merged[rid] = copy
            hosts: list[str] = merged[rid]["meta"]["llamaswap"]["hosts"]
            if listing.host.name not in hosts:
                hosts.append(listing.host.name)
    return tuple(merged[rid] for rid in sorted(merged, key=lambda i: i.encode("utf-8")))


def union_json(plan: Plan) -> bytes:
    """The front's C{/v1/models} answer."""
    return json.dumps({"object": "list", "data": list(plan.records)}).encode("utf-8")
