# -*- test-case-name: tests.test_matrix -*-
"""
llama-swap's C{matrix}: which models may run together, as a small expression
language, and the solver that picks what to stop when a model is requested.

    matrix:
      vars: {q: qwen-coder, e: nomic-embed, l: llama-70b}
      evict_costs: {l: 10}
      sets:
        coding: "q & e"
        big: "l | (q & e)"

Each set denotes allowed combinations of co-resident models: C{|} is "or",
C{&} is "and" (it binds tighter), parentheses group and C{+name} inlines
another set. C{(a|b) & c} allows {a, c} and {b, c}; any subset of an allowed
combination may run too. Everything here is pure: L{build_matrix} validates
the YAML value and expands every set into its combinations (at most
L{MAX_COMBINATIONS}), L{Matrix.solve} answers one request.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

from attrs import field, frozen

from llamaswap.config._readers import ConfigError, _alias_hint, _check_keys, _mapping

# Expansion is exponential in the worst case; realistic matrices have a few
# dozen combinations, so a hard cap keeps a typo from eating memory at load.
MAX_COMBINATIONS = 10_000
DEFAULT_EVICT_COST = 1
MAX_DEPTH = 50  # nested parentheses; deeper would only exhaust Python's stack

_IDENT = re.compile(r"[A-Za-z0-9_.-]+")
_VAR_NAME = re.compile(r"[A-Za-z0-9_.-]{1,32}")
_KEYS = ("vars", "evict_costs", "sets")


def _readonly(value: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(value))


class MatrixError(ConfigError, ValueError):
    """The C{matrix} section is invalid; C{str()} is one line naming the dotted path."""


# --- the expression language ----------------------------------------------------


@frozen
class _Name:
    text: str  # a var or a model id


@frozen
class _Ref:
    name: str  # another set (+name)


@frozen
class _Any:
    parts: tuple[_Node, ...]  # a | b


@frozen
class _All:
    parts: tuple[_Node, ...]  # a & b


_Node = _Name | _Ref | _Any | _All


def _tokens(text: str) -> list[tuple[int, str]]:
    """(position, token) pairs: identifiers and the characters | & ( ) +."""
    tokens = []
    pos = 0
    while pos < len(text):
        char = text[pos]
        if char.isspace():
            pos += 1
        elif char in "|&()+":
            tokens.append((pos, char))
            pos += 1
        else:
            match = _IDENT.match(text, pos)
            if match is None:
                raise MatrixError(f"unexpected character {char!r} at position {pos + 1}")
            tokens.append((pos, match.group()))
            pos = match.end()
    return tokens


def parse_dsl(text: str) -> _Node:
    """
    Parse one set's expression: C{or := and ('|' and)*},
    C{and := atom ('&' atom)*}, C{atom := ident | '+'ident | '(' or ')'}.

    @raise MatrixError: without a path (the caller adds it).
    """
    tokens = _tokens(text)
    if not tokens:
        raise MatrixError("empty expression")
    parser = _Parser(tokens)
    node = parser.parse_or()
    if parser.index < len(tokens):
        raise MatrixError(f"unexpected {parser.where()}")
    return node


class _Parser:
    """A recursive descent over one expression's tokens; one method per rule."""

    def __init__(self, tokens: list[tuple[int, str]]) -> None:
        self.tokens = tokens
        self.index = 0
        self.depth = 0  # open parentheses

    def peek(self) -> str | None:
        return self.tokens[self.index][1] if self.index < len(self.tokens) else None

    def where(self) -> str:
        if self.index < len(self.tokens):
            position, token = self.tokens[self.index]
            return f"{token!r} at position {position + 1}"
        return "the end"

    def take(self) -> str:
        self.index += 1
        return self.tokens[self.index - 1][1]

    def parse_or(self) -> _Node:
        parts = [self.parse_and()]
        while self.peek() == "|":
            self.take()
            parts.append(self.parse_and())
        return parts[0] if len(parts) == 1 else _Any(tuple(parts))

    def parse_and(self) -> _Node:
        parts = [self.parse_atom()]
        while self.peek() == "&":
            self.take()
            parts.append(self.parse_atom())
        return parts[0] if len(parts) == 1 else _All(tuple(parts))

    def parse_atom(self) -> _Node:
        token = self.peek()
        if token == "(":
            return self.parse_group()
        if token == "+":
            self.take()
            name = self.peek()
            if name is None or not _IDENT.fullmatch(name):
                raise MatrixError(f"expected a set name after '+', found {self.where()}")
            return _Ref(self.take())
        if token is not None and _IDENT.fullmatch(token):
            return _Name(self.take())
        raise MatrixError(f"expected a model, +set or '(', found {self.where()}")

    def parse_group(self) -> _Node:
        if self.depth == MAX_DEPTH:
            raise MatrixError(f"parentheses nested deeper than {MAX_DEPTH} levels")
        self.take()
        self.depth += 1
        node = self.parse_or()
        self.depth -= 1
        if self.peek() != ")":
            raise MatrixError(f"expected ')', found {self.where()}")
        self.take()
        return node


def _refs(node: _Node) -> list[str]:
    """The sets C{node} references, in order."""
    if isinstance(node, _Ref):
        return [node.name]
    if isinstance(node, (_Any, _All)):
        return [name for part in node.parts for name in _refs(part)]
    return []


# --- the compiled matrix ----------------------------------------------------------


@frozen(kw_only=True)
class Combination:
    """Models allowed to run together, and the set that allows them."""

    set: str
    models: frozenset[str]


@frozen(kw_only=True)
class Decision:
    """What loading C{model} means for the running models."""

    model: str
    set: str | None  # the set whose combination was chosen; None if none applies
    # The models that may keep running (the chosen combination, {model} if it
    # is in no set); None: the model already runs, nothing is stopped.
    keep: frozenset[str] | None
    evict: tuple[str, ...]  # running models to stop, in the order given
    cost: int  # the sum of their eviction costs


@frozen(kw_only=True)
class Matrix:
    """A validated C{matrix}: sets expanded into combinations, in tie-break order."""

    vars: Mapping[str, str] = field(converter=_readonly)
    evict_costs: Mapping[str, int] = field(converter=_readonly)  # by model id
    sets: Mapping[str, str] = field(converter=_readonly)  # name -> expression
    # Candidates in the order ties are broken: sets in dependency order (a set
    # referenced with + first), else definition order; within a set, left to right.
    combinations: tuple[Combination, ...]
    _by_model: Mapping[str, tuple[Combination, ...]] = field(init=False, eq=False, repr=False)

    @_by_model.default
    def _index(self) -> Mapping[str, tuple[Combination, ...]]:
        index: dict[str, list[Combination]] = {}
        for combination in self.combinations:
            for model_id in combination.models:
                index.setdefault(model_id, []).append(combination)
        return MappingProxyType({k: tuple(v) for k, v in index.items()})

    def cost(self, model_id: str) -> int:
        """What stopping C{model_id} costs (C{evict_costs}, default 1)."""
        return self.evict_costs.get(model_id, DEFAULT_EVICT_COST)

    def sets_of(self, model_id: str) -> tuple[str, ...]:
        """The sets that allow C{model_id} to run (none: it may only run alone)."""
        return tuple(dict.fromkeys(c.set for c in self._by_model.get(model_id, ())))

    def solve(self, target: str, running: Iterable[str]) -> Decision:
        """
        Decide what loading C{target} stops, given the C{running} models.

        Already running: nothing. Otherwise the combination containing it
        whose excluded running models cost least to stop (ties: the first
        candidate); in no set: every running model.
        """
        running = tuple(running)
        if target in running:
            return Decision(model=target, set=None, keep=None, evict=(), cost=0)
        best: Combination | None = None
        best_cost = 0
        for combination in self._by_model.get(target, ()):
            cost = sum(self.cost(m) for m in running if m not in combination.models)
            if best is None or cost < best_cost:
                best, best_cost = combination, cost
                if cost == 0:
                    break
        if best is None:
            cost = sum(self.cost(m) for m in running)
            return Decision(
                model=target, set=None, keep=frozenset({target}), evict=running, cost=cost
            )
        evict = tuple(m for m in running if m not in best.models)
        return Decision(model=target, set=best.set, keep=best.models, evict=evict, cost=best_cost)


# --- building from YAML -------------------------------------------------------------


def build_matrix(
    value: object, model_ids: Sequence[str], aliases: Mapping[str, str] | None = None
) -> Matrix:
    """
    Validate the YAML value of C{matrix} against the configured model ids
    (C{aliases}: alias -> model id, for hints) and expand its sets.

    @raise MatrixError: one line naming the dotted path, e.g.
        C{matrix.sets.coding: unknown model 'x'}.
    """
    try:
        return _build(value, frozenset(model_ids), aliases or {})
    except MatrixError:
        raise
    except ConfigError as e:  # from the shared readers: the same line, as a MatrixError
        raise MatrixError(str(e)) from None


def _build(value: object, models: frozenset[str], aliases: Mapping[str, str]) -> Matrix:
    raw = _mapping("matrix", value)
    _check_keys("matrix", raw, _KEYS)
    names = _Names(
        models=models, aliases=aliases, vars=_read_vars(raw.get("vars"), models, aliases)
    )
    costs = _read_costs(raw.get("evict_costs"), names)
    texts, trees = _read_sets(raw)
    expansion = _Expansion(names, trees)
    candidates: dict[frozenset[str], str] = {}
    for name in _dependency_order(trees):
        for combination in expansion.expand_set(name):
            candidates.setdefault(combination, name)  # an earlier set keeps a shared combination
        if len(candidates) > MAX_COMBINATIONS:
            raise MatrixError(
                f"matrix.sets.{name}: the sets expand to more than {MAX_COMBINATIONS} combinations"
            )
    return Matrix(
        vars=names.vars,
        evict_costs=costs,
        sets=texts,
        combinations=tuple(Combination(set=s, models=m) for m, s in candidates.items()),
    )


@frozen(kw_only=True)
class _Names:
    """What a name in the matrix may denote: a var, else a model id."""

    models: frozenset[str]
    aliases: Mapping[str, str]  # alias -> model id, for hints
    vars: Mapping[str, str] = MappingProxyType({})

    def resolve(self, where: str, name: str, hint: str = "") -> str:
        """The model id C{name} denotes; a var wins over a model id of the same name."""
        if name in self.vars:
            return self.vars[name]
        if name in self.models:
            return name
        raise self.unknown(where, name, hint)

    def unknown(self, where: str, name: str, hint: str = "") -> MatrixError:
        hint = _alias_hint(name, self.aliases, "use model ids or vars") or hint
        return MatrixError(f"{where}: unknown model {name!r}{hint}")


def _read_vars(value: object, models: frozenset[str], aliases: Mapping[str, str]) -> dict[str, str]:
    """C{matrix.vars}: short names for model ids."""
    names = _Names(models=models, aliases=aliases)
    variables: dict[str, str] = {}
    for name, target in _mapping("matrix.vars", value).items():
        where = f"matrix.vars.{name}"
        if not isinstance(name, str) or not _VAR_NAME.fullmatch(name):
            raise MatrixError(f"{where}: names use letters, digits, _, - and . (at most 32)")
        if not isinstance(target, str):
            raise MatrixError(f"{where}: must be a model id (a string)")
        variables[name] = names.resolve(where, target)
    return variables


def _read_costs(value: object, names: _Names) -> dict[str, int]:
    """C{matrix.evict_costs}: by var or model id, keyed by model id."""
    costs: dict[str, int] = {}
    named_by: dict[str, str] = {}
    for name, cost in _mapping("matrix.evict_costs", value).items():
        where = f"matrix.evict_costs.{name}"
        model_id = names.resolve(where, str(name))
        if isinstance(cost, bool) or not isinstance(cost, int) or cost < 1:
            raise MatrixError(f"{where}: must be a positive integer")
        if model_id in named_by:
            raise MatrixError(
                f"{where}: the cost of model {model_id!r} is already set by {named_by[model_id]!r}"
            )
        named_by[model_id] = str(name)
        costs[model_id] = cost
    return costs


def _read_sets(raw: Mapping[str, Any]) -> tuple[dict[str, str], dict[str, _Node]]:
    """C{matrix.sets}: each set's expression (stripped) and its parse tree."""
    if "sets" not in raw:
        raise MatrixError("matrix.sets: required (a mapping of set name to expression)")
    sets = _mapping("matrix.sets", raw["sets"])
    if not sets:
        raise MatrixError("matrix.sets: define at least one set")
    texts: dict[str, str] = {}
    trees: dict[str, _Node] = {}
    for name, text in sets.items():
        where = f"matrix.sets.{name}"
        if not isinstance(name, str) or not _IDENT.fullmatch(name):
            raise MatrixError(f"{where}: set names use letters, digits, _, - and .")
        if not isinstance(text, str):
            raise MatrixError(f"{where}: must be an expression (a string)")
        try:
            trees[name] = parse_dsl(text)
        except MatrixError as e:
            raise MatrixError(f"{where}: {e}") from None
        texts[name] = text.strip()
    return texts, trees


def _dependency_order(trees: Mapping[str, _Node]) -> list[str]:
    """The sets, each after the sets it references; cycles are errors."""
    order: list[str] = []
    try:
        for name in trees:
            _visit(name, trees, order, [])
    except RecursionError:  # a chain of about a thousand +references
        raise MatrixError("matrix.sets: sets reference each other too deeply") from None
    return order


def _visit(name: str, trees: Mapping[str, _Node], order: list[str], visiting: list[str]) -> None:
    """Append C{name} to C{order} after what it references (C{visiting}: the path here)."""
    if name in order:
        return
    if name in visiting:
        cycle = " -> ".join([*visiting[visiting.index(name) :], name])
        raise MatrixError(f"matrix.sets.{visiting[0]}: sets reference each other ({cycle})")
    visiting.append(name)
    for ref in _refs(trees[name]):
        if ref not in trees:
            raise MatrixError(f"matrix.sets.{name}: undefined set '+{ref}'")
        _visit(ref, trees, order, visiting)
    visiting.pop()
    order.append(name)


class _Expansion:
    """
    Sets expanded into their combinations; a set is expanded after the sets it
    references (L{_dependency_order}), so C{+name} reads the result kept here.
    """

    def __init__(self, names: _Names, trees: Mapping[str, _Node]) -> None:
        self.names = names
        self.trees = trees
        self.expanded: dict[str, list[frozenset[str]]] = {}

    def expand_set(self, name: str) -> list[frozenset[str]]:
        result = self.expanded[name] = self.expand(f"matrix.sets.{name}", self.trees[name])
        return result

    def expand(self, where: str, node: _Node) -> list[frozenset[str]]:
        if isinstance(node, _Name):
            hint = ""
            if node.text in self.trees:
                hint = f" (to use set {node.text!r}, write +{node.text})"
            return [frozenset({self.names.resolve(where, node.text, hint)})]
        if isinstance(node, _Ref):
            return self.expanded[node.name]
        alternatives = [self.expand(where, part) for part in node.parts]
        if isinstance(node, _Any):
            result = list(dict.fromkeys(c for alt in alternatives for c in alt))
        else:
            size = 1
            for alt in alternatives:
                size *= len(alt)
            if size > MAX_COMBINATIONS:
                raise MatrixError(f"{where}: expands to more than {MAX_COMBINATIONS} combinations")
            result = list(
                dict.fromkeys(frozenset().union(*p) for p in itertools.product(*alternatives))
            )
        if len(result) > MAX_COMBINATIONS:
            raise MatrixError(f"{where}: expands to more than {MAX_COMBINATIONS} combinations")
        return result
