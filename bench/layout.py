"""The shape of the package in figures: modules, lines, import floors, longest functions.

    python bench/layout.py [--tree DIR] [--top N] [--runtime]

An import floor is the length of the longest chain of llamaswap imports below a module
(a leaf is on floor 1), counting imports made anywhere in the module except under
C{if TYPE_CHECKING:}. Package floors count the same chains between the units a reader
meets first: each subpackage (llamaswap.web, ...) taken whole, each top-level module
alone. C{--runtime} leaves out the fake server and the test fakes (llamaswap.fakeserver,
llamaswap.testing), which the proxy never imports. docs/architecture.md quotes these
figures before and after a change.
"""

from __future__ import annotations

import argparse
import ast
import functools
import io
import tokenize
from pathlib import Path


def _module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, package: str, modules: set[str], current: str) -> set[str]:
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = current.split(".")
                if not current_is_package:
                    anchor = anchor[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            names = []
        for name in names:
            # The deepest known module that the name starts with.
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != current and name.startswith(package):
                found.add(name)
        for inner in ast.iter_child_nodes(node):
            visit(inner)

    current_is_package = False
    visit(tree)
    return found


def _code_lines(text: str, tree: ast.AST) -> int:
    """Lines holding code: not blank, not only a comment, not part of a docstring."""
    docstrings: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                first = body[0]
                docstrings.update(range(first.lineno, (first.end_lineno or first.lineno) + 1))
    skip = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT}
    code: set[int] = set()
    for token in tokenize.generate_tokens(io.StringIO(text).readline):
        if token.type not in skip and token.type != tokenize.ENDMARKER:
            code.update(range(token.start[0], token.end[0] + 1))
    return len(code - docstrings)


TEST_KIT = ("llamaswap.fakeserver", "llamaswap.testing")


def _unit(name: str, packages: set[str]) -> str:
    """The subpackage of llamaswap that C{name} is in, or C{name} for a top-level module."""
    parts = name.split(".")
    return ".".join(parts[:2]) if len(parts) > 2 or name in packages else name


def _floors(graph: dict[str, set[str]]) -> dict[str, int]:
    seen: dict[str, int] = {}

    def floor(name: str, path: frozenset[str]) -> int:
        if name not in seen:
            below = [floor(dep, path | {name}) for dep in graph[name] if dep not in path]
            seen[name] = 1 + max(below, default=0)
        return seen[name]

    for name in graph:
        floor(name, frozenset())
    return seen


def measure(tree_dir: Path, top: int, runtime: bool = False) -> None:
    root = tree_dir
    package_dir = root / "llamaswap"
    files = {
        _module_name(root, path): path
        for path in sorted(package_dir.rglob("*.py"))
        if "__pycache__" not in path.parts
    }
    if runtime:
        files = {
            name: path
            for name, path in files.items()
            if not any(name == kit or name.startswith(kit + ".") for kit in TEST_KIT)
        }
    modules = set(files)
    graph: dict[str, set[str]] = {}
    lines: dict[str, int] = {}
    functions: list[tuple[int, str]] = []
    code = 0
    for name, path in files.items():
        text = path.read_text()
        lines[name] = len(text.splitlines())
        tree = ast.parse(text)
        code += _code_lines(text, tree)
        graph[name] = _imports(tree, "llamaswap", modules, name)
        # A package's __init__ importing its own submodules is not a floor of its own.
        if path.name == "__init__.py":
            graph[name] = {dep for dep in graph[name] if not dep.startswith(name + ".")}
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                functions.append((length, f"{name}:{node.name}"))

    @functools.cache
    def floor(name: str) -> int:
        return 1 + max((floor(dep) for dep in graph[name]), default=0)

    arrows = sum(len(deps) for deps in graph.values())
    total = sum(lines.values())
    print(f"modules: {len(files)}  lines: {total} (code {code})  import arrows: {arrows}")
    print(f"import floors: {max(floor(name) for name in files)}")
    packages = {name for name, path in files.items() if path.name == "__init__.py"}
    units: dict[str, set[str]] = {}
    for name, deps in graph.items():
        unit = _unit(name, packages)
        units.setdefault(unit, set()).update(_unit(dep, packages) for dep in deps)
        units[unit].discard(unit)
    unit_floors = _floors(units)
    print(f"units (subpackages and top-level modules): {len(units)}  ", end="")
    print(f"package floors: {max(unit_floors.values())}")
    ordered = sorted(lines.values())
    print(f"lines per module: median {ordered[len(ordered) // 2]}, largest {ordered[-1]}")
    print("\nlongest modules:")
    for name in sorted(lines, key=lambda n: -lines[n])[:top]:
        print(f"  {lines[name]:5d}  {name}  (floor {floor(name)})")
    print("\nlongest functions:")
    for length, name in sorted(functions, reverse=True)[:top]:
        print(f"  {length:5d}  {name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", type=Path, default=Path(__file__).resolve().parent.parent)
    parser.add_argument("--top", type=int, default=10)
    parser.add_argument("--runtime", action="store_true", help="leave out the test kit")
    args = parser.parse_args()
    measure(args.tree, args.top, args.runtime)


if __name__ == "__main__":
    main()
