"""
Tests for L{llamaswap.names}: what a requested model name resolves to (ids,
aliases, C{profile:model}, peers, ambiguity) and the groups of models.
"""

from __future__ import annotations

import textwrap

from twisted.trial.unittest import SynchronousTestCase

from llamaswap.config import DEFAULT_GROUP_ID, GroupConfig, parse_config
from llamaswap.errors import ModelNotFound
from llamaswap.names import LocalTarget, PeerTarget, Resolver

CONFIG = """
models:
  llama: {cmd: l, proxy: "http://127.0.0.1:1", aliases: [gpt-4o-mini]}
  qwen: {cmd: q, proxy: "http://127.0.0.1:2", aliases: [coder]}
  renamed: {cmd: r, proxy: "http://127.0.0.1:3", useModelName: upstream-name}
  "qwen2.5:7b": {cmd: q7, proxy: "http://127.0.0.1:4"}
  shared: {cmd: s, proxy: "http://127.0.0.1:5"}
profiles:
  coding: [qwen, llama, renamed]
  qwen2.5: [qwen]
groups:
  duo: {members: [llama, qwen], swap: false}
peers:
  gpu: {proxy: "http://10.0.0.5:8080", models: [big, shared, both, "org/model", "x:y"]}
  cpu: {proxy: "https://cpu.example", models: [both, small]}
"""


def local(target: LocalTarget | PeerTarget) -> tuple[str, str | None, str | None]:
    """(model id, profile, upstream model) of a local target."""
    assert isinstance(target, LocalTarget), target
    return target.model_id, target.profile, target.upstream_model


def peer(target: LocalTarget | PeerTarget) -> tuple[str, str]:
    """(qualified name, the peer's name) of a peer target."""
    assert isinstance(target, PeerTarget), target
    return target.fqn, target.model


class ResolverTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.names = Resolver(parse_config(textwrap.dedent(CONFIG), environ={}))

    def test_ids_and_aliases(self) -> None:
        """Ids and aliases name their model; useModelName is what the upstream sees."""
        self.assertEqual(local(self.names.resolve("llama")), ("llama", None, None))
        self.assertEqual(local(self.names.resolve("gpt-4o-mini")), ("llama", None, None))
        self.assertEqual(local(self.names.resolve("renamed")), ("renamed", None, "upstream-name"))
        self.assertEqual(self.names.resolve("gpt-4o-mini").canonical, "llama")
        target = self.names.resolve("coder")
        assert isinstance(target, LocalTarget)
        self.assertEqual(target.requested, "coder")

    def test_profiles(self) -> None:
        """C{profile:model}: the member, the part after C{:} upstream; ids with C{:} first."""
        self.assertEqual(local(self.names.resolve("coding:coder")), ("qwen", "coding", "coder"))
        self.assertEqual(
            local(self.names.resolve("coding:renamed")), ("renamed", "coding", "upstream-name")
        )
        self.assertEqual(local(self.names.resolve("qwen2.5:7b")), ("qwen2.5:7b", None, None))
        self.assertEqual(local(self.names.resolve("qwen2.5:qwen"))[1], "qwen2.5")

    def test_peers(self) -> None:
        """Qualified and unique bare names reach peers; local names win; ambiguity is a 404."""
        self.assertEqual(peer(self.names.resolve("gpu/big")), ("gpu/big", "big"))
        self.assertEqual(peer(self.names.resolve("big")), ("gpu/big", "big"))
        self.assertEqual(peer(self.names.resolve("org/model")), ("gpu/org/model", "org/model"))
        self.assertEqual(peer(self.names.resolve("gpu/shared")), ("gpu/shared", "shared"))
        self.assertEqual(peer(self.names.resolve("x:y")), ("gpu/x:y", "x:y"))
        self.assertEqual(self.names.resolve("cpu/both").canonical, "cpu/both")
        self.assertEqual(local(self.names.resolve("shared")), ("shared", None, None))
        error = self.assertRaises(ModelNotFound, self.names.resolve, "both")
        self.assertEqual(
            error.message, "model both is served by several peers; ask for gpu/both, cpu/both"
        )
        # local() knows nothing of peers.
        self.assertRaises(ModelNotFound, self.names.local, "gpu/big")

    def test_unknown_names(self) -> None:
        """Every failure names only what was asked."""
        for name, message in [
            ("nope", "model not found: nope"),
            ("gpu/nope", "model not found: gpu/nope"),
            ("zz:qwen", "profile not found: zz"),
            ("coding:shared", "model shared is not part of profile coding"),
        ]:
            error = self.assertRaises(ModelNotFound, self.names.resolve, name)
            self.assertEqual(error.message, message)
            error = self.assertRaises(ModelNotFound, self.names.local, name)
            self.assertEqual(error.message, message)

    def test_groups(self) -> None:
        """Members get their group; the others share the implicit default group."""
        self.assertEqual(self.names.group_of("llama").id, "duo")
        default = GroupConfig(id=DEFAULT_GROUP_ID, members=("renamed", "qwen2.5:7b", "shared"))
        self.assertEqual(self.names.group_of("shared"), default)
        self.assertIs(self.names.group_of("renamed"), self.names.group_of("shared"))

    def test_find_model(self) -> None:
        """find_model accepts ids and aliases and returns None for anything else."""
        self.assertEqual(self.names.find_model("coder"), self.names.config.models["qwen"])
        self.assertIsNone(self.names.find_model("coding:qwen"))
        self.assertIsNone(self.names.find_model("big"))
