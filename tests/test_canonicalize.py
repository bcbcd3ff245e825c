"""canonicalize: golden before/after, equivalence on every family, idempotence, near misses."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from torch import nn

import rewriter
from rewriter import verify
from rewriter.analysis.canonicalize import RULES_NORMS
from rewriter.ir.graph import format_graph, op_counts
from rewriter.rewrite.driver import Rewriter, apply_rules
from rewriter.testing import fingerprint, traced
from rewriter.verify.families import FAMILIES, ModelSpec

CANONICALIZE = rewriter.Pipeline.parse("canonicalize")


class WrittenOutNorms(nn.Module):
    """Norms written out as people write them (Llama's RMSNorm, the classic LayerNorm)."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.rms_weight = nn.Parameter(torch.rand(d) + 0.5)
        self.ln_weight = nn.Parameter(torch.rand(d) + 0.5)
        self.ln_bias = nn.Parameter(torch.randn(d))
        self.proj = nn.Linear(d, d)
        self.drop = nn.Dropout(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        h = self.rms_weight * h.to(x.dtype)
        u = h.mean(-1, keepdim=True)
        s = (h - u).pow(2).mean(-1, keepdim=True)
        h = (h - u) / torch.sqrt(s + 1e-5)
        h = self.ln_weight * h + self.ln_bias
        return self.drop(self.proj(h)) + x


GOLDEN_AFTER = """\
%rms_weight: f32[8] = weight rms_weight
%ln_weight: f32[8] = weight ln_weight
%ln_bias: f32[8] = weight ln_bias
%proj_weight: f32[8, 8] = weight proj.weight
%proj_bias: f32[8] = weight proj.bias
%x: f32[d0, d1, 8] = input
%_guards_fn = call_module _guards_fn(%x)
%rms_norm_1: f32[d0, d1, 8] = aten.rms_norm.default(%x, [8], %rms_weight, 1e-06)
%layer_norm_2: f32[d0, d1, 8] = aten.layer_norm.default(%rms_norm_1, [8], %ln_weight, %ln_bias, 1e-05)
%linear: f32[d0, d1, 8] = aten.linear.default(%layer_norm_2, %proj_weight, %proj_bias)
%add_3: f32[d0, d1, 8] = aten.add.Tensor(%linear, %x)
return (%add_3,)"""


def _trace_written_out(
    model: nn.Module | None = None, dtype: torch.dtype = torch.float32
) -> tuple[nn.Module, torch.fx.GraphModule]:
    model = (model or WrittenOutNorms()).to(dtype)
    x = torch.randn(2, 5, 8, dtype=dtype)
    return model, rewriter.trace(model, (x,), dynamic_shapes={"x": {0: "batch", 1: "seq"}})


def test_golden_before_after() -> None:
    model, gm = _trace_written_out()
    before = format_graph(gm)
    assert "aten.pow.Tensor_Scalar" in before and "aten.dropout.default" in before
    result = CANONICALIZE.run(gm)
    assert format_graph(result.graph_module) == GOLDEN_AFTER
    stats = result.report.records[0].stats
    assert stats["recognize-rms-norm"] == 1 and stats["recognize-layer-norm"] == 1
    assert stats["absorb-layer-norm-weight"] == 1 and stats["absorb-layer-norm-bias"] == 1
    assert stats["drop-eval-dropout"] == 1
    verify.assert_equivalent(model, result.graph_module, max_examples=5)
    assert format_graph(gm) == before  # the input graph is untouched


def test_idempotent() -> None:
    _, gm = _trace_written_out()
    once = CANONICALIZE.run(gm).graph_module
    twice = CANONICALIZE.run(once)
    assert not twice.report.records[0].changed
    assert format_graph(twice.graph_module) == format_graph(once)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_llama_rms_norm_with_casts_in_half_precision_is_bit_exact(dtype: torch.dtype) -> None:
    spec = ModelSpec("llama", dtype=dtype, outliers=True).with_options(eps=1e-5)
    model = spec.build()
    gm = rewriter.trace(model, spec.example_inputs(seq=7))
    result = CANONICALIZE.run(gm)
    out = result.graph_module
    counts = op_counts(out)
    assert counts["aten.rms_norm.default"] == 2 * spec.layers + 1
    # the model's own eps survives the cast folding (in half precision an eps of 1e-5 or the
    # default changes no output bit at these scales, so only the graph can show it)
    norms = out.graph.find_nodes(op="call_function", target=torch.ops.aten.rms_norm.default)
    assert all(node.args[3] == 1e-5 for node in norms)
    assert "aten.rsqrt.default" not in counts and "aten.pow.Tensor_Scalar" not in counts
    stats = result.report.records[0].stats
    assert stats["fold-rms-norm-casts"] == 2 * spec.layers + 1
    # The weight multiply stays separate: absorbing it would change the half-precision rounding.
    assert "absorb-rms-norm-weight" not in stats
    (ids,) = spec.example_inputs(seq=7)
    assert torch.equal(out(ids).logits, gm(ids).logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_expected_rewrites_per_family(family: str) -> None:
    spec = ModelSpec(family, layers=2)
    _, gm = traced(spec)
    result = CANONICALIZE.run(gm)
    counts = op_counts(result.graph_module)
    assert "aten.dropout.default" not in counts
    assert "aten.alias.default" not in counts
    assert "aten._assert_tensor_metadata.default" not in counts
    if family == "llama":
        assert counts["aten.rms_norm.default"] == 5 and "aten.mean.dim" not in counts
    else:
        norms = {"gpt2": 5, "opt": 5, "gpt_neox": 5, "bloom": 6, "bert": 6, "tenc": 5}[family]
        assert counts["aten.layer_norm.default"] == norms
    assert result.report.records[0].error.max_abs <= result.report.records[0].error.allowed


@pytest.mark.parametrize("family", FAMILIES)
def test_equivalent_on_random_configs_of_every_family(family: str) -> None:
    @settings(max_examples=3)
    @given(spec=verify.model_specs(family, max_layers=2))
    def check(spec: ModelSpec) -> None:
        model = spec.build()
        before = fingerprint(model)
        gm = rewriter.trace(model, spec.example_inputs(seq=6), dynamic_shapes="auto")
        out = CANONICALIZE.run(gm).graph_module
        verify.assert_equivalent(model, out, max_examples=3)
        assert fingerprint(model) == before

    check()


def test_equivalent_in_float64() -> None:
    spec = ModelSpec("llama", dtype=torch.float64, outliers=True)
    model, gm = traced(spec)
    out = CANONICALIZE.run(gm).graph_module
    report = verify.assert_equivalent(model, out, max_examples=3)
    assert report.max_abs <= 1e-10 * report.ref_max


class NearMisses(nn.Module):
    """Forms that look like norms but are not: none of them may be rewritten."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.rand(d) + 0.5)
        self.wide = nn.Parameter(torch.rand(4, d) + 0.5)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        over_batch = x * torch.rsqrt(x.pow(2).mean(0, keepdim=True) + 1e-6)
        eps_outside = x / (torch.sqrt(x.pow(2).mean(-1, keepdim=True)) + 1e-6)
        cubed = x * torch.rsqrt(x.pow(3).abs().mean(-1, keepdim=True) + 1e-6)
        fourth = x * torch.rsqrt(x.pow(4).mean(-1, keepdim=True) + 1e-6)  # reaches the square
        other_input = x * torch.rsqrt((x + 1).pow(2).mean(-1, keepdim=True) + 1e-6)
        unbiased = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, keepdim=True) + 1e-5)
        # aten.var.correction, the op the LayerNorm rule knows, with Bessel's correction
        corrected = (x - x.mean(-1, keepdim=True)) / torch.sqrt(
            torch.var(x, -1, keepdim=True, correction=1) + 1e-5
        )
        no_eps = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True))  # no eps: not rms_norm(eps)
        rms = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        broadcast_weight = rms * self.wide  # the weight is [T, d], not a [d] vector
        return (
            over_batch,
            eps_outside,
            cubed,
            fourth,
            other_input,
            unbiased,
            corrected,
            no_eps,
            broadcast_weight,
        )


def test_near_misses_are_not_rewritten() -> None:
    model = NearMisses()
    x = torch.randn(3, 4, 8)
    gm = rewriter.trace(model, (x,))
    result = CANONICALIZE.run(gm)
    counts = op_counts(result.graph_module)
    assert counts.get("aten.layer_norm.default", 0) == 0
    assert (
        counts.get("aten.rms_norm.default", 0) == 1
    )  # only the true RMSNorm, without the [T, d] weight
    stats = result.report.records[0].stats
    assert "absorb-rms-norm-weight" not in stats
    verify.assert_equivalent(model, result.graph_module, max_examples=3)


def test_near_misses_reach_the_guard_that_refuses_them() -> None:
    # The corrected variance matches the LayerNorm rule's shape up to `correction`: the rule
    # must be tried at that node and refused for the correction, not for an unrelated reason.
    gm = rewriter.trace(NearMisses(), (torch.randn(3, 4, 8),))
    reasons: dict[str, list[str]] = {}
    apply_rules(
        Rewriter(gm),
        RULES_NORMS,
        explain=lambda node, rule, why: reasons.setdefault(rule.name, []).append(why),
    )
    assert any("1 != 0" in why for why in reasons["recognize-layer-norm"])


def test_rule_statistics_reach_the_report_with_every_rule_of_the_table() -> None:
    # each rule's definition site, attempts, matches and rewrites go to the report (and to
    # report.json); rules that never matched this graph are listed by --explain
    from rewriter.analysis.canonicalize import RULES_ATTENTION, RULES_NOOPS, RULES_NORMS

    _, gm = traced(ModelSpec("gpt2"))
    record = rewriter.Pipeline.parse("canonicalize").run(gm).report.records[0]
    table = RULES_NOOPS + RULES_NORMS + RULES_ATTENTION
    assert list(record.rules) == list(dict.fromkeys(r.name for r in table.rules))
    fired = {name: r["fired"] for name, r in record.rules.items() if r["fired"]}
    assert fired == {k: v for k, v in record.stats.items() if k != "prune-dead-weight"}
    for r in record.rules.values():
        assert r["attempts"] >= r["matches"] >= r["fired"] >= 0
        assert r["location"].startswith("canonicalize.py:")
    assert any(r["attempts"] and not r["matches"] for r in record.rules.values())
    text = rewriter.Report("canonicalize", [record]).explain()
    idle = [n for n, r in record.rules.items() if not r["matches"]]
    assert f"{len(fired)} of {len(record.rules)} rules rewrote this graph" in text
    assert all(name in text.split("never matched: ")[1] for name in idle)
