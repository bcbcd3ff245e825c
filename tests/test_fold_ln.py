"""fold-ln: golden listing, every family (Llama and Post-LN BERT too), structure, near misses."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings

import rewriter
from rewriter import verify
from rewriter.analysis.folding import norm_units
from rewriter.ir.graph import format_graph, op_counts
from rewriter.testing import TinyPreLN, fingerprint, traced
from rewriter.verify.families import FAMILIES, ModelSpec

aten = torch.ops.aten

GOLDEN = """\
%position_weight: f32[8, 4] = weight position.weight
%up_weight: f32[8, 4] = weight up.weight
%up_bias: f32[8] = weight up.bias
%down_weight: f32[4, 8] = weight down.weight
%down_bias: f32[4] = weight down.bias
%head_weight: f32[11, 4] = weight head.weight
%embed_weight: f32[11, 4] = weight embed.weight
%head_bias: f32[11] = weight head.bias
%input_ids: i64[d0, d1] = input
%_guards_fn = call_module _guards_fn(%input_ids)
%sym_size_int_2: sym d1 = aten.sym_size.int(%input_ids, 1)
%arange: i64[d1] = aten.arange.default(%sym_size_int_2, device='cpu', pin_memory=False)
%embedding: f32[d0, d1, 4] = aten.embedding.default(%embed_weight, %input_ids)
%embedding_1: f32[d1, 4] = aten.embedding.default(%position_weight, %arange)
%add: f32[d0, d1, 4] = aten.add.Tensor(%embedding, %embedding_1)
%rms_norm: f32[d0, d1, 4] = aten.rms_norm.default(%add, [4], None, 1e-05)
%linear: f32[d0, d1, 8] = aten.linear.default(%rms_norm, %up_weight, %up_bias)
%gelu: f32[d0, d1, 8] = aten.gelu.default(%linear)
%linear_1: f32[d0, d1, 4] = aten.linear.default(%gelu, %down_weight, %down_bias)
%add_1: f32[d0, d1, 4] = aten.add.Tensor(%add, %linear_1)
%rms_norm_1: f32[d0, d1, 4] = aten.rms_norm.default(%add_1, [4], None, 1e-05)
%linear_2: f32[d0, d1, 11] = aten.linear.default(%rms_norm_1, %head_weight, %head_bias)
return (%linear_2,)"""


def _run(gm: torch.fx.GraphModule, spec: str = "fold-ln") -> rewriter.PipelineResult:
    return rewriter.Pipeline.parse(spec).run(gm)


def test_golden_listing_after_prernorm() -> None:
    model = TinyPreLN(tied=True)
    gm = rewriter.trace(
        model, (torch.tensor([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]]),), dynamic_shapes="auto"
    )
    result = _run(gm, "canonicalize,prernorm,fold-ln")
    assert format_graph(result.graph_module) == GOLDEN
    stats = result.report.records[2].stats
    assert (
        stats["norms-folded"] == 2 and stats["fold-into-reader"] == 2 and stats["create-bias"] == 1
    )
    verify.assert_equivalent(model, result.graph_module, max_examples=5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "bert"])
def test_equivalent_on_random_configs(family: str, dtype: torch.dtype) -> None:
    @settings(max_examples=3)
    @given(spec=verify.model_specs(family, max_layers=4, outliers=True, dtype=dtype))
    def check(spec: ModelSpec) -> None:
        model = spec.build()
        before = fingerprint(model)
        gm = rewriter.trace(model, spec.example_inputs(seq=5), dynamic_shapes="auto")
        out = _run(gm, "canonicalize,fold-ln").graph_module  # Llama's norms are written out
        report = verify.assert_equivalent(model, out, max_examples=2)
        if dtype == torch.float64:
            assert report.max_abs <= 1e-10 * report.ref_max
        assert fingerprint(model) == before

    check()


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("family", ["gpt2", "opt", "gpt_neox", "tenc", "llama"])
def test_no_affine_left(family: str, tied: bool) -> None:
    spec = ModelSpec(family, tied=tied, bias=False if family == "llama" else True)
    _, gm = traced(spec)
    result = _run(gm, "canonicalize,fold-ln")  # Llama's norms are written out until canonicalize
    for unit in norm_units(result.graph_module):
        assert not unit.has_affine, unit.norm
    stats = result.report.records[1].stats
    assert stats["norms-folded"] == 2 * spec.layers + 1
    if family == "llama":  # q, k, v, gate, up per layer and the head; no beta, so no new biases
        assert stats["fold-into-reader"] == spec.layers * 5 + 1 and "create-bias" not in stats
    names = [n.target for n in result.graph_module.graph.find_nodes(op="get_attr")]
    assert len(names) == len(set(names))


def test_tied_head_is_untied_and_the_embedding_keeps_its_tensor() -> None:
    spec = ModelSpec("gpt2", tied=True, outliers=True)
    _, gm = traced(spec)
    original = gm.lm_head.weight.detach().clone()
    out = _run(gm).graph_module
    embedding = next(
        n
        for n in out.graph.nodes
        if n.target == aten.embedding.default and n.args[0].meta["val"].shape[0] == spec.vocab
    )
    assert torch.equal(out.get_parameter(str(embedding.args[0].target)), original)
    head = out.get_parameter("lm_head.weight")
    assert not torch.equal(head, original)  # the head absorbed ln_f's gamma


def test_norms_with_non_linear_readers_are_kept_with_a_reason() -> None:
    _, bloom = traced(ModelSpec("bloom"))
    result = _run(bloom)
    notes = result.report.records[0].notes
    assert any("word_embeddings_layernorm" in n and "not a linear map" in n for n in notes)
    _, bert = traced(ModelSpec("bert"))  # Post-LN: each LN also feeds the residual add
    result = _run(bert)
    assert any("not a linear map" in n for n in result.report.records[0].notes)
    assert result.report.records[0].error is None or result.report.records[0].error.ok


def test_idempotent() -> None:
    _, gm = traced(ModelSpec("gpt_neox"))
    once = _run(gm).graph_module
    again = _run(once)
    assert not again.report.records[0].changed
    assert op_counts(once) == op_counts(again.graph_module)


def test_written_out_norms_get_a_hint_to_canonicalize_first() -> None:
    _, gm = traced(ModelSpec("llama", layers=1))  # RMSNorm traces as pow / mean / rsqrt
    result = rewriter.Pipeline.parse("fold-ln").run(gm, rewriter.PassContext(progress=False))
    (record,) = result.report.records
    assert record.rewrites == 0 and "run canonicalize first" in record.notes[0]
    folded = rewriter.Pipeline.parse("canonicalize,fold-ln").run(gm, rewriter.PassContext())
    assert folded.report.records[1].rewrites > 0
