# -*- test-case-name: tests.test_resources,tests.test_metrics -*-
"""
Our resource tree (L{llamaswap.resources.build_root}) over a fake supervisor and
a recording upstream, driven through L{SiteClient}: the fixture of the web tests.
"""

from __future__ import annotations

from typing import Any

from treq.testing import StubTreq
from twisted.internet.task import Clock

from llamaswap.events import EventBus
from llamaswap.logs import LogHub
from llamaswap.testing.web import CONFIG, FakeSupervisor, RecordingUpstream, SiteClient, make_config
from llamaswap.web.tree import build_root


class ResourceTreeHarness:
    """Our root over a fake supervisor and a recording upstream."""

    def __init__(self, text: str = CONFIG, **config_changes: Any) -> None:
        self.config = make_config(text, **config_changes)
        self.supervisor = FakeSupervisor(self.config)
        self.upstream = RecordingUpstream()
        self.events = EventBus()
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.root = build_root(
            self.config,
            supervisor=self.supervisor,  # type: ignore[arg-type]
            logs=LogHub(self.config, events=self.events),
            events=self.events,
            http=StubTreq(self.upstream),  # type: ignore[arg-type]
            reactor=self.clock,
        )
        self.client = SiteClient(
            self.root,
            events=self.events,
            clock=self.clock,
            max_body_size=self.config.max_body_size,
        )

    def sent(self) -> dict[str, Any]:
        """What the upstream received last."""
        return self.upstream.requests[-1]


PEER_CONFIG = (
    CONFIG
    + """
peers:
  remote:
    proxy: http://peer.test:8080/base/
    models: [llama, alpha, "org/big"]
    apiKey: sk-peer
    filters:
      setParams: {temperature: 0.25}
  open:
    proxy: http://open.test
    models: [small, llama]
"""
)
