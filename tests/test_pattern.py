"""The pattern language and the rewrite driver."""

from __future__ import annotations

import operator

import torch
from torch import nn

import rewriter
from rewriter.ir.graph import format_graph, op_counts
from rewriter.rewrite.driver import (
    ERASE,
    PROVENANCE_KEY,
    Rewriter,
    RuleSet,
    apply_rules,
    emit,
    rule,
)
from rewriter.rewrite.pattern import P

aten = torch.ops.aten


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = (x + 0) * 1
        z = torch.relu(y) * self.scale
        return z + z


def _graph() -> torch.fx.GraphModule:
    return rewriter.trace(Small(), (torch.randn(3, 6),), dynamic_shapes={"x": {0: "batch"}})


def _node(gm: torch.fx.GraphModule, target: object) -> torch.fx.Node:
    return next(n for n in gm.graph.nodes if n.target == target)


def test_vars_bind_once_and_commutative_calls_try_both_orders() -> None:
    gm = _graph()
    add_self = _node(gm, aten.add.Tensor)
    x = P.var("x")
    # The last add is z + z: a repeated var matches it; the first add is x + 0.
    last_add = [n for n in gm.graph.nodes if n.target == aten.add.Tensor][-1]
    assert P.call(aten.add.Tensor, x, x).match(last_add)
    assert not P.call(aten.add.Tensor, x, x).match(add_self)
    mul_scale = [n for n in gm.graph.nodes if n.target == aten.mul.Tensor][-1]
    scale = P.call(aten.relu.default, P.var("y"))
    assert P.call(aten.mul.Tensor, P.var("w"), scale, commutative=True).match(mul_scale)
    assert not P.call(aten.mul.Tensor, P.var("w"), scale).match(mul_scale)


def test_literals_constants_alternatives_and_reasons() -> None:
    gm = _graph()
    add_zero = _node(gm, aten.add.Tensor)
    assert P.call(aten.add.Tensor, P.var("x"), 0).match(add_zero)
    assert not P.call(aten.add.Tensor, P.var("x"), 1).match(add_zero)
    matched = P.call(aten.add.Tensor, P.var("x"), P.const("c", where=lambda c: c == 0)).match(
        add_zero
    )
    assert matched and matched["c"] == 0
    failure = P.call(aten.mul.Tensor, P.var("x"), 0).match(add_zero)
    assert not failure and "aten.mul.Tensor" in failure.reason
    either = P.call(aten.mul.Tensor, P.var("x"), 1) | P.call(aten.add.Tensor, P.var("x"), 0)
    assert either.match(add_zero)
    assert either.roots() == frozenset({aten.mul.Tensor, aten.add.Tensor})
    assert (P.var("x") + 0).match(add_zero)


def test_driver_applies_rules_to_fixpoint_with_meta_and_provenance() -> None:
    gm = _graph()
    x = P.var("x")
    # fmt: off
    rules = RuleSet([
        rule(P.call(aten.add.Tensor, x, P.const(where=lambda c: c == 0)), lambda x: x, name="add-zero"),  # x + 0 -> x  # noqa: E501
        rule(P.call(aten.mul.Tensor, x, P.const(where=lambda c: c == 1)), lambda x: x, name="mul-one"),  # x * 1 -> x  # noqa: E501
        rule(P.call(aten.add.Tensor, x, x), lambda x: emit(aten.mul.Tensor, x, 2), name="double"),  # x + x -> x * 2  # noqa: E501
    ])
    # fmt: on
    rw = Rewriter(gm, pass_name="test")
    stats = apply_rules(rw, rules)
    rw.finish()
    assert stats.converged and dict(stats.fired) == {"add-zero": 1, "mul-one": 1, "double": 1}
    assert rw.counters == stats.fired
    doubled = [n for n in gm.graph.nodes if n.target == aten.mul.Tensor][-1]
    assert doubled.args[1] == 2
    provenance = doubled.meta[PROVENANCE_KEY]
    assert (provenance.pass_name, provenance.rule) == ("test", "double")
    assert str(doubled.meta["val"].shape[0]).startswith("s")  # symbolic batch kept
    x_in = torch.randn(5, 6)
    torch.testing.assert_close(gm(x_in), 2 * torch.relu(x_in))


def test_a_rule_that_does_not_converge_is_reported() -> None:
    gm = _graph()
    x = P.var("x")
    # fmt: off
    flip = RuleSet([
        rule(P.call(aten.relu.default, x), lambda x: emit(aten.relu.default, x), name="flip"),  # relu -> relu  # noqa: E501
    ])
    # fmt: on
    rw = Rewriter(gm, pass_name="test")
    stats = apply_rules(rw, flip, max_iterations=3)
    assert not stats.converged and stats.iterations == 3


def test_rules_decline_and_erase_and_explain() -> None:
    gm = _graph()
    x = P.var("x")
    reasons: list[str] = []
    # fmt: off
    rules = RuleSet([
        rule(P.call(aten.relu.default, x), lambda x: None, name="decline"),  # relu(x) -> (declined)
        rule(P.call(aten.mul.Tensor, x, 3), lambda x: x, name="never"),  # x * 3 -> x
    ])
    # fmt: on
    rw = Rewriter(gm, pass_name="test")
    stats = apply_rules(rw, rules, explain=lambda node, r, why: reasons.append(f"{r.name}: {why}"))
    assert stats.matches["decline"] == 1 and not stats.fired
    assert any(r.startswith("never:") and "3" in r for r in reasons)
    assert op_counts(gm)["aten.relu.default"] == 1

    class WithAssert(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            torch._assert(x.shape[0] > 0, "non-empty")
            return x + 1

    gm2 = rewriter.trace(WithAssert(), (torch.randn(3, 2),))
    asserts = [
        n
        for n in gm2.graph.nodes
        if n.op == "call_function" and not n.users and n.target is not operator.getitem
    ]
    erase_all = RuleSet(
        [rule(P.call({n.target for n in asserts}), lambda: ERASE, name="erase")]
    )  # assert -> nothing
    rw2 = Rewriter(gm2, pass_name="test")
    apply_rules(rw2, erase_all)
    rw2.finish()
    assert rw2.counters["erase"] == len(asserts)


def test_rule_location_is_recorded() -> None:
    r = rule(P.var("x"), lambda x: x, name="anything")
    assert r.location.startswith("test_pattern.py:")
    assert "%x" in format_graph(_graph())
