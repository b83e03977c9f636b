# -*- test-case-name: tests.test_reload -*-
"""
What a config reload changes, model by model (docs/deployment.md, "Reloading
the configuration"): pure, so the supervisor and the reload's answer agree.
"""

from __future__ import annotations

from attrs import frozen

from llamaswap.config.schema import Config, ModelConfig

# The settings that make a model's running server a different server: a change to
# one of them restarts it (after its requests in flight); any other applies at once.
RESTART_FIELDS = ("cmd", "proxy", "env")


@frozen
class ConfigDiff:
    """Model ids by what the reload does to them, each sorted."""

    added: tuple[str, ...]  # available at once
    removed: tuple[str, ...]  # drain, then stop
    restarted: tuple[str, ...]  # drain, then stop; the next request starts the new server
    updated: tuple[str, ...]  # other settings: applied at once, the server keeps running
    unchanged: tuple[str, ...]

    def summary(self) -> dict[str, list[str]]:
        return {
            "added": list(self.added),
            "removed": list(self.removed),
            "restarted": list(self.restarted),
            "updated": list(self.updated),
        }


def needs_restart(old: ModelConfig, new: ModelConfig) -> bool:
    return any(getattr(old, name) != getattr(new, name) for name in RESTART_FIELDS)


def diff_configs(old: Config, new: Config) -> ConfigDiff:
    kept = sorted(set(old.models) & set(new.models))
    restarted = [m for m in kept if needs_restart(old.models[m], new.models[m])]
    changed = [m for m in kept if old.models[m] != new.models[m]]
    return ConfigDiff(
        added=tuple(sorted(set(new.models) - set(old.models))),
        removed=tuple(sorted(set(old.models) - set(new.models))),
        restarted=tuple(restarted),
        updated=tuple(m for m in changed if m not in restarted),
        unchanged=tuple(m for m in kept if m not in changed),
    )


def restart_only(old: Config, new: Config) -> str | None:
    """Why C{new} cannot be applied by a reload (a setting only a restart changes), or None."""
    if old.memory != new.memory:
        return "memory: the memory section changed; restart llamaswap to apply it"
    return None
