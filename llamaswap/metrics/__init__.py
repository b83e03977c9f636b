"""
C{/metrics}: Prometheus text exposition (version 0.0.4), always on.

 - L{llamaswap.metrics.counters}: L{Metrics}, the collector; our own series
   (requests, durations, model states, starts, failures, load times) fed by
   the event bus and read from the supervisor at scrape time;
 - L{llamaswap.metrics.hostinfo}: the host's readings at scrape time, from
   C{/proc} and, where it is installed, C{nvidia-smi};
 - L{llamaswap.metrics.prometheus}: the text format (pure).

The resource mounted at C{/metrics} is L{llamaswap.web.metrics}. Nothing is
imported here, so the pure format module stays importable on its own.
"""
