# -*- test-case-name: tests.test_memory -*-
"""
Measured memory, remembered across restarts in a small JSON file (by
default next to the config). Each figure carries a fingerprint of the
model's command and environment: a changed command (another context size,
another quantisation) is measured again.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping

from twisted.logger import Logger

from llamaswap.config import ModelConfig

VERSION = 1


def fingerprint(model: ModelConfig) -> str:
    """
    What decides a server's memory: its command line and environment, but not
    the port C{${PORT}} gave it (adding a model may shift every port).
    """
    line = model.cmd_line
    if model.port is not None:
        line = re.sub(rf"\b{model.port}\b", "${PORT}", line)
    text = json.dumps([line, sorted(model.env.items())])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class MeasuredStore:
    """Figures by model id; a file that cannot be read or written is logged once, not fatal."""

    log = Logger()

    def __init__(self, path: str) -> None:
        self.path = path
        self._entries: dict[str, dict[str, object]] = {}
        self._warned = False
        # Fingerprints by the model object (kept alive here): statuses ask for them often.
        self._fingerprints: dict[int, tuple[ModelConfig, str]] = {}
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            models = data.get("models", {}) if isinstance(data, dict) else {}
            self._entries = {k: v for k, v in models.items() if isinstance(v, dict)}
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as e:
            self.log.warn(
                "memory: cannot read {path} ({error}); models will be measured again",
                path=path,
                error=str(e),
            )

    def get(self, model: ModelConfig) -> dict[str, int] | None:
        """The figure measured for this model's current command, if any."""
        entry = self._entries.get(model.id)
        if entry is None or entry.get("fingerprint") != self._fingerprint(model):
            return None
        devices = entry.get("bytes")
        if not isinstance(devices, dict):
            return None
        return {str(k): int(v) for k, v in devices.items() if isinstance(v, int)}

    def _fingerprint(self, model: ModelConfig) -> str:
        cached = self._fingerprints.get(id(model))
        if cached is None:
            cached = self._fingerprints[id(model)] = (model, fingerprint(model))
        return cached[1]

    def put(self, model: ModelConfig, usage: Mapping[str, int], when: float) -> None:
        """Remember C{usage} (bytes by device) and write the file at once."""
        self._entries[model.id] = {
            "fingerprint": self._fingerprint(model),
            "bytes": dict(usage),
            "measuredAt": round(when, 3),
        }
        text = json.dumps({"version": VERSION, "models": self._entries}, indent=1, sort_keys=True)
        temporary = f"{self.path}.{os.getpid()}.tmp"
        try:
            with open(temporary, "w", encoding="utf-8") as f:
                f.write(text + "\n")
            os.replace(temporary, self.path)  # readers never see half a file
        except OSError as e:
            if not self._warned:
                self._warned = True
                self.log.warn(
                    "memory: cannot write {path} ({error}); measured figures last until "
                    "the proxy stops (set memory.stateFile to a writable path)",
                    path=self.path,
                    error=e.strerror,
                )
