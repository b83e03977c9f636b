# -*- test-case-name: tests.test_fakeserver -*-
"""
A fake OpenAI-compatible upstream, standing in for llama-server.

Run it as ``python -m llamaswap.fakeserver --port N --name X`` (or
``python -m llamaswap.testing.fakeserver``). The demo
models of ``config.example.yaml``, the integration tests and the benchmarks
use it, so it needs no GPU and no model file. Every answer says who served it
(``X-Served-By`` header, ``served_by`` JSON field, "Hello from X (token i)"
content), and flags make it misbehave the way real upstreams do: slow to load
(``--startup-delay``), never healthy, exiting during start-up, crashing after
N requests, deaf to SIGTERM, leaving a grandchild in its process group.

On a fake GPU (the directory C{LLAMASWAP_FAKE_GPU} names; see
L{llamaswap.testing.fake_gpu} and the fake ``nvidia-smi``,
L{llamaswap.testing.nvidia_smi}), ``--gpu-memory SPEC`` (``12GiB``, or
``0=20GiB,1=20GiB``) takes memory before listening, on the first device of
``CUDA_VISIBLE_DEVICES`` unless SPEC names them, or exits 1 with
``CUDA error: out of memory (device N: need X MiB, free Y MiB)`` on stderr;
the memory is given back when the server exits, ``--gpu-release-delay S``
later (a SIGKILLed server's at once).

Connections can be handled the way llama-server's cpp-httplib does it (all off
by default; ``--like-llama-server`` turns on the first three):
``--http-threads N`` (N workers, each tied to one connection from accept to
close, idle keep-alive included; later connections wait unread, FIFO),
``--close-after-stream`` (close after every chunked answer, with no
``Connection: close``), ``--keep-alive-timeout S`` (silently close a connection
idle for S seconds), plus ``--accept-delay S`` (a new connection is read S after
its accept) and ``--read-delay S`` (every request is handled S after it arrived).

Routes (JSON unless said otherwise; errors use OpenAI's ``{"error": {...}}``):

- ``GET /health`` (503 ``{"status": "loading"}`` while loading), ``/v1/models``,
  ``/props``, ``/`` (text ``"GET /"``), ``/env``, ``/pid``, ``/gzip``.
- ``POST /v1/chat/completions``, ``/v1/completions``, ``/completion``,
  ``/infill``, ``/v1/messages`` (Anthropic), ``/v1/responses``: streamed when
  the body says ``"stream": true``. The body may set ``fake_tokens``,
  ``fake_token_delay`` (seconds between token events) and ``fake_delay``
  (seconds before answering; also ``?wait=500ms``); ``max_tokens`` cuts short.
- ``POST /v1/embeddings`` (8-d, deterministic, float or base64),
  ``/v1/rerank``, ``/v1/reranking``, ``/rerank``,
  ``/v1/messages/count_tokens``, ``/v1/audio/transcriptions`` (multipart),
  ``/v1/audio/speech``, ``GET /v1/audio/voices``, ``/v1/images/generations``,
  ``/v1/images/edits`` (multipart). While loading, every POST route answers 503.
- Test helpers: ``/slow-respond?echo=TEXT&delay=100ms``, ``/big?mb=N``,
  ``/sse?events=N[&delay=S]``, ``/status/<code>[?location=URL]``, ``/echo/...`` (any
  method), ``/exit?code=N`` (dies without answering), ``GET /debug/stats``
  (counters, connections included), ``GET /debug/disconnects``. ``/sse`` is
  paced by ``--token-delay`` unless ``?delay=`` says otherwise.

The tree also runs in-process (``StubTreq(build_root(FakeServer(FakeOptions(
name="x"), clock)))``), driven by a test clock. The connection options live in
L{FakeSite} and its channels, so they need ``FakeSite(build_root(fake), fake)``
(a real port, or ``buildProtocol`` on an in-memory transport), not StubTreq.

The modules: L{options} (the command line), L{server} (state, site and
connection behaviour), L{base} (what every route shares), L{openai},
L{anthropic} and L{probes} (the routes, by API), L{tree} (the resource tree),
L{helpers} (deterministic text, embeddings, scores), L{run} (the program).
"""

from llamaswap.testing.fakeserver.helpers import parse_duration
from llamaswap.testing.fakeserver.options import FakeOptions, parse_args
from llamaswap.testing.fakeserver.run import main, start_logging
from llamaswap.testing.fakeserver.server import FakeServer, FakeSite
from llamaswap.testing.fakeserver.tree import build_root

__all__ = [
    "FakeOptions",
    "FakeServer",
    "FakeSite",
    "build_root",
    "main",
    "parse_args",
    "parse_duration",
    "start_logging",
]
