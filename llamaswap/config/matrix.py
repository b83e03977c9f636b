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

import difflib
import itertools
import re
from collections.abc import Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

from attrs import field, frozen

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


class MatrixError(ValueError):
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
    index = 0
    depth = 0

    def peek() -> str | None:
        return tokens[index][1] if index < len(tokens) else None

    def where() -> str:
        if index < len(tokens):
            return f"{tokens[index][1]!r} at position {tokens[index][0] + 1}"
        return "the end"

    def take() -> str:
        nonlocal index
        index += 1
        return tokens[index - 1][1]

    def parse_or() -> _Node:
        parts = [parse_and()]
        while peek() == "|":
            take()
            parts.append(parse_and())
        return parts[0] if len(parts) == 1 else _Any(tuple(parts))

    def parse_and() -> _Node:
        parts = [parse_atom()]
        while peek() == "&":
            take()
            parts.append(parse_atom())
        return parts[0] if len(parts) == 1 else _All(tuple(parts))

    def parse_atom() -> _Node:
        nonlocal depth
        token = peek()
        if token == "(":
            if depth == MAX_DEPTH:
                raise MatrixError(f"parentheses nested deeper than {MAX_DEPTH} levels")
            take()
            depth += 1
            node = parse_or()
            depth -= 1
            if peek() != ")":
                raise MatrixError(f"expected ')', found {where()}")
            take()
            return node
        if token == "+":
            take()
            name = peek()
            if name is None or not _IDENT.fullmatch(name):
                raise MatrixError(f"expected a set name after '+', found {where()}")
            return _Ref(take())
        if token is not None and _IDENT.fullmatch(token):
            return _Name(take())
        raise MatrixError(f"expected a model, +set or '(', found {where()}")

    node = parse_or()
    if index < len(tokens):
        raise MatrixError(f"unexpected {where()}")
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


def _unknown_model(
    where: str, name: str, aliases: Mapping[str, str], hint: str = ""
) -> MatrixError:
    if name in aliases:
        hint = f" ({name!r} is an alias of {aliases[name]!r}; use model ids or vars)"
    return MatrixError(f"{where}: unknown model {name!r}{hint}")


def _mapping(where: str, value: object) -> dict[object, object]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        kind = "a list" if isinstance(value, list) else f"a {type(value).__name__}"
        raise MatrixError(f"{where}: must be a mapping, not {kind}")
    return value


def build_matrix(
    value: object, model_ids: Sequence[str], aliases: Mapping[str, str] | None = None
) -> Matrix:
    """
    Validate the YAML value of C{matrix} against the configured model ids
    (C{aliases}: alias -> model id, for hints) and expand its sets.

    @raise MatrixError: one line naming the dotted path, e.g.
        C{matrix.sets.coding: unknown model 'x'}.
    """
    aliases = aliases or {}
    models = set(model_ids)
    raw = _mapping("matrix", value)
    for key in raw:
        if key not in _KEYS:
            close = difflib.get_close_matches(str(key), _KEYS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise MatrixError(f"matrix.{key}: unknown key{hint}")

    variables: dict[str, str] = {}
    for name, target in _mapping("matrix.vars", raw.get("vars")).items():
        where = f"matrix.vars.{name}"
        if not isinstance(name, str) or not _VAR_NAME.fullmatch(name):
            raise MatrixError(f"{where}: names use letters, digits, _, - and . (at most 32)")
        if not isinstance(target, str):
            raise MatrixError(f"{where}: must be a model id (a string)")
        if target not in models:
            raise _unknown_model(where, target, aliases)
        variables[name] = target

    def resolve(where: str, name: str, hint: str = "") -> str:
        """A var wins over a model id of the same name."""
        if name in variables:
            return variables[name]
        if name in models:
            return name
        raise _unknown_model(where, name, aliases, hint)

    costs: dict[str, int] = {}
    named_by: dict[str, str] = {}
    for name, cost in _mapping("matrix.evict_costs", raw.get("evict_costs")).items():
        where = f"matrix.evict_costs.{name}"
        model_id = resolve(where, str(name))
        if isinstance(cost, bool) or not isinstance(cost, int) or cost < 1:
            raise MatrixError(f"{where}: must be a positive integer")
        if model_id in named_by:
            raise MatrixError(
                f"{where}: the cost of model {model_id!r} is already set by {named_by[model_id]!r}"
            )
        named_by[model_id] = str(name)
        costs[model_id] = cost

    if "sets" not in raw:
        raise MatrixError("matrix.sets: required (a mapping of set name to expression)")
    sets_raw = _mapping("matrix.sets", raw["sets"])
    if not sets_raw:
        raise MatrixError("matrix.sets: define at least one set")
    texts: dict[str, str] = {}
    trees: dict[str, _Node] = {}
    for name, text in sets_raw.items():
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

    # Dependency order: each set after the sets it references; cycles are errors.
    order: list[str] = []
    visiting: list[str] = []

    def visit(name: str) -> None:
        if name in order:
            return
        if name in visiting:
            cycle = " -> ".join([*visiting[visiting.index(name) :], name])
            raise MatrixError(f"matrix.sets.{visiting[0]}: sets reference each other ({cycle})")
        visiting.append(name)
        for ref in _refs(trees[name]):
            if ref not in trees:
                raise MatrixError(f"matrix.sets.{name}: undefined set '+{ref}'")
            visit(ref)
        visiting.pop()
        order.append(name)

    try:
        for name in trees:
            visit(name)
    except RecursionError:  # a chain of about a thousand +references
        raise MatrixError("matrix.sets: sets reference each other too deeply") from None

    expanded: dict[str, list[frozenset[str]]] = {}

    def expand(where: str, node: _Node) -> list[frozenset[str]]:
        if isinstance(node, _Name):
            hint = f" (to use set {node.text!r}, write +{node.text})" if node.text in trees else ""
            return [frozenset({resolve(where, node.text, hint)})]
        if isinstance(node, _Ref):
            return expanded[node.name]
        alternatives = [expand(where, part) for part in node.parts]
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

    candidates: dict[frozenset[str], str] = {}
    for name in order:
        expanded[name] = expand(f"matrix.sets.{name}", trees[name])
        for models_ in expanded[name]:
            candidates.setdefault(models_, name)  # an earlier set keeps a shared combination
        if len(candidates) > MAX_COMBINATIONS:
            raise MatrixError(
                f"matrix.sets.{name}: the sets expand to more than {MAX_COMBINATIONS} combinations"
            )
    return Matrix(
        vars=variables,
        evict_costs=costs,
        sets={name: texts[name] for name in trees},
        combinations=tuple(Combination(set=s, models=m) for m, s in candidates.items()),
    )
