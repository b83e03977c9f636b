"""
C{llamaswap haproxy-config} (L{llamaswap.scaleout}): hosts on the command line,
their model lists, the plan that groups names by hosts, and the haproxy.cfg it
writes (checked by C{haproxy -c} where HAProxy is installed). The front at work,
with real hosts, is tests/test_scaleout_live.py.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from llamaswap import cli
from llamaswap.scaleout import command
from llamaswap.scaleout.haproxy import FrontSettings, quote, render
from llamaswap.scaleout.inventory import (
    Host,
    InventoryError,
    Listing,
    model_of,
    names_of,
    parse_host,
    parse_listing,
)
from llamaswap.scaleout.plan import build_plan, server_id, union_json

# Debian puts it in /usr/sbin, which an ordinary user's PATH may lack.
EXAMPLE = Path(__file__).resolve().parent.parent / "contrib" / "haproxy"
HAPROXY = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/local/sbin:/usr/sbin")


def record(model_id: str, **meta: Any) -> dict[str, Any]:
    """A record as llamaswap's /v1/models writes it."""
    return {
        "id": model_id,
        "object": "model",
        "created": 1796700000,
        "owned_by": "llama-swap",
        "meta": {"llamaswap": {"type": "model", **meta}},
        "status": {"value": "unloaded"},
    }


def listing(name: str, *records: dict[str, Any]) -> Listing:
    return Listing(Host(name, f"127.0.0.1:{8000 + int(name[1:])}"), records)


def example() -> dict[str, str]:
    """
    contrib/haproxy's files: three GPU boxes, as docs/scale-out.md describes them.
    C{python -m tests.test_scaleout} writes them again.
    """
    coder = record("qwen-coder", aliases=["coder"], context=32768)
    coder["name"] = "Qwen2.5 Coder 32B"
    hosts = [
        Listing(Host("gpu1", "10.0.0.5:8080"), (record("qwen3-32b"), coder, record("embed"))),
        Listing(Host("gpu2", "10.0.0.6:8080"), (record("qwen3-32b"), coder, record("llama-70b"))),
        Listing(Host("gpu3", "10.0.0.7:8080"), (record("llama-70b"), record("embed"))),
    ]
    plan = build_plan(hosts)
    front = FrontSettings(
        models_path="/etc/haproxy/llamaswap/llamaswap-models.json", bind=":8080", user="haproxy"
    )
    return {
        "haproxy.cfg": render(plan, front),
        "llamaswap-models.json": json.dumps(json.loads(union_json(plan)), indent=2) + "\n",
    }


def three_hosts() -> list[Listing]:
    """a everywhere, b on h1 and h2, c on h3 only (with an alias), a peer's model on h2."""
    peer = {"id": "box/x", "meta": {"llamaswap": {"type": "peer", "peerID": "box"}}}
    return [
        listing("h1", record("a", ctx=4096), record("b")),
        listing("h2", record("b"), record("a"), peer),
        listing("h3", record("a"), record("c", aliases=["c-alias"])),
    ]


class HostTests(SynchronousTestCase):
    def test_forms(self) -> None:
        """A host is address:port, optionally named, optionally as a URL."""
        self.assertEqual(parse_host("10.0.0.5:8080"), Host("10.0.0.5:8080", "10.0.0.5:8080"))
        self.assertEqual(parse_host("gpu1=10.0.0.5:8080"), Host("gpu1", "10.0.0.5:8080"))
        self.assertEqual(parse_host("gpu1=http://box:8080/"), Host("gpu1", "box:8080"))
        self.assertEqual(parse_host("http://box:8080").url, "http://box:8080")

    def test_refused(self) -> None:
        """No port, a path, or a name HAProxy cannot take is an error that says the form."""
        for text in ("box", "box:80/x", "my box=box:80", "https://box:443", "a'b=box:80"):
            with self.assertRaises(InventoryError, msg=text) as e:
                parse_host(text)
            self.assertIn(repr(text), str(e.exception))


class ListingTests(SynchronousTestCase):
    def test_parse(self) -> None:
        """The records of an OpenAI model list, as they are."""
        host = Host("h", "h:1")
        got = parse_listing(host, json.dumps({"object": "list", "data": [record("a")]}).encode())
        self.assertEqual(got, Listing(host, (record("a"),)))

    def test_not_a_list(self) -> None:
        """Anything else names the host's URL."""
        for body in (b"<html>", b"{}", b'{"data": [{"name": "a"}]}', b'{"data": {}}'):
            with self.assertRaises(InventoryError) as e:
                parse_listing(Host("h", "h:1"), body)
            self.assertIn("http://h:1/v1/models: not a model list", str(e.exception))

    def test_model_of(self) -> None:
        """An alias's record (includeAliasesInList) stands for its model."""
        alias = {"id": "x", "meta": {"llamaswap": {"type": "alias", "modelID": "a"}}}
        self.assertEqual((model_of(alias), model_of(record("a"))), ("a", "a"))

    def test_names(self) -> None:
        """A model's id and aliases route; a peer's model does not."""
        self.assertEqual(names_of(record("a", aliases=["x", "y"])), ["a", "x", "y"])
        self.assertEqual(names_of({"id": "p/m", "meta": {"llamaswap": {"type": "peer"}}}), [])
        self.assertEqual(names_of({"id": "bare"}), ["bare"])  # another OpenAI server

    def test_unreachable(self) -> None:
        """A host that does not answer is an error that asks whether llamaswap runs there."""
        port = _closed_port()
        with self.assertRaises(InventoryError) as e:
            command.fetch_listing(Host("h", f"127.0.0.1:{port}"), timeout=5)
        self.assertIn("is llamaswap running there?", str(e.exception))


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


class PlanTests(SynchronousTestCase):
    def test_routes_by_host_set(self) -> None:
        """One route per distinct set of hosts, named by the hosts' positions."""
        plan = build_plan(three_hosts())
        routes = {r.backend: ([h.name for h in r.hosts], r.names) for r in plan.routes}
        self.assertEqual(
            routes,
            {
                "models_1_2": (["h1", "h2"], ("b",)),
                "models_1_2_3": (["h1", "h2", "h3"], ("a",)),
                "models_3": (["h3"], ("c", "c-alias")),
            },
        )
        self.assertEqual(plan.names, ["a", "b", "c", "c-alias"])

    def test_union(self) -> None:
        """
        The front's list: each id once, sorted, with the hosts that list it, the
        first host's metadata, no status (it would be one host's), no peers' models.
        """
        answer = json.loads(union_json(build_plan(three_hosts())))
        self.assertEqual([r["id"] for r in answer["data"]], ["a", "b", "c"])
        a = answer["data"][0]
        self.assertEqual(
            a["meta"]["llamaswap"], {"type": "model", "ctx": 4096, "hosts": ["h1", "h2", "h3"]}
        )
        self.assertNotIn("status", a)
        self.assertEqual(answer["data"][2]["meta"]["llamaswap"]["hosts"], ["h3"])

    def test_stable_server_ids(self) -> None:
        """A host's id comes from its name: the same whatever the order or the other hosts."""
        first = build_plan(three_hosts())
        again = build_plan(list(reversed(three_hosts()))[:2])
        self.assertEqual(first.ids["h3"], again.ids["h3"])
        self.assertEqual(first.ids["h2"], server_id("h2"))
        self.assertEqual(len(set(first.ids.values())), 3)

    def test_unwritable_names(self) -> None:
        """A name with a quote cannot go into haproxy.cfg: left out, and said so."""
        plan = build_plan([listing("h1", record("it's"), record("ok"))])
        self.assertEqual(plan.names, ["ok"])
        self.assertEqual(plan.skipped, ("it's",))
        self.assertEqual([r["id"] for r in plan.records], ["ok"])

    def test_refused(self) -> None:
        """No host, or two hosts with one name."""
        with self.assertRaises(InventoryError):
            build_plan([])
        with self.assertRaises(InventoryError) as e:
            build_plan([listing("h1"), listing("h1")])
        self.assertIn("two hosts are called h1", str(e.exception))


def settings(**changes: Any) -> FrontSettings:
    return FrontSettings(models_path="/etc/haproxy/llamaswap-models.json", **changes)


class RenderTests(SynchronousTestCase):
    def test_routing(self) -> None:
        """Each route is a consistent-hash backend on the model, over the hosts that serve it."""
        text = render(build_plan(three_hosts()), settings())
        self.assertIn("    use_backend models_1_2 if to_models_1_2\n", text)
        self.assertIn("    acl to_models_3 var(txn.model) -m str 'c' 'c-alias'\n", text)
        backend = text.split("backend models_1_2\n", 1)[1].split("\n\n", 1)[0]
        self.assertIn("balance hash var(txn.key)", backend)
        self.assertIn("hash-type consistent", backend)
        self.assertIn(f"    server h2 127.0.0.1:8002 id {server_id('h2')}", backend.splitlines())
        self.assertNotIn("h3", backend)
        self.assertIn("option httpchk GET /health", text)
        self.assertIn("observe layer4 error-limit 1 on-error mark-down", text)
        self.assertIn("option http-no-delay", text)

    def test_errors_are_llamaswap_json(self) -> None:
        """The front's own answers carry llamaswap's error envelope (the model filled in)."""
        text = render(build_plan(three_hosts()), settings())
        line = next(x for x in text.splitlines() if "model not found" in x)
        body = line.split("lf-string '", 1)[1].split("'", 1)[0]
        filled = json.loads(body.replace("%[var(txn.model),json(utf8s)]", "zz"))
        self.assertEqual(
            filled,
            {
                "error": {
                    "message": "model not found: zz",
                    "type": "invalid_request_error",
                    "param": None,
                    "code": "not_found",
                }
            },
        )

    def test_aliases_hash_as_their_model(self) -> None:
        """A model asked for by an alias is hashed on its id: one host for all its names."""
        alias = {"id": "c2", "meta": {"llamaswap": {"type": "alias", "modelID": "c"}}}
        hosts = [*three_hosts()[:2], listing("h3", record("c", aliases=["c-alias"]), alias)]
        plan = build_plan(hosts)
        self.assertEqual(plan.aliases, {"c-alias": "c", "c2": "c"})
        text = render(plan, settings())
        self.assertIn("    http-request set-var(txn.key) var(txn.model)\n", text)
        self.assertIn(
            "    http-request set-var-fmt(txn.key) 'c'"
            " if { var(txn.model) -m str 'c-alias' 'c2' }\n",
            text,
        )

    def test_long_lists_split(self) -> None:
        """HAProxy reads 64 words a line: 300 models take several lines of one ACL."""
        records = [record(f"m{i}") for i in range(300)]
        text = render(build_plan([listing("h1", *records)]), settings())
        rules = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
        self.assertLess(max(len(line.split()) for line in rules), 64)
        self.assertGreater(text.count("acl to_models_1 var(txn.model) -m str"), 5)

    def test_upstream_longest_first(self) -> None:
        """/upstream/org/m/... is model org/m, not org, when both exist."""
        text = render(build_plan([listing("h1", record("org"), record("org/m"))]), settings())
        long_rule = text.index("'/upstream/org/m/'")
        self.assertLess(long_rule, text.index("'/upstream/org/'"))
        self.assertIn("bytes(10,5) if !has_model { path,url_dec -m beg '/upstream/org/m/' }", text)

    def test_keys(self) -> None:
        """With the hosts' API keys, the front asks for one before answering itself."""
        text = render(build_plan(three_hosts()), settings(api_keys=("k1", "k2")))
        self.assertIn("acl has_key req.hdr(x-api-key) -m str 'k1' 'k2'", text)
        self.assertIn("acl has_key req.hdr(authorization) -m str 'Bearer k1' 'Bearer k2'", text)
        self.assertIn("return status 401", text)
        self.assertNotIn("has_key", render(build_plan(three_hosts()), settings()))

    def test_quote(self) -> None:
        """Single quotes, and nothing that would end them."""
        self.assertEqual(quote('a "b" c'), "'a \"b\" c'")
        with self.assertRaises(ValueError):
            quote("it's")

    def test_haproxy_accepts_it(self) -> None:
        """C{haproxy -c} finds no error or warning in what we write."""
        if HAPROXY is None:
            raise self.skipTest("haproxy is not installed (apt-get install haproxy)")
        folder = Path(self.mktemp())
        folder.mkdir()
        models = folder / "models.json"
        models.write_text("{}")
        many = [record(f"org/m{i}", aliases=[f"m{i}"]) for i in range(100)]
        plan = build_plan([*three_hosts(), listing("h4", *many)])
        configs = [
            render(plan, FrontSettings(models_path=str(models), **changes))
            for changes in ({}, {"api_keys": ("k1",), "bind": "127.0.0.1:18080"})
        ]
        # The example, with its model list where the test can read it.
        configs.append(example()["haproxy.cfg"].replace("/etc/haproxy/llamaswap/", f"{folder}/"))
        (folder / "llamaswap-models.json").write_text("{}")
        for text in configs:
            cfg = folder / "haproxy.cfg"
            cfg.write_text(text)
            check = subprocess.run(
                [HAPROXY, "-c", "-f", str(cfg)], capture_output=True, text=True, timeout=30
            )
            self.assertEqual(check.returncode, 0, check.stdout + check.stderr)
            self.assertNotIn("WARNING", check.stdout + check.stderr)


class ExampleTests(SynchronousTestCase):
    def test_current(self) -> None:
        """contrib/haproxy holds what the command writes today (python -m tests.test_scaleout)."""
        for name, text in example().items():
            self.assertEqual((EXAMPLE / name).read_text(), text, f"contrib/haproxy/{name} is stale")


class CommandTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.asked: list[tuple[Host, str | None]] = []
        lists = {h.host.name: h for h in three_hosts()}

        def fetch(host: Host, api_key: str | None = None) -> Listing:
            self.asked.append((host, api_key))
            return Listing(host, lists[host.name].records)

        self.patch(command, "fetch_listing", fetch)
        self.folder = Path(self.mktemp())

    def run_command(self, *argv: str) -> tuple[int, str]:
        out = io.StringIO()
        return command.main(list(argv), out), out.getvalue()

    def test_writes_both_files(self) -> None:
        """
        haproxy.cfg (readable by its group only: it may hold keys) and the model
        list it points at, and a summary of where each model goes.
        """
        code, out = self.run_command(
            "-o", str(self.folder), "--bind", ":9000", "--api-key", "k", "h1=127.0.0.1:1",
            "h2=127.0.0.1:2", "h3=127.0.0.1:3",
        )  # fmt: skip
        self.assertEqual(code, 0)
        cfg = (self.folder / "haproxy.cfg").read_text()
        models = self.folder / "llamaswap-models.json"
        self.assertIn(f"file '{models.resolve()}'", cfg)
        self.assertIn("    bind :9000\n", cfg)
        self.assertEqual(len(json.loads(models.read_bytes())["data"]), 3)
        self.assertEqual(os.stat(self.folder / "haproxy.cfg").st_mode & 0o777, 0o640)
        self.assertIn("  h1, h2: b\n", out)
        self.assertEqual(
            [(h.name, k) for h, k in self.asked], [("h1", "k"), ("h2", "k"), ("h3", "k")]
        )

    def test_bad_host(self) -> None:
        """A host given wrongly: exit status 1 and the reason, nothing written."""
        code, _ = self.run_command("-o", str(self.folder), "h1=127.0.0.1:1", "nope")
        self.assertEqual(code, 1)
        self.assertFalse(self.folder.exists())

    def test_usage(self) -> None:
        """A bad option is a usage error (status 2)."""
        for argv in ([], ["--timeout", "0", "h:1"], ["--api-key", "a b", "h:1"]):
            with self.assertRaises(SystemExit) as e:
                self.run_command(*argv)
            self.assertEqual(e.exception.code, 2)

    def test_cli_dispatch(self) -> None:
        """C{llamaswap haproxy-config ...} runs the command; anything else still goes to twistd."""
        got: list[list[str]] = []

        def fake_main(argv: list[str]) -> int:
            got.append(argv)
            return 0

        self.patch(command, "main", fake_main)
        with self.assertRaises(SystemExit) as e:
            cli.main(["haproxy-config", "h:1"])
        self.assertEqual((e.exception.code, got), (0, [["h:1"]]))


if __name__ == "__main__":
    for name, text in example().items():
        (EXAMPLE / name).write_text(text)
