# -*- test-case-name: tests.test_resources,tests.test_supervisor -*-
"""
The naming rules: what a requested model name means, decided in one place.

A request names a model by its id, one of its aliases, C{profile:model}, a
peer's C{<peer id>/<model>}, or a bare name one peer lists. L{Resolver.resolve}
turns that name into a L{LocalTarget} (a model we run) or a L{PeerTarget} (a
model another server runs), once per request, at the edge; everything after
(relay, supervisor, metrics) takes the target and never asks again.

The order, first match wins:

 1. a local model id or alias (exact: ids that contain C{:} or C{/} stay
    requestable);
 2. C{<peer id>/<model>}, a model that peer lists;
 3. C{profile:model}, a member of that profile;
 4. a bare name listed by exactly one peer (several: ambiguous, an error).

Every failure is a L{ModelNotFound} whose message names only what was asked.
"""

from __future__ import annotations

from attrs import field, frozen

from llamaswap.config import DEFAULT_GROUP_ID, Config, GroupConfig, ModelConfig, PeerConfig
from llamaswap.errors import ModelNotFound


@frozen(kw_only=True)
class LocalTarget:
    """A requested name that resolved to one of our models."""

    model: ModelConfig = field(eq=False, repr=False)
    requested: str  # the name as the client wrote it
    profile: str | None = None
    # The name the upstream should see in the body's "model", or None to keep it.
    upstream_model: str | None = None

    @property
    def model_id(self) -> str:
        return self.model.id

    @property
    def canonical(self) -> str:
        """The name metrics and events record: the model's id."""
        return self.model.id


@frozen(kw_only=True)
class PeerTarget:
    """A requested name that resolved to a peer's model."""

    peer: PeerConfig
    model: str  # the name the peer knows it by (the body's "model" upstream)

    @property
    def fqn(self) -> str:
        """The qualified name, C{<peer id>/<model>}."""
        return f"{self.peer.id}/{self.model}"

    @property
    def upstream_model(self) -> str:
        return self.model

    @property
    def canonical(self) -> str:
        """The name metrics and events record: the qualified name."""
        return self.fqn


Target = LocalTarget | PeerTarget


class Resolver:
    """The naming rules of one L{Config} (see the module docstring)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        # Ids and aliases in one table (an alias is never another model's id).
        self._names: dict[str, ModelConfig] = {}
        for model in config.models.values():
            for alias in model.aliases:
                self._names.setdefault(alias, model)
        self._names.update(config.models)
        self._groups: dict[str, GroupConfig] = {}
        grouped = {m for group in config.groups.values() for m in group.members}
        for group in config.groups.values():
            for member in group.members:
                self._groups.setdefault(member, group)
        self._default_group = GroupConfig(
            id=DEFAULT_GROUP_ID, members=tuple(m for m in config.models if m not in grouped)
        )

    def find_model(self, name: str) -> ModelConfig | None:
        """The model whose id or alias is C{name}, if any."""
        return self._names.get(name)

    def group_of(self, model_id: str) -> GroupConfig:
        """The group of model C{model_id}: its own, else the implicit default group."""
        return self._groups.get(model_id, self._default_group)

    def resolve(self, requested: str) -> Target:
        """
        What C{requested} names, local or peer (the order: module docstring).

        @raise ModelNotFound: nothing matches, or several peers list the name.
        """
        model = self._names.get(requested)
        if model is not None:
            return LocalTarget(
                model=model, requested=requested, upstream_model=model.use_model_name
            )
        peers = self.config.peers
        if peers:
            peer_id, sep, name = requested.partition("/")
            peer = peers.get(peer_id) if sep else None
            if peer is not None and name in peer.models:
                return PeerTarget(peer=peer, model=name)
        try:
            return self._profile(requested)
        except ModelNotFound:
            offering = [p for p in peers.values() if requested in p.models]
            if len(offering) > 1:
                choices = ", ".join(f"{p.id}/{requested}" for p in offering)
                raise ModelNotFound(
                    f"model {requested} is served by several peers; ask for {choices}"
                ) from None
            if offering:
                return PeerTarget(peer=offering[0], model=requested)
            raise

    def local(self, requested: str) -> LocalTarget:
        """
        The local model C{requested} names: an id, an alias or C{profile:model}
        (peers are not considered).

        @raise ModelNotFound: with a message that names only what was asked.
        """
        model = self._names.get(requested)
        if model is not None:
            return LocalTarget(
                model=model, requested=requested, upstream_model=model.use_model_name
            )
        return self._profile(requested)

    def _profile(self, requested: str) -> LocalTarget:
        """The C{profile:model} reading of C{requested} (not an id or alias)."""
        profile, sep, rest = requested.partition(":")
        if sep and profile:
            members = self.config.profiles.get(profile)
            if members is None:
                raise ModelNotFound(f"profile not found: {profile}")
            model = self._names.get(rest)
            if model is None or model.id not in members:
                raise ModelNotFound(f"model {rest} is not part of profile {profile}")
            return LocalTarget(
                model=model,
                requested=requested,
                profile=profile,
                upstream_model=model.use_model_name or rest,
            )
        raise ModelNotFound(f"model not found: {requested}")
