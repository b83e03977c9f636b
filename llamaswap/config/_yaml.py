# -*- test-case-name: tests.test_config -*-
"""
Strict YAML: one document, safe types, no duplicate keys, folded commands that
keep their lines, and every error as one L{ConfigError} line.
"""

from __future__ import annotations

from typing import Any

import yaml

from llamaswap.config._readers import ConfigError, _join


class _Folded(str):
    """
    A folded (C{>}) block scalar that also keeps its original lines.

    Folding joins lines with spaces before we see them, which would turn a
    C{# comment} line or a trailing C{\\} inside C{cmd: >} into arguments;
    L{command_text} reads C{lines} instead.
    """

    lines: str

    def __new__(cls, value: str, lines: str) -> _Folded:
        self = super().__new__(cls, value)
        self.lines = lines
        return self


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader whose folded block scalars remember their lines (see L{_Folded})."""

    def scan_block_scalar(self, style: str) -> yaml.ScalarToken:
        # Only for text held fully in memory: we scan the block twice.
        if style != ">" or self.stream is not None or self.raw_buffer is not None:
            return super().scan_block_scalar(style)
        saved = (self.pointer, self.index, self.line, self.column)
        literal = super().scan_block_scalar("|")
        self.pointer, self.index, self.line, self.column = saved
        token = super().scan_block_scalar(style)
        token.value = _Folded(token.value, literal.value)
        return token


_MERGE_TAG = "tag:yaml.org,2002:merge"


def _check_duplicates(node: yaml.Node, where: str, visited: set[int]) -> None:
    """Reject duplicate mapping keys (PyYAML keeps the last one silently)."""
    if id(node) in visited:  # anchors/aliases: check each node once
        return
    visited.add(id(node))
    if isinstance(node, yaml.MappingNode):
        lines: dict[str, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:  # `<<: *base` keys may be overridden
                continue
            path = where
            if isinstance(key_node, yaml.ScalarNode):
                path = _join(where, str(key_node.value))
                line = key_node.start_mark.line + 1
                if key_node.value in lines:
                    raise ConfigError(
                        f"{path}: duplicate key (lines {lines[key_node.value]} and {line})"
                    )
                lines[key_node.value] = line
            _check_duplicates(value_node, path, visited)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _check_duplicates(item, f"{where}[{i}]", visited)


def _load_yaml(text: str, source: str) -> Any:
    """Parse one YAML document safely; errors become one-line L{ConfigError}s."""
    loader = _StrictLoader(text)
    loader.name = source
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_duplicates(node, "", set())
        return loader.construct_document(node)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        reason = ": ".join(part for part in (e.context, e.problem) if part)
        raise ConfigError(f"{where}: {' '.join(reason.split())}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: {' '.join(str(e).split())}") from e
    finally:
        loader.dispose()
