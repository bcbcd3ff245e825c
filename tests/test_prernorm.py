"""prernorm: golden listing, every Pre-LN family in float32 and float64, structure, refusals,
and one test per silent mistake of export_graph_facts.md showing the checks catch it."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings

import rewriter
from rewriter import verify
from rewriter.analysis.residual import find_stream
from rewriter.errors import PassError
from rewriter.ir.graph import copy_graph_module, format_graph, op_counts
from rewriter.testing import TinyPreLN, fingerprint, graph_fingerprint, traced
from rewriter.verify.families import ModelSpec

aten = torch.ops.aten
PRE_LN = ["gpt2", "opt", "gpt_neox", "bloom", "tenc"]


def _run(gm: torch.fx.GraphModule, spec: str = "prernorm") -> rewriter.PipelineResult:
    return rewriter.Pipeline.parse(spec).run(gm)


GOLDEN = """\
%position_weight: f32[8, 4] = weight position.weight
%ln1_weight: f32[4] = weight ln1.weight
%ln1_bias: f32[4] = weight ln1.bias
%up_weight: f32[8, 4] = weight up.weight
%up_bias: f32[8] = weight up.bias
%down_weight: f32[4, 8] = weight down.weight
%down_bias: f32[4] = weight down.bias
%ln_f_weight: f32[4] = weight ln_f.weight
%ln_f_bias: f32[4] = weight ln_f.bias
%head_weight: f32[11, 4] = weight head.weight
%embed_weight: f32[11, 4] = weight embed.weight
%input_ids: i64[d0, d1] = input
%_guards_fn = call_module _guards_fn(%input_ids)
%sym_size_int_2: sym d1 = aten.sym_size.int(%input_ids, 1)
%arange: i64[d1] = aten.arange.default(%sym_size_int_2, device='cpu', pin_memory=False)
%embedding: f32[d0, d1, 4] = aten.embedding.default(%embed_weight, %input_ids)
%embedding_1: f32[d1, 4] = aten.embedding.default(%position_weight, %arange)
%add: f32[d0, d1, 4] = aten.add.Tensor(%embedding, %embedding_1)
%rms_norm: f32[d0, d1, 4] = aten.rms_norm.default(%add, [4], %ln1_weight, 1e-05)
%add_2: f32[d0, d1, 4] = aten.add.Tensor(%rms_norm, %ln1_bias)
%linear: f32[d0, d1, 8] = aten.linear.default(%add_2, %up_weight, %up_bias)
%gelu: f32[d0, d1, 8] = aten.gelu.default(%linear)
%linear_1: f32[d0, d1, 4] = aten.linear.default(%gelu, %down_weight, %down_bias)
%add_1: f32[d0, d1, 4] = aten.add.Tensor(%add, %linear_1)
%rms_norm_1: f32[d0, d1, 4] = aten.rms_norm.default(%add_1, [4], %ln_f_weight, 1e-05)
%add_3: f32[d0, d1, 4] = aten.add.Tensor(%rms_norm_1, %ln_f_bias)
%linear_2: f32[d0, d1, 11] = aten.linear.default(%add_3, %head_weight)
return (%linear_2,)"""


def test_golden_listing_and_counts() -> None:
    model = TinyPreLN(tied=True)
    gm = rewriter.trace(
        model, (torch.tensor([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]]),), dynamic_shapes="auto"
    )
    result = _run(gm, "canonicalize,prernorm")
    assert format_graph(result.graph_module) == GOLDEN
    stats = result.report.records[1].stats
    assert stats == {
        "center-embedding": 2,
        "untie": 1,
        "center-out_in-linear": 1,
        "layer-to-rms": 2,
    }
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
        for pipeline in ("prernorm", "prernorm,fold-ln"):
            out = _run(gm, pipeline).graph_module
            report = verify.assert_equivalent(model, out, max_examples=2)
            if dtype == torch.float64:
                assert report.max_abs <= 1e-10 * report.ref_max
        assert fingerprint(model) == before

    check()


@pytest.mark.parametrize(
    ("spec", "centering", "untied"),
    [
        (ModelSpec("gpt2", tied=True).with_options(eps=1e-3), 0, 1),
        (ModelSpec("gpt2", tied=False).with_options(eps=1e-12), 0, 0),
        (ModelSpec("bloom", tied=True), 1, 1),
        (ModelSpec("opt", tied=True).with_options(word_embed_proj_dim=8, eps=1e-3), 0, 0),
        (
            ModelSpec("gpt_neox", tied=False).with_options(use_parallel_residual=True, eps=1e-6),
            0,
            0,
        ),
        (ModelSpec("tenc", tied=True).with_options(eps=1e-3), 0, 1),
    ],
    ids=["gpt2-tied", "gpt2-untied", "bloom", "opt-project-in", "neox-parallel", "tenc"],
)
def test_structure(spec: ModelSpec, centering: int, untied: int) -> None:
    model, gm = traced(spec)
    norms = op_counts(gm)["aten.layer_norm.default"]
    result = _run(gm)
    counts = op_counts(result.graph_module)
    assert "aten.layer_norm.default" not in counts and counts["aten.rms_norm.default"] == norms
    stats = result.report.records[0].stats
    assert stats.get("explicit-centering", 0) == centering
    assert stats.get("untie", 0) == untied
    for node in result.graph_module.graph.find_nodes(
        op="call_function", target=aten.rms_norm.default
    ):
        assert node.args[3] == spec.option("eps", 1e-5)  # the LN's own eps, explicit
    verify.assert_equivalent(model, result.graph_module, max_examples=2)
    # The rewrite is in the code, not only in the graph: re-export sees no layer_norm either.
    info = rewriter.trace_info(gm)
    ep = torch.export.export(
        result.graph_module, info.example_inputs, dynamic_shapes=info.dynamic_shapes
    )
    assert "aten.layer_norm.default" not in op_counts(ep.module())


def test_the_stream_is_zero_mean_after_centering() -> None:
    spec = ModelSpec("gpt2", outliers=True, dtype=torch.float64)
    _, gm = traced(spec)
    out = _run(gm).graph_module
    seen = []
    for node in out.graph.find_nodes(op="call_function", target=aten.rms_norm.default):
        seen.append(node.args[0])
    interpreter = torch.fx.Interpreter(out)
    values = {}
    original = interpreter.run_node

    def record(node: torch.fx.Node) -> object:
        value = original(node)
        if node in seen:
            values[node] = value
        return value

    interpreter.run_node = record
    interpreter.run(*rewriter.trace_info(gm).example_inputs)
    for value in values.values():
        assert value.mean(-1).abs().max() <= 1e-12 * value.abs().max()


def test_idempotent_and_no_op_without_layer_norm() -> None:
    _, gm = traced(ModelSpec("gpt2"))
    once = _run(gm).graph_module
    again = _run(once)
    assert not again.report.records[0].changed
    _, llama = traced(ModelSpec("llama"))
    result = _run(llama)
    assert not result.report.records[0].changed
    assert result.report.records[0].notes == ["no LayerNorm: nothing to do"]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (ModelSpec("bert"), "is also read by"),
        (ModelSpec("opt").with_options(do_layer_norm_before=False), "is also read by"),
        (ModelSpec("bloom").with_options(post_layernorm=True), "is also read by"),
    ],
    ids=["bert", "opt-post-ln", "bloom-post-ln"],
)
def test_post_ln_models_are_refused_unchanged(spec: ModelSpec, message: str) -> None:
    model, gm = traced(spec)
    before = graph_fingerprint(gm), fingerprint(model)
    with pytest.raises(PassError, match=message) as info:
        _run(gm)
    assert "refused" in str(info.value) and ": " in str(info.value)  # names node and module
    assert (graph_fingerprint(gm), fingerprint(model)) == before


def test_a_stream_returned_as_output_is_refused() -> None:
    spec = ModelSpec("gpt2")
    gm = rewriter.trace(spec.build(), spec.example_inputs(), kwargs={"output_hidden_states": True})
    with pytest.raises(PassError, match="residual stream is a graph output"):
        _run(gm)


def test_unknown_writers_are_refused_unless_allowed() -> None:
    _, gm = traced(ModelSpec("gpt2"))
    for make_unknown in (
        lambda node: (node.args[0], node.args[1], True),  # a training-mode dropout
    ):
        work = copy_graph_module(gm)
        dropout = next(n for n in work.graph.nodes if n.target == aten.dropout.default)
        dropout.args = make_unknown(dropout)
        work.recompile()
        with pytest.raises(PassError, match="cannot be centered by editing weights"):
            _run(work)
    # A deterministic unknown writer (sin of the embeddings) can be centered explicitly.
    work = copy_graph_module(gm)
    dropout = next(n for n in work.graph.nodes if n.target == aten.dropout.default)
    dropout.target, dropout.args = aten.sin.default, (dropout.args[0],)
    work.recompile()
    with pytest.raises(PassError, match="center_unknown_writers=true"):
        _run(work)
    allowed = rewriter.Pipeline.parse("prernorm(center_unknown_writers=true)").run(work)
    assert allowed.report.records[0].stats["explicit-centering"] == 1
    assert allowed.report.records[0].error.ok


def test_sequence_length_equal_to_width_does_not_confuse_the_analysis() -> None:
    # With T == d, "any add whose last dim is d" would also match the position arithmetic.
    spec = ModelSpec("gpt2", heads=2, head_dim=8, outliers=True)
    model, gm = traced(spec, seq=16)
    stream = find_stream(gm)
    assert len(stream.writers) == 2 + 2 * spec.layers
    verify.assert_equivalent(model, _run(gm).graph_module, max_examples=3)


# --- each silent mistake of export_graph_facts.md, reproduced, is caught --------------------


def _caught(monkeypatch, target: str, replacement: object, spec: ModelSpec) -> None:
    monkeypatch.setattr(target, replacement)
    _, gm = traced(spec)
    with pytest.raises(PassError, match="exact pass changed the graph's outputs"):
        _run(gm)


def test_mistake_centering_a_tied_embedding_in_place(monkeypatch) -> None:
    _caught(
        monkeypatch,
        "rewriter.analysis.centering.untie_for",
        lambda rw, node, users: node,
        ModelSpec("gpt2", tied=True, outliers=True),
    )


def test_mistake_centering_conv1d_as_if_it_were_linear(monkeypatch) -> None:
    import rewriter.analysis.centering as centering

    original = centering._center_linear

    def as_linear_layout(rw, writers):
        return original(
            rw,
            [
                dataclasses.replace(w, linear=dataclasses.replace(w.linear, layout="out_in"))
                for w in writers
            ],
        )

    _caught(
        monkeypatch,
        "rewriter.analysis.centering._center_linear",
        as_linear_layout,
        ModelSpec("gpt2", outliers=True),
    )


def test_mistake_skipping_bloom_explicit_centering(monkeypatch) -> None:
    _caught(
        monkeypatch,
        "rewriter.analysis.centering._center_explicitly",
        lambda rw, writer: writer.node,
        ModelSpec("bloom", outliers=True),
    )


def test_mistake_not_centering_the_position_embedding(monkeypatch) -> None:
    import rewriter.analysis.centering as centering

    original = centering._center_table

    def skip_positions(rw, writers):
        if "wpe" not in str(writers[0].table.target):
            original(rw, writers)

    _caught(
        monkeypatch,
        "rewriter.analysis.centering._center_table",
        skip_positions,
        ModelSpec("gpt2", outliers=True),
    )


def test_mistake_not_centering_the_biases(monkeypatch) -> None:
    import rewriter.analysis.centering as centering

    original = centering._center_linear

    def no_bias(rw, writers):
        return original(
            rw,
            [
                dataclasses.replace(w, linear=dataclasses.replace(w.linear, bias=None))
                for w in writers
            ],
        )

    _caught(
        monkeypatch,
        "rewriter.analysis.centering._center_linear",
        no_bias,
        ModelSpec("gpt2", outliers=True),
    )


def test_mistake_dropping_beta(monkeypatch) -> None:
    import rewriter.passes.prernorm as prernorm

    original = prernorm.layer_to_rms

    def without_beta(rw, norm):
        norm.args = (*norm.args[:3], None, *norm.args[4:])
        original(rw, norm)

    _caught(
        monkeypatch,
        "rewriter.passes.prernorm.layer_to_rms",
        without_beta,
        ModelSpec("opt", outliers=True),
    )


def test_mistake_default_eps(monkeypatch) -> None:
    # rms_norm(eps=None) means finfo eps, not the LN's 1e-5: visible in float64.
    import rewriter.passes.prernorm as prernorm

    original = prernorm.layer_to_rms

    def default_eps(rw, norm):
        original(rw, norm)
        for node in rw.graph.find_nodes(op="call_function", target=aten.rms_norm.default):
            node.args = (*node.args[:3], None)

    _caught(
        monkeypatch,
        "rewriter.passes.prernorm.layer_to_rms",
        default_eps,
        ModelSpec("tenc", dtype=torch.float64, outliers=True),
    )
