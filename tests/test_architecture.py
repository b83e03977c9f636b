"""
The import layering that docs/architecture.md draws, checked on the source.

Each module of llamaswap belongs to one layer; a module may import from its own layer and
the layers below it, never above, and the imports form no cycle. The fakes in
llamaswap.testing may import anything; nothing but the C{python -m llamaswap.fakeserver}
shim imports them. Only llamaswap._twisted names Twisted's private modules and attributes.
"""

from __future__ import annotations

import ast
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

PACKAGE = Path(__file__).resolve().parent.parent / "llamaswap"

# Top to bottom; a name stands for the module and, for a package, everything in it.
LAYERS: tuple[tuple[str, ...], ...] = (
    (
        "llamaswap.tap",
        "llamaswap.cli",
        "llamaswap.fakeserver",
        "llamaswap.lifecycle",
        "llamaswap.scaleout",
    ),
    ("llamaswap.web",),
    ("llamaswap.supervisor", "llamaswap.peers", "llamaswap.metrics", "llamaswap.logs"),
    ("llamaswap.process", "llamaswap.scheduling", "llamaswap.memory"),
    ("llamaswap.names", "llamaswap.bodies", "llamaswap.http", "llamaswap.listen"),
    ("llamaswap.config",),
    (
        "llamaswap.errors",
        "llamaswap.events",
        "llamaswap._twisted",
        "llamaswap.preflight",
        "llamaswap",
    ),
)
TESTING = "llamaswap.testing"

# Attributes of Twisted objects that are private: only llamaswap._twisted may touch them.
PRIVATE_TWISTED_ATTRIBUTES = frozenset(
    {
        "_disconnected",
        "_observers",
        "_command",
        "_path",
        "_respondToBadRequestAndDisconnect",
        "_putConnection",
        "_newConnection",
        "_connections",
        "_timeouts",
        "_shouldRetry",
        "_quiescentCallback",
        "_endpointFactory",
        "_outFile",
        "_interface",
    }
)
# Of those, the ones our own classes never define: flagged even on C{self}.
INHERITED_PRIVATE_ATTRIBUTES = frozenset(
    {"_disconnected", "_respondToBadRequestAndDisconnect", "_shouldRetry", "_quiescentCallback"}
)


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _belongs(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def layer_of(module: str) -> int | None:
    """The index in L{LAYERS} of C{module} (the most specific prefix wins), or None."""
    best: tuple[int, int] | None = None
    for index, layer in enumerate(LAYERS):
        for prefix in layer:
            if _belongs(module, prefix) and (best is None or len(prefix) > best[1]):
                best = (index, len(prefix))
    return None if best is None else best[0]


def _imports(tree: ast.Module, known: set[str]) -> set[str]:
    """The llamaswap modules C{tree} imports (outside C{if TYPE_CHECKING:} blocks)."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING":
            node.body = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name.startswith("llamaswap"):
                found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    graph = {}
    for name, path in modules.items():
        deps = _imports(ast.parse(path.read_text()), known) - {name}
        # A package's __init__ may re-export its own modules.
        graph[name] = {dep for dep in deps if not _belongs(dep, name)}
    return graph


class LayeringTests(SynchronousTestCase):
    def test_every_module_has_a_layer(self) -> None:
        """A new module is placed in a layer (here and in docs/architecture.md)."""
        unplaced = [m for m in _modules() if layer_of(m) is None and not _belongs(m, TESTING)]
        self.assertEqual(unplaced, [])

    def test_imports_point_down(self) -> None:
        """No module imports from a layer above its own."""
        upward = []
        for module, deps in import_graph().items():
            if _belongs(module, TESTING):
                continue
            for dep in deps:
                if _belongs(dep, TESTING):
                    if module != "llamaswap.fakeserver":
                        upward.append(f"{module} -> {dep} (the testing kit)")
                    continue
                mine, theirs = layer_of(module), layer_of(dep)
                assert mine is not None and theirs is not None
                if theirs < mine:
                    upward.append(f"{module} -> {dep}")
        self.assertEqual(sorted(upward), [])

    def test_no_cycles(self) -> None:
        """The import graph is acyclic."""
        graph = import_graph()
        done: set[str] = set()
        cycles: list[str] = []

        def visit(module: str, path: list[str]) -> None:
            if module in path:
                cycles.append(" -> ".join([*path[path.index(module) :], module]))
                return
            if module in done:
                return
            for dep in sorted(graph.get(module, ())):
                visit(dep, [*path, module])
            done.add(module)

        for module in sorted(graph):
            visit(module, [])
        self.assertEqual(cycles, [])

    def test_private_twisted_names_stay_in_one_module(self) -> None:
        """Only llamaswap._twisted imports Twisted's private names or reads their attributes."""
        offenders = []
        for module, path in _modules().items():
            if module == "llamaswap._twisted":
                continue
            tree = ast.parse(path.read_text())
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("twisted"):
                    private = [a.name for a in node.names if a.name.startswith("_")]
                    if private or any(p.startswith("_") for p in node.module.split(".")):  # type: ignore[union-attr]
                        offenders.append(f"{module}: from {node.module} import {private}")
                if isinstance(node, ast.Attribute) and node.attr in PRIVATE_TWISTED_ATTRIBUTES:
                    on_self = isinstance(node.value, ast.Name) and node.value.id == "self"
                    # Our own classes may have a _path or _command of their own; a
                    # Request subclass reading its _disconnected is still Twisted's.
                    if not on_self or node.attr in INHERITED_PRIVATE_ATTRIBUTES:
                        offenders.append(f"{module}:{node.lineno}: .{node.attr}")
                if (
                    isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
                    and node.name in INHERITED_PRIVATE_ATTRIBUTES
                ):
                    offenders.append(f"{module}:{node.lineno}: overrides {node.name}")
                if (
                    isinstance(node, ast.Constant)
                    and isinstance(node.value, str)
                    and node.value in PRIVATE_TWISTED_ATTRIBUTES
                ):
                    offenders.append(f"{module}:{node.lineno}: {node.value!r}")
        self.assertEqual(offenders, [])
