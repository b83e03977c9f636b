# -*- test-case-name: tests.test_resources -*-
"""
The routes about models rather than to them: the model list, what is running,
health, and the load/unload API. None of them starts a model except C{load}.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.web.server import Request

from llamaswap.config import Config, ConfigError, ModelConfig, PeerConfig, plain_json
from llamaswap.errors import InvalidConfig, ModelNotFound
from llamaswap.names import Resolver
from llamaswap.supervisor import Lease
from llamaswap.web.base import (
    JSON_TYPE,
    TEXT_TYPE,
    Answer,
    JSONResource,
    SupervisorAPI,
    json_bytes,
    render_answer,
    respond,
    respond_error,
    respond_json,
)

# States in which a model's process exists (llama-swap's "loaded").
LOADED_STATES = frozenset({"starting", "ready", "stopping"})
OWNER = "llama-swap"


def _model_id_from(request: Request) -> str:
    """The rest of the path (ids may contain C{/}), percent-decoded."""
    return "/".join(p.decode("utf-8", "replace") for p in request.postpath or [])


class ModelList(JSONResource):
    """
    C{GET /v1/models} (and C{/models}): OpenAI's list format, sorted by id,
    unlisted models hidden, aliases added with C{includeAliasesInList}, peers'
    models as C{<peer>/<model>}.
    C{GET /v1/models/<id>} answers one record.
    """

    isLeaf = True

    def __init__(self, config: Config, supervisor: SupervisorAPI, clock: IReactorTime) -> None:
        super().__init__()
        self._config = config
        self._supervisor = supervisor
        self._clock = clock

    def records(self) -> list[dict[str, Any]]:
        created = int(self._clock.seconds())
        records = []
        for model in self._config.models.values():
            if model.unlisted:
                continue
            loaded = self._supervisor.status(model.id).state in LOADED_STATES
            records.append(self._record(model, model.id, created, loaded))
            if self._config.include_aliases_in_list:
                records.extend(
                    self._record(model, alias, created, loaded, alias=True)
                    for alias in model.aliases
                )
        for peer in self._config.peers.values():
            records.extend(self._peer_record(peer, name, created) for name in peer.models)
        return sorted(records, key=lambda r: str(r["id"]).encode("utf-8"))

    @staticmethod
    def _peer_record(peer: PeerConfig, name: str, created: int) -> dict[str, Any]:
        # No "status": whether the peer has it loaded is the peer's business.
        meta = {"type": "peer", "peerID": peer.id, "model": name}
        return {
            "id": f"{peer.id}/{name}",
            "object": "model",
            "created": created,
            "owned_by": peer.id,
            "meta": {"llamaswap": meta},
        }

    def _record(
        self, model: ModelConfig, record_id: str, created: int, loaded: bool, alias: bool = False
    ) -> dict[str, Any]:
        record: dict[str, Any] = {
            "id": record_id,
            "object": "model",
            "created": created,
            "owned_by": OWNER,
        }
        if model.name:
            record["name"] = model.name
        if model.description:
            record["description"] = model.description
        meta: dict[str, Any] = {**plain_json(model.metadata), "type": "alias" if alias else "model"}
        if alias:
            meta["modelID"] = model.id
        if model.aliases:
            meta["aliases"] = list(model.aliases)
        record["meta"] = {"llamaswap": meta}
        record["status"] = {"value": "loaded" if loaded else "unloaded"}
        return record

    def render_GET(self, request: Request) -> bytes:
        origin = request.getHeader(b"origin")
        if origin:
            # Browsers call this cross-origin to fill model pickers.
            request.setHeader(b"Access-Control-Allow-Origin", origin)
            request.setHeader(b"Vary", b"Origin")
        records = self.records()
        wanted = _model_id_from(request)
        if not wanted:
            return respond_json(request, {"object": "list", "data": records})
        for record in records:
            if record["id"] == wanted:
                return respond_json(request, record)
        raise ModelNotFound(f"model not found: {wanted}")


def wait_seconds(wait: float | None) -> float | None:
    """A queue wait as shown to people: to the tenth of a second (None: nothing waits)."""
    return None if wait is None else round(wait, 1)


class Running(JSONResource):
    """
    C{GET /running}: every model whose process exists, sorted by id, with its
    queue (C{queued}, C{oldestWait}); also a model whose process does not
    exist (yet) while requests wait for it, so that no queued request is
    invisible here. With memory admission on, each model's C{memory}
    (declared, measured, holds: bytes by device) and the devices' budgets.
    """

    isLeaf = True

    def __init__(self, config: Config, supervisor: SupervisorAPI) -> None:
        super().__init__()
        self._config = config
        self._supervisor = supervisor

    def render_GET(self, request: Request) -> bytes:
        running = []
        for status in sorted(self._supervisor.statuses(), key=lambda s: s.model_id):
            if status.state not in LOADED_STATES and not status.queued:
                continue
            model = self._config.models.get(status.model_id)
            if model is None:  # removed by a reload; its server drains
                running.append({"model": status.model_id, "state": status.state, "removed": True})
                continue
            memory = {} if status.memory is None else {"memory": status.memory}
            running.append(
                {
                    "model": model.id,
                    "state": status.state,
                    "cmd": model.cmd_line,
                    "proxy": model.proxy,
                    "ttl": model.ttl,
                    "name": model.name,
                    "description": model.description,
                    "pid": status.pid,
                    "inFlight": status.in_flight,
                    "ttlRemaining": status.ttl_remaining,
                    "queued": status.queued,
                    "oldestWait": wait_seconds(status.oldest_wait),
                    **memory,
                }
            )
        devices = self._supervisor.memory_summary()
        return respond_json(
            request, {"running": running, **({} if devices is None else {"memory": devices})}
        )


class Health(JSONResource):
    """C{GET /health}: C{OK} (no auth; starts nothing)."""

    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        return respond(request, 200, b"OK", TEXT_TYPE)


class LegacyUnload(JSONResource):
    """C{GET /unload}: stop every model (without waiting for in-flight requests)."""

    isLeaf = True

    def __init__(self, supervisor: SupervisorAPI) -> None:
        super().__init__()
        self._supervisor = supervisor

    def render_GET(self, request: Request) -> int:
        def unload() -> Deferred[Answer]:
            return self._supervisor.unload(None).addCallback(lambda _: (200, TEXT_TYPE, b"OK"))

        return render_answer(request, unload, cancel=False)


class UnloadAPI(JSONResource):
    """
    C{POST /api/models/unload}: stop every model, C{{"msg": "ok"}};
    C{POST /api/models/unload/<id or alias>}: stop that one, C{OK}; unknown: 404.
    """

    isLeaf = True

    def __init__(self, supervisor: SupervisorAPI) -> None:
        super().__init__()
        self._supervisor = supervisor

    def render_POST(self, request: Request) -> int:
        model_id = _model_id_from(request)

        def unload() -> Deferred[Answer]:
            if not model_id:
                done = self._supervisor.unload(None)
                return done.addCallback(lambda _: (200, JSON_TYPE, json_bytes({"msg": "ok"})))
            return self._supervisor.unload(model_id).addCallback(lambda _: (200, TEXT_TYPE, b"OK"))

        return render_answer(request, unload, cancel=False)


class LoadAPI(JSONResource):
    """
    C{GET|POST /api/models/load/<id or alias>}: start the model (swapping as a
    request would) and answer once it is ready; the client leaving cancels.
    """

    isLeaf = True

    def __init__(self, supervisor: SupervisorAPI, names: Resolver) -> None:
        super().__init__()
        self._supervisor = supervisor
        self._names = names

    def render_GET(self, request: Request) -> int:
        model_id = _model_id_from(request)
        if not model_id:
            raise ModelNotFound("no model named in the path: /api/models/load/<model>")
        target = self._names.local(model_id)  # raises ModelNotFound: a 404

        def ready(lease: Lease) -> Answer:
            lease.release()
            return 200, JSON_TYPE, json_bytes({"msg": "ok", "model": lease.model.id})

        return render_answer(request, lambda: self._supervisor.acquire(target).addCallback(ready))

    render_POST = render_GET


# Reloads the config file and answers what changed; raises ConfigError for an invalid one.
Reload = Callable[[str], dict[str, Any]]


class ReloadAPI(JSONResource):
    """
    C{POST /api/config/reload}: read the config file again and apply it
    (docs/deployment.md); C{200} with what changed, or C{400}
    C{invalid_config} with the one-line error (nothing changed).
    """

    isLeaf = True

    def __init__(self, reload: Reload) -> None:
        super().__init__()
        self._reload = reload

    def render_POST(self, request: Request) -> bytes:
        try:
            result = self._reload("api")
        except ConfigError as e:
            return respond_error(request, InvalidConfig(f"config not reloaded: {e}"))
        return respond_json(request, result)
