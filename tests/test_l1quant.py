"""l1quant: every linear replaced on real architectures, ORT agrees, budgets, the embedded model."""

from __future__ import annotations

import math

import pytest
import torch
from rewriter.passes.l1quant import is_lm_head, round_to_nearest_baseline

import rewriter
from rewriter import zoo
from rewriter.errors import PassError
from rewriter.ir.graph import linear_maps, op_counts
from rewriter.ops import quant
from rewriter.pipeline.metrics import perplexity_of_ids
from rewriter.testing import fingerprint, graph_fingerprint, traced
from rewriter.verify.families import ModelSpec

SHIFTQUANT = "rewriter.shiftquant_linear.default"
L1 = "rewriter.l1_norm.default"
needs_model = pytest.mark.skipif(
    not (zoo.DATA / "model.safetensors").exists(), reason="the embedded model has not been built"
)


def _context(**overrides) -> rewriter.PassContext:
    settings = dict(
        calibration=torch.randint(0, 100, (4, 16), generator=torch.Generator().manual_seed(0)),
        progress=False,
    )
    return rewriter.PassContext(**(settings | overrides))


@pytest.mark.parametrize("family", ["gpt2", "opt", "llama"])
def test_every_targeted_linear_is_replaced_and_ort_agrees(family: str, tmp_path) -> None:
    model, gm = traced(ModelSpec(family, layers=2, vocab=100))
    before = fingerprint(model), graph_fingerprint(gm)
    result = rewriter.Pipeline.parse("l1quant(bits=4,group=32,factor=calibrated)").run(
        gm, _context()
    )
    out = result.graph_module
    counts = op_counts(out)
    remaining = linear_maps(out)
    assert all(is_lm_head(lin) for lin in remaining) and len(remaining) == 1  # only the head
    assert counts[SHIFTQUANT] == result.report.records[0].stats["shiftquant-linear"] > 0
    assert counts[L1] == 2 * 2 + 1 and "aten.layer_norm.default" not in counts
    assert "aten.rms_norm.default" not in counts
    metrics = result.report.records[0].metrics
    assert all(
        0 < v["weight_rel_err"] < 0.2 and "output_rel_err" in v for v in metrics["layers"].values()
    )
    for layer in metrics["layers"].values():  # packed codes + one int8 exponent per group
        rows = layer["bytes_before"] // 4 // layer["in_features"]
        assert layer["bytes_after"] == quant.storage_bytes(rows, layer["in_features"], 4, 32)
    assert all(v["factor"] > 1.0 for v in metrics["norms"].values())
    again = rewriter.Pipeline.parse("l1quant(bits=4,group=32)").run(out, _context())
    assert not again.report.records[0].changed  # idempotent: nothing left to rewrite
    assert (fingerprint(model), graph_fingerprint(gm)) == before
    from rewriter.backends import onnx as backend

    exported = backend.export(out, None, tmp_path / "q.onnx")
    ids = torch.randint(0, 100, (3, 11))
    report = backend.check(
        out, exported.path, (ids,), sess=backend.session(exported.path, accuracy_level=0)
    )
    assert report.ok, report


def test_head_option_and_activation_bits_and_odd_widths(tmp_path) -> None:
    _model, gm = traced(ModelSpec("gpt2", layers=1, vocab=100))
    spec = "l1quant(norm=keep,bits=3,group=16,head=true,act_bits=8)"
    out = rewriter.Pipeline.parse(spec).run(gm, _context()).graph_module
    assert not linear_maps(out)  # the tied head too; the embedding keeps its float weight
    assert "aten.embedding.default" in op_counts(out) and "aten.layer_norm.default" in op_counts(
        out
    )
    from rewriter.backends import onnx as backend

    exported = backend.export(out, None, tmp_path / "q.onnx")
    report = backend.check(
        out,
        exported.path,
        (torch.randint(0, 100, (2, 9)),),
        sess=backend.session(exported.path, accuracy_level=0),
    )
    assert report.ok, report


def test_after_prernorm_and_fold_ln_norms_become_uncentered_l1() -> None:
    model, gm = traced(ModelSpec("gpt2", layers=2, vocab=100).with_options(eps=1e-3))
    out = (
        rewriter.Pipeline.parse("canonicalize,prernorm,fold-ln,l1quant(bits=8)")
        .run(gm, _context())
        .graph_module
    )
    nodes = [n for n in out.graph.nodes if str(n.target) == L1]
    assert len(nodes) == 5 and all(n.args[4] is False and n.args[1] is None for n in nodes)
    # the L1 norm's eps is the square root of the LayerNorm's (it is added to a mean |x|, not
    # to a mean square)
    assert all(n.args[3] == pytest.approx(math.sqrt(1e-3), rel=1e-12) for n in nodes)
    rewriter.verify.compare(
        model, out, model_inputs := ModelSpec("gpt2", vocab=100).example_inputs()
    )
    del model_inputs


def test_saved_graph_holds_packed_integers(tmp_path) -> None:
    _, gm = traced(ModelSpec("llama", layers=1, vocab=100))
    out = rewriter.Pipeline.parse("l1quant(norm=keep,bits=4)").run(gm, _context()).graph_module
    rewriter.save(out, tmp_path / "q.pt2")
    loaded = rewriter.load(tmp_path / "q.pt2")
    dtypes = {
        t.dtype for n, t in loaded.state_dict().items() if n.endswith(("qweight", "qexponent"))
    }
    assert dtypes == {torch.uint8, torch.int8}
    floats = [n for n, t in loaded.state_dict().items() if t.is_floating_point() and t.dim() == 2]
    assert all("embed" in n or "lm_head" in n for n in floats)  # no dequantized weight saved
    ids = torch.randint(0, 100, (2, 7))
    assert torch.equal(
        rewriter.verify.outputs(loaded(ids))[0], rewriter.verify.outputs(out(ids))[0]
    )


def test_option_and_data_errors() -> None:
    _, gm = traced(ModelSpec("gpt2", layers=1, vocab=100))
    with pytest.raises(PassError, match=r"bits=9 is not in 2\.\.8"):
        rewriter.Pipeline.parse("l1quant(bits=9)").run(gm, _context())
    with pytest.raises(PassError, match="group must be a power of two"):
        rewriter.Pipeline.parse("l1quant(group=48)").run(gm, _context())
    with pytest.raises(
        PassError, match=r"layers='nothing' selects no linear map.*transformer\.h\.0\.attn\.c_attn"
    ):
        rewriter.Pipeline.parse("l1quant(layers='nothing')").run(gm, _context())
    with pytest.raises(PassError, match="budget needs evaluation data"):
        rewriter.Pipeline.parse("l1quant(budget='ppl+5%')").run(gm, _context())
    with pytest.raises(PassError, match="needs calibration data"):
        rewriter.Pipeline.parse("l1quant(factor=calibrated)").run(gm, _context(calibration=None))
    only_mlp = rewriter.Pipeline.parse(r"l1quant(norm=keep,layers='.*mlp\..*')").run(gm, _context())
    assert set(only_mlp.report.records[0].metrics["layers"]) == {
        "transformer.h.0.mlp.c_fc",
        "transformer.h.0.mlp.c_proj",
    }


# --- the embedded model ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def embedded():
    model, tokenizer = zoo.tiny_gpt2()
    ids = tokenizer(zoo.eval_text()[:4000], return_tensors="pt").input_ids[:, :64].view(2, 32)
    gm = (
        rewriter.Pipeline.parse("canonicalize")
        .run(rewriter.trace(model, (ids,), dynamic_shapes="auto"))
        .graph_module
    )
    eval_ids = rewriter.PassContext(
        evaluation=zoo.eval_text(), tokenizer=tokenizer
    ).evaluation_ids()
    ctx = rewriter.PassContext(
        calibration=zoo.calibration_text(), tokenizer=tokenizer, progress=False, measure_error=False
    )
    return gm, ctx, eval_ids, perplexity_of_ids(gm, eval_ids)


@needs_model
def test_embedded_8_bit_costs_under_one_percent(embedded) -> None:
    gm, ctx, eval_ids, base = embedded
    out = rewriter.Pipeline.parse("l1quant(norm=keep,bits=8,group=64)").run(gm, ctx).graph_module
    assert perplexity_of_ids(out, eval_ids) <= 1.01 * base


@needs_model
def test_embedded_4_bit_power_of_two_within_1_2x_of_float_rtn(embedded) -> None:
    gm, ctx, eval_ids, base = embedded
    ours = perplexity_of_ids(
        rewriter.Pipeline.parse("l1quant(norm=keep,bits=4,group=64)").run(gm, ctx).graph_module,
        eval_ids,
    )
    rtn = perplexity_of_ids(round_to_nearest_baseline(gm, 4, 64), eval_ids)
    assert rtn > base
    assert math.log(ours / base) <= 1.2 * math.log(rtn / base)


@needs_model
def test_embedded_budget_raises_sensitive_layers(embedded) -> None:
    gm, ctx, _eval_ids, _base = embedded
    budget_ctx = rewriter.PassContext(
        **{**ctx.__dict__, "evaluation": zoo.eval_text(), "eval_tokens": 8192}
    )
    result = rewriter.Pipeline.parse("l1quant(norm=keep,bits=2,budget='ppl+10%')").run(
        gm, budget_ctx
    )
    metrics = result.report.records[0].metrics
    n = len(metrics["bit_map"])
    assert metrics["budget_met"] and 0 < len(metrics["promoted"]) < n
    assert sorted(set(metrics["bit_map"].values())) == [2, 8]
    assert metrics["ppl_after"] <= 1.10 * metrics["ppl_before"]
    assert metrics["evaluations"] <= n + 3 + math.ceil(math.log2(n))
    # The promoted layers are the most harmful ones.
    harms = metrics["harms"]
    assert min(harms[k] for k in metrics["promoted"]) >= max(
        harms[k] for k in harms if k not in metrics["promoted"]
    )
