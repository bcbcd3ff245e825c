"""linearize: structure on real architectures, masks, refusals, ORT, attention transfer."""

from __future__ import annotations

import pytest
import torch

import rewriter
from rewriter import zoo
from rewriter.errors import PassError
from rewriter.ir.graph import op_counts
from rewriter.ops.attention_forms import linear_attention_quadratic
from rewriter.pipeline.metrics import perplexity_of_ids
from rewriter.testing import fingerprint, graph_fingerprint, traced
from rewriter.verify.families import ModelSpec

LINEAR = "rewriter.linear_attention.default"
SDPA = "aten.scaled_dot_product_attention.default"


def _context(**overrides) -> rewriter.PassContext:
    ids = torch.randint(0, 100, (8, 16), generator=torch.Generator().manual_seed(0))
    return rewriter.PassContext(
        **({"calibration": ids, "progress": False, "batch_size": 2} | overrides)
    )


@pytest.mark.parametrize(
    ("family", "options"),
    [("gpt2", ()), ("gpt2", (("attn", "eager"),)), ("llama", (("kv_heads", 1),)), ("opt", ())],
    ids=["gpt2-sdpa", "gpt2-eager", "llama-gqa", "opt"],
)
def test_every_attention_becomes_linear_and_ort_agrees(family, options, tmp_path) -> None:
    model, gm = traced(ModelSpec(family, layers=2, vocab=100, max_positions=160, options=options))
    before = fingerprint(model), graph_fingerprint(gm)
    result = rewriter.Pipeline.parse("linearize(fit_steps=5)").run(gm, _context())
    out = result.graph_module
    counts = op_counts(out)
    assert counts.get(LINEAR) == 2 and SDPA not in counts and "aten.softmax.int" not in counts
    nodes = [n for n in out.graph.nodes if str(n.target) == LINEAR]
    assert all(n.args[8] is True for n in nodes)  # causal, found from the mask
    layers = result.report.records[0].metrics["layers"]
    assert len(layers) == 2 and all(
        v["mse_after"] <= v["mse_before"] * 1.05 for v in layers.values()
    )
    again = rewriter.Pipeline.parse("linearize").run(out, _context())
    assert not again.report.records[0].changed
    assert (fingerprint(model), graph_fingerprint(gm)) == before
    from rewriter.backends import onnx as backend

    exported = backend.export(out, None, tmp_path / "linear.onnx")
    assert exported.lowering == {"linear_attention": "native"}
    for length in (5, 70):  # dynamic sequence length, across the 64-token chunk boundary
        report = backend.check(out, exported.path, (torch.randint(0, 100, (2, length)),))
        assert report.ok, report


def test_linear_graph_matches_the_reference_form() -> None:
    # The graph computes the op's quadratic reference on the model's own q, k, v.
    _, gm = traced(ModelSpec("gpt2", layers=1, vocab=100))
    out = rewriter.Pipeline.parse("linearize(feature_map=elu)").run(gm, _context()).graph_module
    node = next(n for n in out.graph.nodes if str(n.target) == LINEAR)
    probe = rewriter.graph.with_outputs(out, [*node.args[:6], node])
    q, k, v, phi_q, phi_k, key_mask, got = probe(torch.randint(0, 100, (2, 11)))
    want = linear_attention_quadratic(
        q, k, v, phi_q, phi_k, key_mask, None, None, True, 0, node.args[10], 1e-6
    )
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(phi_q, torch.nn.functional.elu(q) + 1)


def test_bert_is_non_causal_and_keeps_the_padding_mask(tmp_path) -> None:
    spec = ModelSpec("bert", layers=1, vocab=100)
    model = spec.build()
    ids = torch.randint(1, 100, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    gm = rewriter.trace(model, (ids,), kwargs={"attention_mask": mask}, dynamic_shapes="auto")
    calibration = [{"input_ids": ids, "attention_mask": mask}]
    out = (
        rewriter.Pipeline.parse("linearize(feature_map=elu)")
        .run(gm, _context(calibration=calibration))
        .graph_module
    )
    node = next(n for n in out.graph.nodes if str(n.target) == LINEAR)
    assert node.args[8] is False and node.args[5] is not None
    padded = mask.clone()
    padded[1, 6:] = 0
    full = out(ids, padded)
    # Padding the tail of row 1 equals dropping those keys: compare with the row cut short.
    short = out(ids[1:, :6], padded[1:, :6])
    got = rewriter.verify.outputs(full)[0][1, :6]
    torch.testing.assert_close(got, rewriter.verify.outputs(short)[0][0], rtol=1e-4, atol=1e-5)
    from rewriter.backends import onnx as backend

    exported = backend.export(out, None, tmp_path / "bert.onnx")
    assert backend.check(out, exported.path, (ids, padded)).ok


def test_bloom_alibi_is_refused_unless_decay_represents_it(tmp_path) -> None:
    _, bloom = traced(ModelSpec("bloom", layers=2, heads=4, vocab=100))
    with pytest.raises(
        PassError, match=r"scaled_dot_product_attention.*position bias.*decay=alibi"
    ):
        rewriter.Pipeline.parse("linearize").run(bloom, _context())
    out = (
        rewriter.Pipeline.parse("linearize(decay=alibi,fit_steps=5)")
        .run(bloom, _context())
        .graph_module
    )
    nodes = [n for n in out.graph.nodes if str(n.target) == LINEAR]
    assert len(nodes) == 2 and all(n.args[8] is True for n in nodes)
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    slopes = build_alibi_tensor(torch.ones(1, 2), 4, torch.float32)[:, 0, 1]  # slope * position 1
    torch.testing.assert_close(getattr_path(out, str(nodes[0].args[6].target)), torch.exp(-slopes))
    from rewriter.backends import onnx as backend

    exported = backend.export(out, None, tmp_path / "bloom.onnx")
    assert backend.check(out, exported.path, (torch.randint(0, 100, (2, 13)),)).ok


def test_refusals_name_the_node() -> None:
    _, bert = traced(ModelSpec("bert", layers=1, vocab=100))
    with pytest.raises(PassError, match="window=4 needs causal attention"):
        rewriter.Pipeline.parse("linearize(window=4)").run(bert, _context())
    _, gpt2 = traced(ModelSpec("gpt2", layers=2, vocab=100))
    with pytest.raises(
        PassError, match=r"layers='nothing' selects no attention.*transformer\.h\.0\.attn"
    ):
        rewriter.Pipeline.parse("linearize(layers='nothing')").run(gpt2, _context())
    one = rewriter.Pipeline.parse(r"linearize(layers='.*h\.1.*',fit_steps=0)").run(gpt2, _context())
    assert op_counts(one.graph_module)[LINEAR] == 1 and op_counts(one.graph_module)[SDPA] == 1


def test_decay_and_window_options_build_the_hybrid() -> None:
    _, gm = traced(ModelSpec("llama", layers=2, vocab=100))
    out = (
        rewriter.Pipeline.parse("linearize(window=4,decay=lightning,fit_steps=3)")
        .run(gm, _context())
        .graph_module
    )
    nodes = [n for n in out.graph.nodes if str(n.target) == LINEAR]
    assert all(n.args[9] == 4 and n.args[6] is not None and n.args[7] is not None for n in nodes)
    decays = [getattr_path(out, str(n.args[6].target)) for n in nodes]
    assert decays[0][0] == 1.0 and decays[0][1] < decays[1][1] < 1.0  # weaker with depth


def getattr_path(module: torch.nn.Module, target: str) -> torch.Tensor:
    for part in target.split("."):
        module = getattr(module, part)
    return module  # type: ignore[return-value]


# --- the embedded model ---------------------------------------------------------------------------


@pytest.mark.skipif(
    not (zoo.DATA / "model.safetensors").exists(), reason="the embedded model has not been built"
)
def test_embedded_transfer_closes_part_of_the_gap_and_the_window_more() -> None:
    model, tokenizer = zoo.tiny_gpt2()
    ids = tokenizer(zoo.eval_text()[:4000], return_tensors="pt").input_ids[:, :64].view(2, 32)
    gm = rewriter.trace(model, (ids,), dynamic_shapes="auto")
    ctx = rewriter.PassContext(
        calibration=zoo.calibration_text(),
        evaluation=zoo.eval_text(),
        tokenizer=tokenizer,
        progress=False,
        measure_error=False,
        eval_tokens=8192,
        seq_len=128,
        batch_size=4,
    )
    plain = (
        rewriter.Pipeline.parse("linearize(fit_steps=60)").run(gm, ctx).report.records[0].metrics
    )
    gap_unfitted = plain["ppl_unfitted"] - plain["ppl_original"]
    gap_fitted = plain["ppl_fitted"] - plain["ppl_original"]
    assert gap_unfitted > 0 and gap_fitted < 0.8 * gap_unfitted
    assert all(v["mse_after"] < v["mse_before"] for v in plain["layers"].values())
    hybrid = (
        rewriter.Pipeline.parse("linearize(fit_steps=60,window=16)")
        .run(gm, ctx)
        .report.records[0]
        .metrics
    )
    assert hybrid["ppl_fitted"] < plain["ppl_fitted"]
    eval_ids = ctx.evaluation_ids()
    assert perplexity_of_ids(gm, eval_ids) == pytest.approx(plain["ppl_original"])
