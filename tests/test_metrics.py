"""
Tests for L{llamaswap.metrics}: the Prometheus exposition at C{/metrics}, its
counters (fed by the event bus), host readings (from a fake C{/proc} tree,
and the real one), GPU gauges from a fake C{nvidia-smi}, and the real service.
"""

from __future__ import annotations

import json
import os
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from llamaswap.events import EventBus
from llamaswap.metrics.counters import Metrics
from llamaswap.metrics.hostinfo import cpu_times, gpu_families, meminfo, net_bytes
from llamaswap.metrics.prometheus import CONTENT_TYPE, exposition, family
from llamaswap.testing.web import FakeSupervisor, post_json
from llamaswap.testing.web import make_config as web_config
from tests.exposition import parse_exposition
from tests.fakeserver_helper import fake_model, make_config
from tests.live_proxy import Proxy
from tests.proctools import sleep
from tests.resource_tree import PEER_CONFIG, ResourceTreeHarness

STAT = """\
cpu  100 0 100 800 0 0 0 0 0 0
cpu0 50 0 50 400 0 0 0 0 0 0
cpu1 50 0 50 400 0 0 0 0 0 0
intr 12345
"""
MEMINFO = """\
MemTotal:       1000 kB
MemFree:         100 kB
MemAvailable:    400 kB
SwapTotal:       200 kB
SwapFree:        150 kB
"""
NET_DEV = """\
Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo:     100       1    0    0    0     0          0         0      100       1    0    0    0     0       0          0
  eth0:    5000      10    0    0    0     0          0         0     7000      12    0    0    0     0       0          0
"""  # noqa: E501
NVIDIA_CSV = """\
0, NVIDIA GeForce RTX 4090, GPU-aaaa, 54, 97, 40, 20000, 24564, 30, 350.25
1, Tesla "P40", GPU-bbbb, 40, 0, 0, 10, 24576, [N/A], [N/A]
"""


class FakeProc:
    """A fake C{/proc} tree with stat, meminfo, loadavg and net/dev."""

    def __init__(self, case: SynchronousTestCase) -> None:
        self.path = Path(case.mktemp())
        (self.path / "net").mkdir(parents=True)
        self.write("stat", STAT)
        self.write("meminfo", MEMINFO)
        self.write("loadavg", "0.50 1.25 2.00 1/100 4242\n")
        self.write("net/dev", NET_DEV)

    def write(self, name: str, text: str) -> None:
        (self.path / name).write_text(text)


def collect(metrics: Metrics, case: SynchronousTestCase) -> dict[str, float]:
    return parse_exposition(case.successResultOf(metrics.collect()).decode())


class ParserTests(SynchronousTestCase):
    def test_proc_files(self) -> None:
        """C{/proc/stat}, C{meminfo} and C{net/dev} are read as documented."""
        self.assertEqual(cpu_times(STAT), {"all": (200, 1000), "0": (100, 500), "1": (100, 500)})
        self.assertEqual(meminfo(MEMINFO)["MemAvailable"], 400 * 1024)
        self.assertEqual(net_bytes(NET_DEV), [("lo", 100, 100), ("eth0", 5000, 7000)])

    def test_gpu_csv(self) -> None:
        """nvidia-smi's CSV becomes labelled gauges; MiB become bytes; N/A values are left out."""
        samples = {
            (f.name, labels, value)
            for f in gpu_families(NVIDIA_CSV)
            for _, labels, value in f.samples
        }
        first = (("id", "0"), ("name", "NVIDIA GeForce RTX 4090"), ("uuid", "GPU-aaaa"))
        second = (("id", "1"), ("name", 'Tesla "P40"'), ("uuid", "GPU-bbbb"))
        self.assertIn(("llamaswap_gpu_power_draw_watts", first, 350.25), samples)
        self.assertIn(("llamaswap_gpu_memory_used_bytes", first, 20000 * 1024 * 1024), samples)
        self.assertIn(("llamaswap_gpu_memory_total_bytes", second, 24576 * 1024 * 1024), samples)
        self.assertNotIn(
            "llamaswap_gpu_fan_speed_percent", {n for n, labels, _ in samples if labels == second}
        )
        self.assertEqual(len(samples), 7 + 5)


class MetricsTests(SynchronousTestCase):
    """The collector on a fake clock, a fake supervisor and a fake /proc."""

    def setUp(self) -> None:
        self.config = web_config(PEER_CONFIG)
        self.supervisor = FakeSupervisor(self.config)
        self.events = EventBus()
        self.clock = Clock()
        self.proc = FakeProc(self)
        self.metrics = Metrics(self.supervisor, self.events, self.clock, proc=str(self.proc.path))

    def test_requests_by_canonical_model(self) -> None:
        """Aliases count under their model, peers under their FQN, unknown names under ""."""
        # "target" is the site's resolution of "model" (the route resolves, metrics does not).
        for model, target, status, duration in [
            ("a1", "alpha", 200, 0.5),
            ("alpha", "alpha", 200, 0.25),
            ("duo:beta", "beta", 502, 1.0),
            ("small", "open/small", 200, 2.0),
            ("made-up-name-1", "", 404, 0.001),
            ("made-up-name-2", "", 404, 0.001),
            (None, "", 400, 0.001),
        ]:
            self.events.publish(
                "request",
                {"model": model, "target": target, "status": status, "duration": duration},
            )
        samples = collect(self.metrics, self)
        self.assertEqual(samples['llamaswap_requests_total{model="alpha",status="200"}'], 2)
        self.assertEqual(samples['llamaswap_requests_total{model="beta",status="502"}'], 1)
        self.assertEqual(samples['llamaswap_requests_total{model="open/small",status="200"}'], 1)
        self.assertEqual(samples['llamaswap_requests_total{model="",status="404"}'], 2)
        self.assertEqual(samples['llamaswap_requests_total{model="",status="400"}'], 1)
        self.assertEqual(samples['llamaswap_request_duration_seconds_sum{model="alpha"}'], 0.75)
        self.assertEqual(samples['llamaswap_request_duration_seconds_count{model="alpha"}'], 2)

    def test_model_lifecycle(self) -> None:
        """Starts, failed starts and load times come from transitions; states from statuses."""

        def status(model: str, state: str) -> None:
            self.events.publish("modelStatus", {"model": model, "state": state, "pid": 1})

        status("alpha", "starting")
        self.clock.advance(2.5)
        status("alpha", "ready")
        status("alpha", "ready")  # an update without a transition
        status("alpha", "stopping")
        status("alpha", "stopped")
        status("alpha", "starting")
        self.clock.advance(1.5)
        status("alpha", "ready")
        status("beta", "starting")
        self.clock.advance(9)
        status("beta", "failed")
        self.supervisor.states["alpha"] = "ready"
        samples = collect(self.metrics, self)
        self.assertEqual(samples['llamaswap_model_starts_total{model="alpha"}'], 2)
        self.assertEqual(samples['llamaswap_model_starts_total{model="beta"}'], 1)
        self.assertEqual(samples['llamaswap_model_starts_total{model="hidden"}'], 0)
        self.assertEqual(samples['llamaswap_model_start_failures_total{model="beta"}'], 1)
        self.assertEqual(samples['llamaswap_model_start_failures_total{model="alpha"}'], 0)
        self.assertEqual(samples['llamaswap_model_load_seconds_sum{model="alpha"}'], 4.0)
        self.assertEqual(samples['llamaswap_model_load_seconds_count{model="alpha"}'], 2)
        self.assertNotIn('llamaswap_model_load_seconds_count{model="beta"}', samples)
        self.assertEqual(samples['llamaswap_model_state{model="alpha",state="ready"}'], 1)
        self.assertEqual(samples['llamaswap_model_state{model="alpha",state="stopped"}'], 0)
        self.assertEqual(samples['llamaswap_model_state{model="beta",state="stopped"}'], 1)
        self.assertEqual(samples['llamaswap_model_in_flight{model="alpha"}'], 0)

    def test_queue_now(self) -> None:
        """Queue length and oldest wait are gauges read from the statuses (0 when none waits)."""
        self.supervisor.queued.update(alpha=3, beta=1)
        self.supervisor.oldest_wait.update(alpha=12.5, beta=0.25)
        samples = collect(self.metrics, self)
        self.assertEqual(samples['llamaswap_queue_length{model="alpha"}'], 3)
        self.assertEqual(samples['llamaswap_queue_length{model="beta"}'], 1)
        self.assertEqual(samples['llamaswap_queue_length{model="hidden"}'], 0)
        self.assertEqual(samples['llamaswap_queue_oldest_wait_seconds{model="alpha"}'], 12.5)
        self.assertEqual(samples['llamaswap_queue_oldest_wait_seconds{model="beta"}'], 0.25)
        self.assertEqual(samples['llamaswap_queue_oldest_wait_seconds{model="hidden"}'], 0)
        self.supervisor.queued.clear()
        self.supervisor.oldest_wait.clear()
        samples = collect(self.metrics, self)
        self.assertEqual(samples['llamaswap_queue_length{model="alpha"}'], 0)
        self.assertEqual(samples['llamaswap_queue_oldest_wait_seconds{model="alpha"}'], 0)

    def test_queue_wait_histogram(self) -> None:
        """
        The waits are a Prometheus histogram: cumulative buckets up to C{+Inf},
        C{_sum} and C{_count}, for every configured model (zeros before any wait).
        """
        for seconds in (0.0, 0.3, 7.0, 1000.0):
            self.supervisor.stats.waited("alpha", seconds)
        text = self.successResultOf(self.metrics.collect()).decode()
        samples = parse_exposition(text)  # also checks that buckets are cumulative
        self.assertIn("# TYPE llamaswap_queue_wait_seconds histogram\n", text)
        bucket = 'llamaswap_queue_wait_seconds_bucket{{model="alpha",le="{}"}}'
        expected = {"0.005": 1, "0.05": 1, "0.25": 1, "1": 2, "2.5": 2, "5": 2, "10": 3}
        expected.update({"30": 3, "60": 3, "120": 3, "300": 3, "600": 3, "+Inf": 4})
        self.assertEqual(
            {le: samples[bucket.format(le)] for le in expected},
            expected,
        )
        self.assertEqual(samples['llamaswap_queue_wait_seconds_count{model="alpha"}'], 4)
        self.assertEqual(samples['llamaswap_queue_wait_seconds_sum{model="alpha"}'], 1007.3)
        self.assertEqual(samples['llamaswap_queue_wait_seconds_bucket{model="beta",le="+Inf"}'], 0)
        self.assertEqual(samples['llamaswap_queue_wait_seconds_count{model="beta"}'], 0)
        # One series per model: 13 buckets, _sum and _count, in the order Prometheus expects.
        lines = [line for line in text.splitlines() if line.startswith("llamaswap_queue_wait")]
        self.assertEqual(len(lines), 15 * len(self.config.models))
        self.assertEqual(
            lines[12:15],
            [
                'llamaswap_queue_wait_seconds_bucket{model="alpha",le="+Inf"} 4',
                'llamaswap_queue_wait_seconds_sum{model="alpha"} 1007.3',
                'llamaswap_queue_wait_seconds_count{model="alpha"} 4',
            ],
        )

    def test_swaps_and_refusals(self) -> None:
        """Swaps by model and reason, refusals by model and status: counters, zeros included."""
        stats = self.supervisor.stats
        stats.swaps[("alpha", "request")] += 2
        stats.swaps[("alpha", "evict")] += 1
        stats.swaps[("beta", "ttl")] += 1
        stats.refused[("alpha", 429)] += 1
        stats.refused[("beta", 503)] += 2
        text = self.successResultOf(self.metrics.collect()).decode()
        samples = parse_exposition(text)
        self.assertIn("# TYPE llamaswap_model_swaps_total counter\n", text)
        self.assertIn("# TYPE llamaswap_queue_refused_total counter\n", text)
        swaps = 'llamaswap_model_swaps_total{{model="{}",reason="{}"}}'
        self.assertEqual(samples[swaps.format("alpha", "request")], 2)
        self.assertEqual(samples[swaps.format("alpha", "evict")], 1)
        self.assertEqual(samples[swaps.format("beta", "ttl")], 1)
        for reason in ("request", "evict", "ttl", "unload", "exit", "shutdown", "failed", "reload"):
            self.assertEqual(samples[swaps.format("hidden", reason)], 0)
        refused = 'llamaswap_queue_refused_total{{model="{}",status="{}"}}'
        self.assertEqual(samples[refused.format("alpha", "429")], 1)
        self.assertEqual(samples[refused.format("alpha", "503")], 0)
        self.assertEqual(samples[refused.format("beta", "503")], 2)
        self.assertEqual(samples[refused.format("hidden", "429")], 0)

    def test_host_readings(self) -> None:
        """Memory, swap, load, network from /proc; CPU as a percentage since the last scrape."""
        self.proc.write("stat", STAT.replace("cpu  100 0 100 800", "cpu  150 0 150 900"))
        samples = collect(self.metrics, self)
        self.assertEqual(samples["llamaswap_memory_total_bytes"], 1000 * 1024)
        self.assertEqual(samples["llamaswap_memory_used_bytes"], 600 * 1024)
        self.assertEqual(samples["llamaswap_memory_free_bytes"], 400 * 1024)
        self.assertEqual(samples["llamaswap_swap_total_bytes"], 200 * 1024)
        self.assertEqual(samples["llamaswap_swap_used_bytes"], 50 * 1024)
        self.assertEqual(samples['llamaswap_load_average{interval="5m"}'], 1.25)
        self.assertEqual(
            samples['llamaswap_network_bytes_total{interface="eth0",direction="sent"}'], 7000
        )
        # 100 of 200 ticks busy since the collector was made; cores did not move.
        self.assertEqual(samples['llamaswap_cpu_util_percent{core="all"}'], 50.0)
        self.assertNotIn('llamaswap_cpu_util_percent{core="0"}', samples)
        self.proc.write("stat", STAT.replace("cpu  100 0 100 800", "cpu  160 0 150 990"))
        samples = collect(self.metrics, self)
        self.assertEqual(samples['llamaswap_cpu_util_percent{core="all"}'], 10.0)
        # Nothing moved since: the last figure stays.
        self.assertEqual(
            collect(self.metrics, self)['llamaswap_cpu_util_percent{core="all"}'], 10.0
        )

    def test_missing_proc_files(self) -> None:
        """Without /proc (another OS) the host families are left out; ours remain."""
        metrics = Metrics(self.supervisor, self.events, self.clock, proc=self.mktemp())
        text = self.successResultOf(metrics.collect()).decode()
        parse_exposition(text)
        self.assertNotIn("llamaswap_memory_total_bytes", text)
        self.assertIn('llamaswap_model_state{model="alpha",state="stopped"} 1', text)

    def test_label_values_escaped(self) -> None:
        """Backslashes, quotes and newlines in label values are escaped."""
        config = web_config(
            "models:\n  'we\"ird\\id':\n    cmd: x\n    proxy: http://127.0.0.1:1\n"
        )
        metrics = Metrics(FakeSupervisor(config), EventBus(), self.clock, proc=self.mktemp())
        text = self.successResultOf(metrics.collect()).decode()
        self.assertIn('llamaswap_model_in_flight{model="we\\"ird\\\\id"} 0\n', text)
        parse_exposition(text)
        line = family("x", "gauge", "h", [({"l": "a\nb"}, 1)])
        self.assertEqual(exposition([line]), b'# HELP x h\n# TYPE x gauge\nx{l="a\\nb"} 1\n')


class MetricsRouteTests(SynchronousTestCase):
    def test_route(self) -> None:
        """C{GET /metrics} answers the exposition with Prometheus' content type; HEAD too."""
        h = ResourceTreeHarness(PEER_CONFIG)
        post_json(h.client, "/v1/chat/completions", {"model": "a1"})
        post_json(h.client, "/v1/chat/completions", {"model": "remote/llama"})
        post_json(h.client, "/v1/chat/completions", {"model": "nope"})
        response = h.client.request("GET", "/metrics")
        self.assertEqual(response.status, 200)
        self.assertEqual(response.header("content-type"), CONTENT_TYPE.decode())
        samples = parse_exposition(response.body.decode())
        self.assertEqual(samples['llamaswap_requests_total{model="alpha",status="200"}'], 1)
        self.assertEqual(samples['llamaswap_requests_total{model="remote/llama",status="200"}'], 1)
        self.assertEqual(samples['llamaswap_requests_total{model="",status="404"}'], 1)
        head = h.client.request("HEAD", "/metrics")
        self.assertEqual((head.status, head.body), (200, b""))
        self.assertEqual(h.client.request("POST", "/metrics", b"").status, 405)

    def test_behind_api_keys(self) -> None:
        """With C{apiKeys}, /metrics needs a key like every route but /health."""
        h = ResourceTreeHarness(api_keys=("k",))
        self.assertEqual(h.client.request("GET", "/metrics").status, 401)
        ok = h.client.request("GET", "/metrics", headers={"Authorization": "Bearer k"})
        self.assertEqual(ok.status, 200)


def fake_nvidia_smi(case: TestCase, script: str) -> str:
    """An executable standing in for nvidia-smi; it records its arguments."""
    folder = Path(case.mktemp())
    folder.mkdir()
    path = folder / "nvidia-smi"
    body = textwrap.dedent(script)
    path.write_text(
        f"#!{sys.executable}\nimport json, sys, time\n"
        f"open({str(folder / 'args')!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n{body}"
    )
    path.chmod(0o755)
    return str(path)


class GPUTests(TestCase):
    """GPU gauges from a real child process playing nvidia-smi."""

    timeout = 30

    def metrics(self, nvidia_smi: str, gpu_timeout: float = 5.0) -> Metrics:
        config = web_config()
        return Metrics(
            FakeSupervisor(config),
            EventBus(),
            reactor,
            nvidia_smi=nvidia_smi,
            gpu_timeout=gpu_timeout,
        )

    async def test_gauges(self) -> None:
        """Each scrape runs nvidia-smi with the documented query and adds its gauges."""
        program = fake_nvidia_smi(self, f"sys.stdout.write({NVIDIA_CSV!r})\n")
        text = (await self.metrics(program).collect()).decode()
        samples = parse_exposition(text)
        self.assertEqual(
            samples[
                'llamaswap_gpu_temperature_celsius{id="0",name="NVIDIA GeForce RTX 4090",'
                'uuid="GPU-aaaa"}'
            ],
            54,
        )
        self.assertIn('name="Tesla \\"P40\\""', text)
        self.assertIn("llamaswap_memory_total_bytes", text)  # the rest is still there
        args = json.loads((Path(program).parent / "args").read_text().splitlines()[0])
        self.assertEqual(args[1], "--format=csv,noheader,nounits")
        self.assertTrue(args[0].startswith("--query-gpu=index,name,uuid,"))

    async def test_one_run_at_a_time(self) -> None:
        """Scrapes arriving while nvidia-smi runs share its answer (one child, not one each)."""
        program = fake_nvidia_smi(self, f"time.sleep(0.3)\nsys.stdout.write({NVIDIA_CSV!r})\n")
        metrics = self.metrics(program)
        texts = await gatherResults([metrics.collect() for _ in range(5)])
        for text in texts:
            self.assertIn(b"llamaswap_gpu_power_draw_watts", text)
        self.assertEqual(len((Path(program).parent / "args").read_text().splitlines()), 1)
        await metrics.collect()  # the next scrape runs it again
        self.assertEqual(len((Path(program).parent / "args").read_text().splitlines()), 2)

    async def test_failure_and_timeout(self) -> None:
        """A failing or hung nvidia-smi leaves the GPU gauges out (warned once); hung: killed."""
        warnings: list[dict[str, Any]] = []

        def observe(event: dict[str, Any]) -> None:
            if "no GPU gauges" in str(event.get("log_format", "")):
                warnings.append(event)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        failing = self.metrics(fake_nvidia_smi(self, "sys.exit(9)\n"))
        for _ in range(2):
            text = (await failing.collect()).decode()
            self.assertNotIn("llamaswap_gpu_", text)
            self.assertIn("llamaswap_model_state", text)
        self.assertEqual(len(warnings), 1)
        hung = fake_nvidia_smi(
            self,
            "import os\nopen(sys.argv[0] + '.pid', 'w').write(str(os.getpid()))\ntime.sleep(60)\n",
        )
        text = (await self.metrics(hung, gpu_timeout=0.5).collect()).decode()
        self.assertNotIn("llamaswap_gpu_", text)
        pid = int(Path(hung + ".pid").read_text())
        self.assertRaises(ProcessLookupError, os.kill, pid, 0)  # killed and reaped


class ServiceTests(TestCase):
    """/metrics of the real service, a real model and the real /proc."""

    timeout = 60

    async def test_real_service(self) -> None:
        """After a request: its count and duration, the model's start, load time and state, host."""
        proxy = Proxy(self, make_config({"alpha": fake_model("alpha"), "beta": fake_model("beta")}))
        status, _, _ = await proxy.post_json(
            "/v1/chat/completions", {"model": "alpha", "messages": []}
        )
        self.assertEqual(status, 200)
        status, headers, body = await proxy.call("GET", "/metrics")
        self.assertEqual(status, 200)
        self.assertEqual(headers["content-type"], CONTENT_TYPE.decode())
        samples = parse_exposition(body.decode())
        self.assertEqual(samples['llamaswap_requests_total{model="alpha",status="200"}'], 1)
        self.assertGreater(samples['llamaswap_request_duration_seconds_sum{model="alpha"}'], 0)
        self.assertEqual(samples['llamaswap_model_starts_total{model="alpha"}'], 1)
        self.assertEqual(samples['llamaswap_model_load_seconds_count{model="alpha"}'], 1)
        self.assertGreater(samples['llamaswap_model_load_seconds_sum{model="alpha"}'], 0)
        self.assertEqual(samples['llamaswap_model_state{model="alpha",state="ready"}'], 1)
        self.assertEqual(samples['llamaswap_model_state{model="beta",state="stopped"}'], 1)
        total = samples["llamaswap_memory_total_bytes"]
        self.assertGreater(total, 0)
        self.assertLessEqual(samples["llamaswap_memory_used_bytes"], total)
        self.assertEqual(
            samples["llamaswap_memory_used_bytes"] + samples["llamaswap_memory_free_bytes"], total
        )
        self.assertIn('llamaswap_load_average{interval="15m"}', samples)
        cpu = samples['llamaswap_cpu_util_percent{core="all"}']
        self.assertTrue(0 <= cpu <= 100, cpu)
        self.assertNotIn(
            'llamaswap_requests_total{model=""', body.decode()
        )  # /metrics is not a proxied request

    async def test_queue_after_real_queueing(self) -> None:
        """
        Two requests queue while alpha starts (its server takes a second): a
        scrape and C{/running} show them waiting; a third is refused (the
        queue holds 2). Once served, their waits are in the histogram; a
        request for beta then evicts alpha, and the swaps say so.
        """
        config = make_config(
            {"alpha": fake_model("alpha", "--startup-delay", "1"), "beta": fake_model("beta")},
            queue={"maxLength": 2},
        )
        proxy = Proxy(self, config)

        def chat(model: str) -> Deferred[tuple[int, dict[str, str], Any]]:
            body = {"model": model, "messages": []}
            return Deferred.fromCoroutine(proxy.post_json("/v1/chat/completions", body))

        async def scrape() -> dict[str, float]:
            status, _, body = await proxy.call("GET", "/metrics")
            self.assertEqual(status, 200)
            return parse_exposition(body.decode())

        first, second = chat("alpha"), chat("alpha")
        deadline = time.monotonic() + 10
        while (await scrape())['llamaswap_queue_length{model="alpha"}'] < 2:
            self.assertLess(time.monotonic(), deadline, "the requests never queued")
            await sleep(0.02)
        await sleep(0.1)
        samples = await scrape()
        self.assertEqual(samples['llamaswap_queue_length{model="alpha"}'], 2)
        self.assertGreaterEqual(samples['llamaswap_queue_oldest_wait_seconds{model="alpha"}'], 0.1)
        self.assertEqual(samples['llamaswap_queue_length{model="beta"}'], 0)
        status, _, body = await proxy.call("GET", "/running")
        self.assertEqual(status, 200)
        [alpha] = json.loads(body)["running"]
        self.assertEqual(
            (alpha["model"], alpha["state"], alpha["queued"]), ("alpha", "starting", 2)
        )
        self.assertGreaterEqual(alpha["oldestWait"], 0.1)
        status, _, refused = await chat("alpha")
        self.assertEqual((status, refused["error"]["code"]), (429, "queue_full"))

        self.assertEqual([(await first)[0], (await second)[0]], [200, 200])
        samples = await scrape()
        self.assertEqual(samples['llamaswap_queue_length{model="alpha"}'], 0)
        self.assertEqual(samples['llamaswap_queue_oldest_wait_seconds{model="alpha"}'], 0)
        # Both waited for the start (over a second each): nothing in the buckets up to 1 s.
        bucket = 'llamaswap_queue_wait_seconds_bucket{{model="alpha",le="{}"}}'
        self.assertEqual(samples[bucket.format("1")], 0)
        self.assertEqual(samples[bucket.format("+Inf")], 2)
        self.assertEqual(samples['llamaswap_queue_wait_seconds_count{model="alpha"}'], 2)
        self.assertGreater(samples['llamaswap_queue_wait_seconds_sum{model="alpha"}'], 2.0)
        refusals = 'llamaswap_queue_refused_total{{model="alpha",status="{}"}}'
        self.assertEqual((samples[refusals.format(429)], samples[refusals.format(503)]), (1, 0))

        status, _, _ = await chat("beta")
        self.assertEqual(status, 200)
        samples = await scrape()
        swaps = 'llamaswap_model_swaps_total{{model="{}",reason="{}"}}'
        self.assertEqual(samples[swaps.format("alpha", "request")], 1)
        self.assertEqual(samples[swaps.format("alpha", "evict")], 1)
        self.assertEqual(samples[swaps.format("beta", "request")], 1)
        self.assertEqual(samples[swaps.format("beta", "evict")], 0)
        # beta's request waited for alpha's stop and its own start: one wait more.
        self.assertEqual(samples['llamaswap_queue_wait_seconds_count{model="beta"}'], 1)
