"""ln-freeze: exact on constant statistics, budgets, recovery, LN-free export, errors."""

from __future__ import annotations

import pytest
import torch

import rewriter
from rewriter import zoo
from rewriter.errors import PassError
from rewriter.ir.graph import op_counts
from rewriter.testing import fingerprint, graph_fingerprint

pytestmark = pytest.mark.skipif(
    not (zoo.DATA / "model.safetensors").exists(), reason="the embedded model has not been built"
)
NORM_OPS = ("aten.layer_norm.default", "aten.rms_norm.default")


class ConstantScale(torch.nn.Module):
    """Every token's LayerNorm input has the same variance: a frozen normalizer is exact."""

    def __init__(self, vocab: int = 20, width: int = 8) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        table = torch.randn(vocab, width, generator=generator)
        table = (table - table.mean(-1, keepdim=True)) / table.std(-1, unbiased=False, keepdim=True)
        self.embed = torch.nn.Embedding.from_pretrained(table * 3.0, freeze=False)
        self.norm = torch.nn.LayerNorm(width)
        self.head = torch.nn.Linear(width, vocab)
        with torch.no_grad():
            self.norm.weight.copy_(torch.rand(width, generator=generator) + 0.5)
            self.norm.bias.copy_(torch.randn(width, generator=generator))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.embed(input_ids)))


def test_freezing_a_norm_with_constant_statistics_is_exact() -> None:
    model = ConstantScale().eval()
    gm = rewriter.trace(model, (torch.randint(0, 20, (2, 6)),), dynamic_shapes="auto")
    ctx = rewriter.PassContext(calibration=torch.randint(0, 20, (8, 6)), progress=False)
    result = rewriter.Pipeline.parse("ln-freeze,fold-ln").run(gm, ctx)
    out = result.graph_module
    assert not any(op in op_counts(out) for op in NORM_OPS)  # LN-free after fold-ln
    rewriter.verify.assert_equivalent(model, out, max_examples=5)
    sigma = result.report.records[0].metrics["per_norm"]["norm"]["sigma"]
    assert sigma == pytest.approx((9.0 + 1e-5) ** 0.5, rel=1e-6)  # the table is float32


@pytest.fixture(scope="module")
def embedded():
    model, tokenizer = zoo.tiny_gpt2()
    ids = tokenizer(zoo.eval_text()[:4000], return_tensors="pt").input_ids[:, :64].view(2, 32)
    gm = rewriter.trace(model, (ids,), dynamic_shapes="auto")
    gm = rewriter.Pipeline.parse("canonicalize").run(gm).graph_module
    return model, tokenizer, gm


def _context(tokenizer, **overrides) -> rewriter.PassContext:
    settings = dict(
        calibration=zoo.calibration_text(),
        evaluation=zoo.eval_text(),
        tokenizer=tokenizer,
        progress=False,
        eval_tokens=8192,
        seq_len=128,
        seed=0,
    )
    return rewriter.PassContext(**(settings | overrides))


def test_budget_mode_respects_the_budget_and_freezes_something(embedded) -> None:
    model, tokenizer, gm = embedded
    before = graph_fingerprint(gm), fingerprint(model)
    result = rewriter.Pipeline.parse("ln-freeze(budget='ppl+5%')").run(gm, _context(tokenizer))
    metrics = result.report.records[0].metrics
    assert 1 <= len(metrics["frozen"]) < 9
    assert metrics["ppl_frozen"] <= 1.05 * metrics["ppl_before"]
    assert metrics["evaluations"] <= 9 + 1 + 4  # each norm once, the baseline, the confirmations
    harms = [v["harm"] for v in metrics["per_norm"].values()]
    assert all(h is not None for h in harms)
    assert (graph_fingerprint(gm), fingerprint(model)) == before


def test_recovery_lowers_the_perplexity_of_the_ln_free_model(embedded) -> None:
    _, tokenizer, gm = embedded
    spec = "ln-freeze(recover_steps=20,recover_lr=1e-3),fold-ln"
    result = rewriter.Pipeline.parse(spec).run(gm, _context(tokenizer))
    metrics = result.report.records[0].metrics
    assert metrics["ppl_frozen"] > metrics["ppl_before"]  # freezing every norm costs
    assert metrics["ppl_recovered"] < metrics["ppl_frozen"]
    assert not any(op in op_counts(result.graph_module) for op in NORM_OPS)
    alone = [v["ppl_frozen_alone"] for v in metrics["per_norm"].values()]
    assert len(alone) == 9 and all(metrics["ppl_before"] < p < metrics["ppl_frozen"] for p in alone)
    again = rewriter.Pipeline.parse(spec.replace("1e-3", "1e-3,per_norm=false")).run(
        gm, _context(tokenizer)
    )
    assert again.report.records[0].metrics["ppl_recovered"] == pytest.approx(
        metrics["ppl_recovered"], rel=1e-6
    )


def test_auxiliary_loss_recovery_runs(embedded) -> None:
    _, tokenizer, gm = embedded
    spec = "ln-freeze(layers='0-1',recover_steps=5,aux_weight=0.1)"
    metrics = rewriter.Pipeline.parse(spec).run(gm, _context(tokenizer)).report.records[0].metrics
    assert metrics["frozen"] == [f"transformer.h.{i}.ln_{j}" for i in (0, 1) for j in (1, 2)]
    assert metrics["recovery_loss_last"] < metrics["recovery_loss_first"]


def test_ln_free_model_runs_in_onnx_runtime(embedded, tmp_path) -> None:
    _, tokenizer, gm = embedded
    out = (
        rewriter.Pipeline.parse("ln-freeze(per_norm=false),fold-ln")
        .run(gm, _context(tokenizer))
        .graph_module
    )
    exported = rewriter.backends.onnx.export(out, None, tmp_path / "ln_free.onnx")
    import onnx

    types = {n.op_type for n in onnx.load(str(exported.path)).graph.node}
    assert not types & {"LayerNormalization", "RMSNormalization", "SimplifiedLayerNormalization"}
    ids = tokenizer(zoo.eval_text()[:3000], return_tensors="pt").input_ids[:, :90].view(3, 30)
    assert rewriter.backends.onnx.check(out, exported.path, (ids,)).ok


def test_selection_and_missing_data_errors(embedded) -> None:
    _, tokenizer, gm = embedded
    with pytest.raises(
        PassError, match=r"norms='nothing\.\*'.*select no norm.*transformer\.h\.0\.ln_1"
    ):
        rewriter.Pipeline.parse("ln-freeze(norms='nothing.*')").run(gm, _context(tokenizer))
    with pytest.raises(
        PassError, match=r"needs calibration data.*PassContext\(calibration=\.\.\.\).*--calib"
    ):
        rewriter.Pipeline.parse("ln-freeze").run(gm, _context(tokenizer, calibration=None))
    with pytest.raises(PassError, match=r"budget=ppl\+5% needs evaluation data"):
        rewriter.Pipeline.parse("ln-freeze(budget='ppl+5%')").run(
            gm, _context(tokenizer, evaluation=None)
        )
    with pytest.raises(PassError, match="not a block range"):
        rewriter.Pipeline.parse("ln-freeze(layers='first')").run(gm, _context(tokenizer))
    regex = rewriter.Pipeline.parse(r"ln-freeze(norms='transformer\.h\.[0-9]\.ln_2')").run(
        gm, _context(tokenizer)
    )
    assert regex.report.records[0].metrics["frozen"] == [
        f"transformer.h.{i}.ln_2" for i in range(4)
    ]


def test_nothing_left_to_freeze_is_a_no_op(embedded) -> None:
    _, tokenizer, gm = embedded
    ctx = _context(tokenizer)
    frozen = rewriter.Pipeline.parse("ln-freeze(per_norm=false)").run(gm, ctx).graph_module
    again = rewriter.Pipeline.parse("ln-freeze").run(frozen, ctx)
    assert not again.report.records[0].changed
