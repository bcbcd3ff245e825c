"""crmsnorm: golden listing, every Pre-LN family in float32 and float64, shapes, refusals."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings

import rewriter
from rewriter import verify
from rewriter.errors import PassError
from rewriter.ir.graph import format_graph, op_counts
from rewriter.testing import TinyPreLN, fingerprint, graph_fingerprint, traced
from rewriter.verify.families import ModelSpec

PRE_LN = ["gpt2", "opt", "gpt_neox", "bloom", "tenc"]

GOLDEN = """\
%position_weight: f32[8, 3] = weight position.weight
%up_weight: f32[8, 3] = weight up.weight
%up_bias: f32[8] = weight up.bias
%down_weight: f32[3, 8] = weight down.weight
%down_bias: f32[3] = weight down.bias
%head_weight: f32[11, 3] = weight head.weight
%embed_weight: f32[11, 3] = weight embed.weight
%head_bias: f32[11] = weight head.bias
%input_ids: i64[d0, d1] = input
%_guards_fn = call_module _guards_fn(%input_ids)
%sym_size_int_2: sym d1 = aten.sym_size.int(%input_ids, 1)
%arange: i64[d1] = aten.arange.default(%sym_size_int_2, device='cpu', pin_memory=False)
%embedding: f32[d0, d1, 3] = aten.embedding.default(%embed_weight, %input_ids)
%embedding_1: f32[d1, 3] = aten.embedding.default(%position_weight, %arange)
%add: f32[d0, d1, 3] = aten.add.Tensor(%embedding, %embedding_1)
%crms_norm: f32[d0, d1, 3] = rewriter.crms_norm.default(%add, 1e-05)
%linear: f32[d0, d1, 8] = aten.linear.default(%crms_norm, %up_weight, %up_bias)
%gelu: f32[d0, d1, 8] = aten.gelu.default(%linear)
%linear_1: f32[d0, d1, 3] = aten.linear.default(%gelu, %down_weight, %down_bias)
%add_1: f32[d0, d1, 3] = aten.add.Tensor(%add, %linear_1)
%crms_norm_1: f32[d0, d1, 3] = rewriter.crms_norm.default(%add_1, 1e-05)
%linear_2: f32[d0, d1, 11] = aten.linear.default(%crms_norm_1, %head_weight, %head_bias)
return (%linear_2,)"""


def _run(gm: torch.fx.GraphModule, spec: str = "crmsnorm") -> rewriter.PipelineResult:
    return rewriter.Pipeline.parse(spec).run(gm)


def test_golden_listing() -> None:
    model = TinyPreLN(tied=True)
    gm = rewriter.trace(
        model, (torch.tensor([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]]),), dynamic_shapes="auto"
    )
    result = _run(gm, "canonicalize,crmsnorm")
    assert format_graph(result.graph_module) == GOLDEN
    assert result.report.records[1].notes[-1] == "residual width 4 -> 3"
    verify.assert_equivalent(model, result.graph_module, max_examples=5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("family", PRE_LN)
def test_equivalent_on_random_configs(family: str, dtype: torch.dtype) -> None:
    @settings(max_examples=3)
    @given(spec=verify.model_specs(family, max_layers=4, outliers=True, dtype=dtype))
    def check(spec: ModelSpec) -> None:
        model = spec.build()
        before = fingerprint(model)
        gm = rewriter.trace(model, spec.example_inputs(seq=5), dynamic_shapes="auto")
        out = _run(gm).graph_module
        report = verify.assert_equivalent(model, out, max_examples=2)
        if dtype == torch.float64:
            assert report.max_abs <= 1e-10 * report.ref_max
        assert fingerprint(model) == before

    check()


@pytest.mark.parametrize(
    ("spec", "crms", "rms"),
    [
        (ModelSpec("gpt2", tied=True), 5, 0),
        (ModelSpec("bloom", tied=True), 5, 1),  # the embedding LayerNorm reads its own region
        (ModelSpec("opt").with_options(word_embed_proj_dim=8), 5, 0),
        (ModelSpec("gpt_neox", tied=False).with_options(use_parallel_residual=False), 5, 0),
    ],
    ids=["gpt2", "bloom", "opt-project-in", "neox-sequential"],
)
def test_structure_and_widths(spec: ModelSpec, crms: int, rms: int) -> None:
    _, gm = traced(spec)
    result = _run(gm)
    out = result.graph_module
    counts = op_counts(out)
    assert "aten.layer_norm.default" not in counts
    assert (
        counts["rewriter.crms_norm.default"] == crms
        and counts.get("aten.rms_norm.default", 0) == rms
    )
    width = spec.hidden
    for node in out.graph.find_nodes(
        op="call_function", target=torch.ops.rewriter.crms_norm.default
    ):
        assert node.meta["val"].shape[-1] == width - 1
    ids = torch.randint(0, spec.vocab, (3, 7))
    assert rewriter.verify.compare(gm, out, (ids,)).ok


def test_idempotent_and_refusals_leave_graphs_unchanged() -> None:
    _, gm = traced(ModelSpec("gpt2"))
    once = _run(gm).graph_module
    assert not _run(once).report.records[0].changed
    for spec in (ModelSpec("bert"), ModelSpec("bloom").with_options(post_layernorm=True)):
        _, post = traced(spec)
        before = graph_fingerprint(post)
        with pytest.raises(PassError, match="refused"):
            _run(post)
        assert graph_fingerprint(post) == before


class NonLinearReader(TinyPreLN):
    """The final norm feeds a tanh before the head: fine for prernorm, impossible for crmsnorm."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1])
        x = self.embed(input_ids) + self.position(positions)
        x = x + self.down(torch.nn.functional.gelu(self.up(self.ln1(x))))
        return self.head(torch.tanh(self.ln_f(x)))


def test_a_norm_with_a_non_linear_reader_is_refused() -> None:
    model = NonLinearReader()
    gm = rewriter.trace(model, (torch.tensor([[1, 2, 3]]),))
    before = graph_fingerprint(gm)
    with pytest.raises(PassError, match=r"read only by linear maps.*tanh"):
        _run(gm)
    assert graph_fingerprint(gm) == before
    assert rewriter.verify.compare(model, _run(gm, "prernorm").graph_module).ok
