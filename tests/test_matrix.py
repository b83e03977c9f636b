# -*- test-case-name: tests.test_matrix -*-
"""
Tests for L{llamaswap.config.matrix}: the set expression parser, validation errors,
expansion into combinations and the solver (llama-swap's C{TestMatrixSolver_*}
cases, checklist item 87).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from llamaswap.config.matrix import (
    MAX_COMBINATIONS,
    MAX_DEPTH,
    Decision,
    Matrix,
    MatrixError,
    build_matrix,
    parse_dsl,
)

MODELS = ("a", "b", "c", "d", "e", "qwen2.5-7b", "big_one")


def matrix(sets: Mapping[str, str], **extra: Any) -> Matrix:
    return build_matrix({"sets": dict(sets), **extra}, MODELS, {"al": "a"})


def combos(m: Matrix) -> list[tuple[str, set[str]]]:
    return [(c.set, set(c.models)) for c in m.combinations]


class ParserTests(SynchronousTestCase):
    def assertParseError(self, text: str, message: str) -> None:
        error = self.assertRaises(MatrixError, parse_dsl, text)
        self.assertEqual(str(error), message)

    def test_and_binds_tighter_than_or(self) -> None:
        """C{a | b & c} is {a} or {b, c}; parentheses change that."""
        self.assertEqual(combos(matrix({"s": "a | b & c"})), [("s", {"a"}), ("s", {"b", "c"})])
        self.assertEqual(
            combos(matrix({"s": "(a | b) & c"})), [("s", {"a", "c"}), ("s", {"b", "c"})]
        )

    def test_identifiers(self) -> None:
        """Identifiers are runs of letters, digits, _, - and .; spaces are optional."""
        self.assertEqual(
            combos(matrix({"s": "qwen2.5-7b&big_one"})), [("s", {"qwen2.5-7b", "big_one"})]
        )

    def test_product_is_left_to_right(self) -> None:
        """C{(a|b) & (c|d)} expands in reading order; duplicates collapse."""
        self.assertEqual(
            combos(matrix({"s": "(a | b) & (c | d) | a & c"})),
            [("s", {"a", "c"}), ("s", {"a", "d"}), ("s", {"b", "c"}), ("s", {"b", "d"})],
        )

    def test_syntax_errors(self) -> None:
        """Malformed expressions name what was found and where."""
        self.assertParseError("", "empty expression")
        self.assertParseError("   ", "empty expression")
        self.assertParseError("a |", "expected a model, +set or '(', found the end")
        self.assertParseError("a & | b", "expected a model, +set or '(', found '|' at position 5")
        self.assertParseError("(a | b", "expected ')', found the end")
        self.assertParseError("a b", "unexpected 'b' at position 3")
        self.assertParseError("a)", "unexpected ')' at position 2")
        self.assertParseError("a , b", "unexpected character ',' at position 3")
        self.assertParseError("+ | a", "expected a set name after '+', found '|' at position 3")
        self.assertParseError("()", "expected a model, +set or '(', found ')' at position 2")

    def test_nesting_is_bounded(self) -> None:
        """Parentheses nest up to MAX_DEPTH levels; deeper is an error, not a crash."""
        self.assertEqual(
            combos(matrix({"s": "(" * MAX_DEPTH + "a" + ")" * MAX_DEPTH})), [("s", {"a"})]
        )
        self.assertParseError(
            "(" * 5000 + "a" + ")" * 5000,
            f"parentheses nested deeper than {MAX_DEPTH} levels",
        )


class BuildTests(SynchronousTestCase):
    def assertBuildError(self, value: object, message: str) -> None:
        error = self.assertRaises(MatrixError, build_matrix, value, MODELS, {"al": "a"})
        self.assertEqual(str(error), message)

    def test_vars_and_costs(self) -> None:
        """Vars name model ids (and win over an id of the same name); costs key by var or id."""
        m = matrix(
            {"s": "x & b", "t": "c"},
            vars={"x": "a", "c": "d"},
            evict_costs={"x": 5, "b": 2},
        )
        self.assertEqual(combos(m), [("s", {"a", "b"}), ("t", {"d"})])
        self.assertEqual(dict(m.vars), {"x": "a", "c": "d"})
        self.assertEqual(dict(m.evict_costs), {"a": 5, "b": 2})
        self.assertEqual((m.cost("a"), m.cost("b"), m.cost("e")), (5, 2, 1))
        self.assertEqual(dict(m.sets), {"s": "x & b", "t": "c"})

    def test_references_inline_sets_in_dependency_order(self) -> None:
        """+ref inlines a set; referenced sets come first, then definition order."""
        m = matrix({"big": "+pair & e | d", "pair": "a & b | c", "other": "b"})
        self.assertEqual(
            combos(m),
            [
                ("pair", {"a", "b"}),
                ("pair", {"c"}),
                ("big", {"a", "b", "e"}),
                ("big", {"c", "e"}),
                ("big", {"d"}),
                ("other", {"b"}),
            ],
        )
        self.assertEqual(m.sets_of("b"), ("pair", "big", "other"))
        self.assertEqual(m.sets_of("qwen2.5-7b"), ())

    def test_a_combination_shared_by_two_sets_keeps_the_first(self) -> None:
        """A combination listed by two sets is the earlier set's."""
        m = matrix({"one": "a & b", "two": "b & a | c"})
        self.assertEqual(combos(m), [("one", {"a", "b"}), ("two", {"c"})])

    def test_errors(self) -> None:
        """Every error names its dotted path."""
        cases: list[tuple[object, str]] = [
            ([], "matrix: must be a mapping, not a list"),
            ({}, "matrix.sets: required (a mapping of set name to expression)"),
            ({"sets": {}}, "matrix.sets: define at least one set"),
            ({"sets": ["a"]}, "matrix.sets: must be a mapping, not a list"),
            ({"set": {"s": "a"}}, "matrix.set: unknown key (did you mean 'sets'?)"),
            ({"sets": {"s": "a & x"}}, "matrix.sets.s: unknown model 'x'"),
            (
                {"sets": {"s": "al"}},
                "matrix.sets.s: unknown model 'al' "
                "('al' is an alias of 'a'; use model ids or vars)",
            ),
            (
                {"sets": {"s": "a", "t": "s & b"}},
                "matrix.sets.t: unknown model 's' (to use set 's', write +s)",
            ),
            ({"sets": {"s": "a & +nope"}}, "matrix.sets.s: undefined set '+nope'"),
            (
                {"sets": {"s": "+t", "t": "a | +u", "u": "+t"}},
                "matrix.sets.s: sets reference each other (t -> u -> t)",
            ),
            ({"sets": {"s": "+s"}}, "matrix.sets.s: sets reference each other (s -> s)"),
            ({"sets": {"s": ""}}, "matrix.sets.s: empty expression"),
            (
                {"sets": {"s": "a ||b"}},
                "matrix.sets.s: expected a model, +set or '(', found '|' at position 4",
            ),
            ({"sets": {"s": 3}}, "matrix.sets.s: must be an expression (a string)"),
            ({"sets": {"a b": "a"}}, "matrix.sets.a b: set names use letters, digits, _, - and ."),
            ({"sets": {"s": "a"}, "vars": {"x": "nope"}}, "matrix.vars.x: unknown model 'nope'"),
            (
                {"sets": {"s": "a"}, "vars": {"x": 1}},
                "matrix.vars.x: must be a model id (a string)",
            ),
            (
                {"sets": {"s": "a"}, "vars": {"a/b": "a"}},
                "matrix.vars.a/b: names use letters, digits, _, - and . (at most 32)",
            ),
            (
                {"sets": {"s": "a"}, "evict_costs": {"a": 0}},
                "matrix.evict_costs.a: must be a positive integer",
            ),
            (
                {"sets": {"s": "a"}, "evict_costs": {"a": True}},
                "matrix.evict_costs.a: must be a positive integer",
            ),
            (
                {"sets": {"s": "a"}, "evict_costs": {"zz": 2}},
                "matrix.evict_costs.zz: unknown model 'zz'",
            ),
            (
                {"sets": {"s": "a"}, "vars": {"x": "a"}, "evict_costs": {"x": 2, "a": 3}},
                "matrix.evict_costs.a: the cost of model 'a' is already set by 'x'",
            ),
        ]
        for value, message in cases:
            self.assertBuildError(value, message)

    def test_long_reference_chain(self) -> None:
        """A chain of +references far beyond Python's stack is an error, not a crash."""
        sets = {f"s{i}": f"+s{i + 1}" for i in range(3000)}
        sets["s3000"] = "a"
        self.assertBuildError({"sets": sets}, "matrix.sets: sets reference each other too deeply")
        sets = {f"s{i}": f"+s{i + 1}" for i in range(200)}
        sets["s200"] = "a"
        self.assertEqual(len(matrix(sets).combinations), 1)

    def test_too_many_combinations(self) -> None:
        """An expansion beyond MAX_COMBINATIONS is an error, raised before it is built."""
        ids = tuple(f"m{i}" for i in range(40))
        group = "(" + " | ".join(ids[:10]) + ")"
        text = " & ".join(
            [group] * 4
        )  # 10**4 products (385 distinct sets); a fifth factor is too many
        self.assertEqual(len(build_matrix({"sets": {"s": text}}, ids).combinations), 385)
        error = self.assertRaises(
            MatrixError, build_matrix, {"sets": {"s": text + " & " + group}}, ids
        )
        self.assertEqual(
            str(error), f"matrix.sets.s: expands to more than {MAX_COMBINATIONS} combinations"
        )


class SolverTests(SynchronousTestCase):
    """llama-swap's TestMatrixSolver_* cases."""

    def test_already_running(self) -> None:
        """A running target evicts nothing, even next to a model it shares no set with."""
        m = matrix({"s1": "a & b", "s2": "c"})
        self.assertEqual(
            m.solve("a", ["a", "c"]), Decision(model="a", set=None, keep=None, evict=(), cost=0)
        )

    def test_not_in_any_set_runs_alone(self) -> None:
        """A model in no set evicts everything that runs."""
        m = matrix({"s1": "a & b"}, evict_costs={"b": 4})
        self.assertEqual(
            m.solve("e", ["a", "b"]),
            Decision(model="e", set=None, keep=frozenset({"e"}), evict=("a", "b"), cost=5),
        )
        self.assertEqual(m.solve("e", []).evict, ())

    def test_single_set_evicts_non_members(self) -> None:
        """Members of the chosen combination stay; the others are evicted."""
        m = matrix({"s1": "a & b"})
        self.assertEqual(
            m.solve("a", ["b", "c", "d"]),
            Decision(model="a", set="s1", keep=frozenset({"a", "b"}), evict=("c", "d"), cost=2),
        )

    def test_picks_lowest_cost(self) -> None:
        """Among combinations holding the target, the one that evicts least wins."""
        m = matrix({"s1": "a & b", "s2": "a & c & d"})
        decision = m.solve("a", ["b", "c", "d"])
        self.assertEqual((decision.set, decision.evict, decision.cost), ("s2", ("b",), 1))

    def test_tie_breaking_by_definition_order(self) -> None:
        """Equal costs: the first set in definition order, referenced sets first."""
        m = matrix({"s1": "a & b", "s2": "a & c"})
        self.assertEqual(m.solve("a", ["b", "c"]).set, "s1")
        m = matrix({"s2": "a & c", "s1": "a & b"})
        self.assertEqual(m.solve("a", ["b", "c"]).set, "s2")
        m = matrix({"s2": "+s0 | a & c", "s1": "a & b", "s0": "a & d"})
        self.assertEqual(m.solve("a", ["b", "c", "d"]).set, "s0")  # s0 precedes s2
        m = matrix({"s": "a & c | a & b"})
        self.assertEqual(m.solve("a", ["b", "c"]).keep, frozenset({"a", "c"}))  # left first

    def test_evict_cost_preserves_expensive(self) -> None:
        """A costly model is kept at the price of evicting several cheap ones."""
        m = matrix({"cheap": "a & b & c", "keep": "a & d"}, evict_costs={"d": 5})
        decision = m.solve("a", ["b", "c", "d"])
        self.assertEqual(
            decision,
            Decision(model="a", set="keep", keep=frozenset({"a", "d"}), evict=("b", "c"), cost=2),
        )

    def test_subset_of_a_combination_evicts_nothing(self) -> None:
        """Running models that fit in one combination with the target all stay."""
        m = matrix({"s": "(a | b) & c & d"})
        self.assertEqual(m.solve("b", ["d"]).evict, ())
        self.assertEqual(m.solve("b", ["a", "d"]).evict, ("a",))
