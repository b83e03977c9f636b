# -*- test-case-name: tests.test_metrics -*-
"""C{GET /metrics}: the exposition of L{llamaswap.metrics.counters.Metrics}."""

from __future__ import annotations

import shutil
from typing import Any

from twisted.internet.interfaces import IReactorProcess
from twisted.web.server import Request

from llamaswap.events import EventBus
from llamaswap.metrics.counters import Metrics, QueueSource
from llamaswap.metrics.prometheus import CONTENT_TYPE
from llamaswap.web.base import JSONResource, render_answer


class MetricsResource(JSONResource):
    """C{GET /metrics}: the exposition (see L{llamaswap.metrics})."""

    isLeaf = True

    def __init__(self, metrics: Metrics) -> None:
        super().__init__()
        self._metrics = metrics

    def render_GET(self, request: Request) -> int:
        # A reading already started is not worth cancelling: it is bounded by the GPU timeout.
        return render_answer(
            request,
            lambda: self._metrics.collect().addCallback(lambda body: (200, CONTENT_TYPE, body)),
            cancel=False,
        )


def build_metrics_resource(
    supervisor: QueueSource, events: EventBus, reactor: Any
) -> MetricsResource:
    """The resource mounted at C{/metrics}; GPU gauges if C{nvidia-smi} is on the PATH."""
    nvidia_smi = shutil.which("nvidia-smi") if IReactorProcess.providedBy(reactor) else None
    return MetricsResource(Metrics(supervisor, events, reactor, nvidia_smi=nvidia_smi))
