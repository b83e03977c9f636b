"""The shape of the package in figures: modules, lines, import floors, longest functions.

    python bench/layout.py [--tree DIR] [--top N]

An import floor is the length of the longest chain of llamaswap imports below a module
(a leaf is on floor 1), counting imports made anywhere in the module except under
C{if TYPE_CHECKING:}. docs/architecture.md quotes these figures before and after a change.
"""

from __future__ import annotations

import argparse
import ast
import functools
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
        for child in ast.iter_child_nodes(node):
            visit(child)

    current_is_package = False
    visit(tree)
    return found


def measure(tree_dir: Path, top: int) -> None:
    root = tree_dir
    package_dir = root / "llamaswap"
    files = {
        _module_name(root, path): path
        for path in sorted(package_dir.rglob("*.py"))
        if "__pycache__" not in path.parts
    }
    modules = set(files)
    graph: dict[str, set[str]] = {}
    lines: dict[str, int] = {}
    functions: list[tuple[int, str]] = []
    for name, path in files.items():
        text = path.read_text()
        lines[name] = len(text.splitlines())
        tree = ast.parse(text)
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
    print(f"modules: {len(files)}  lines: {sum(lines.values())}  import arrows: {arrows}")
    print(f"import floors: {max(floor(name) for name in files)}")
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
    args = parser.parse_args()
    measure(args.tree, args.top)


if __name__ == "__main__":
    main()
