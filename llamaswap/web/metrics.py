# -*- test-case-name: tests.test_metrics -*-
# twisted.web's Request and Resource are unannotated; everything else stays strict.
# mypy: disable-error-code="no-untyped-call"
"""C{GET /metrics}: the exposition of L{llamaswap.metrics.counters.Metrics}."""

from __future__ import annotations

import shutil
from typing import Any

from twisted.internet.interfaces import IReactorProcess
from twisted.web.server import Request

from llamaswap.config import Config
from llamaswap.events import EventBus
from llamaswap.jsonweb import JSONResource, answer_later
from llamaswap.metrics.counters import Metrics, StatusSource
from llamaswap.metrics.prometheus import CONTENT_TYPE


class MetricsResource(JSONResource):
    """C{GET /metrics}: the exposition (see L{llamaswap.metrics})."""

    isLeaf = True

    def __init__(self, metrics: Metrics) -> None:
        super().__init__()
        self._metrics = metrics

    def render_GET(self, request: Request) -> int:
        answer = self._metrics.collect().addCallback(lambda body: (200, CONTENT_TYPE, body))
        return answer_later(request, answer, cancel_if_gone=False)


def build_metrics_resource(
    config: Config, supervisor: StatusSource, events: EventBus, reactor: Any
) -> MetricsResource:
    """
    The resource mounted at C{/metrics}; GPU gauges if C{nvidia-smi} is on the
    PATH. C{config} is not read (the routes resolve names, the events carry
    the result); it stays for the caller in the resource tree.
    """
    nvidia_smi = shutil.which("nvidia-smi") if IReactorProcess.providedBy(reactor) else None
    return MetricsResource(Metrics(supervisor, events, reactor, nvidia_smi=nvidia_smi))
