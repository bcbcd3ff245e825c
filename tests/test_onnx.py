"""ONNX Runtime backend: every family, static and dynamic, the rewriter ops, and the traps."""

from __future__ import annotations

import pytest
import torch

import rewriter
from rewriter.errors import LoweringError
from rewriter.testing import traced
from rewriter.verify.families import FAMILIES, ModelSpec

pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
onnx = pytest.importorskip("onnx", reason="onnx is not installed")
backend = rewriter.backends.onnx
pytestmark = pytest.mark.onnx

CANONICALIZE = rewriter.Pipeline.parse("canonicalize")


def _op_types(path) -> set[str]:
    return {node.op_type for node in onnx.load(str(path)).graph.node}


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_agrees_with_the_graph(family: str, dynamic: bool, tmp_path) -> None:
    spec = ModelSpec(family, layers=2, outliers=True)
    _, gm = traced(spec, dynamic=dynamic)
    out = CANONICALIZE.run(gm).graph_module
    exported = backend.export(out, None, tmp_path / f"{family}.onnx")
    assert exported.opset == 23 and exported.input_names == ["input_ids"]
    sess = backend.session(exported.path)
    assert backend.check(out, exported.path, sess=sess).ok
    if dynamic:
        assert exported.dynamic_axes == {"input_ids": {0: "batch", 1: "seq"}}
        for batch, seq in [(1, 3), (3, 11)]:
            ids = torch.randint(0, spec.vocab, (batch, seq))
            report = backend.check(out, exported.path, (ids,), sess=sess)
            assert report.ok, f"{family} at ({batch}, {seq}): {report}"
    else:
        assert exported.dynamic_axes == {}


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_attention_masks_and_named_outputs(family: str, tmp_path) -> None:
    spec = ModelSpec(family, layers=1)
    model = spec.build()
    ids = spec.example_inputs(batch=2, seq=7)[0]
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    gm = rewriter.trace(
        model, kwargs={"input_ids": ids, "attention_mask": mask}, dynamic_shapes="auto"
    )
    exported = backend.export(gm, None, tmp_path / "masked.onnx")
    assert exported.input_names == ["input_ids", "attention_mask"]
    assert exported.output_names == ["logits"]
    ids2 = torch.randint(0, spec.vocab, (3, 9))
    mask2 = torch.ones_like(ids2)
    mask2[1, :5] = 0
    assert backend.check(gm, exported.path, (ids2, mask2)).ok


def test_rms_norm_uses_fused_kernels_at_every_opset(tmp_path) -> None:
    _, gm = traced(ModelSpec("llama", layers=1))
    out = CANONICALIZE.run(gm).graph_module
    for opset, fused in [
        (23, "RMSNormalization"),
        (20, "SimplifiedLayerNormalization"),
        (18, "SimplifiedLayerNormalization"),
    ]:
        exported = backend.export(out, None, tmp_path / f"opset{opset}.onnx", opset=opset)
        types = _op_types(exported.path)
        assert fused in types and "Pow" not in types and "ReduceMean" not in types, (opset, types)
        assert backend.check(out, exported.path, (torch.randint(0, 96, (3, 5)),)).ok


class CrmsThenLinear(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(7, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.ops.rewriter.crms_norm(x, 1e-5))


def test_rewriter_ops_lower_natively_or_by_decomposition(tmp_path, monkeypatch) -> None:
    model = CrmsThenLinear()
    gm = rewriter.trace(
        model, (torch.randn(2, 4, 7),), dynamic_shapes={"x": {0: "batch", 1: "seq"}}
    )
    native = backend.export(gm, None, tmp_path / "native.onnx")
    assert native.lowering == {"crms_norm": "native"}
    x = torch.randn(3, 6, 7) * 30
    assert backend.check(gm, native.path, (x,)).ok
    monkeypatch.setattr("rewriter.backends.onnx.translations.NATIVE", {})
    decomposed = backend.export(gm, None, tmp_path / "decomposed.onnx")
    assert decomposed.lowering == {"crms_norm": "decomposed"}
    assert backend.check(gm, decomposed.path, (x,)).ok


@torch.library.custom_op("rewriter_test::mystery", mutates_args=())
def mystery(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@mystery.register_fake
def _mystery_fake(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


def test_an_op_without_a_lowering_names_the_op_and_node(tmp_path, monkeypatch) -> None:
    # Pretend mystery were a rewriter op with neither a translation nor a decomposition.
    class Mystery(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return mystery(x) + 1

    gm = rewriter.trace(Mystery(), (torch.randn(2, 3),))
    node = next(n for n in gm.graph.nodes if "mystery" in str(n.target))
    for module in (rewriter.ops, rewriter.ops.contract):
        monkeypatch.setattr(module, "rewriter_nodes", lambda g: {"mystery": [node]})
    with pytest.raises(LoweringError, match=r"rewriter::mystery.*no decomposition.*mystery"):
        backend.export(gm, None, tmp_path / "m.onnx")


def test_silent_opset_fallback_is_detected(tmp_path, monkeypatch) -> None:
    _, gm = traced(ModelSpec("gpt2", layers=1))
    # A failing version conversion makes the exporter keep its opset-18 model with a warning.
    from torch.onnx._internal.exporter import _core

    monkeypatch.setattr(_core.onnxscript_apis, "convert_version", lambda model, opset: model)
    with pytest.raises(
        backend.OnnxExportError, match="asked for opset 23 but the exporter produced opset 18"
    ):
        backend.export(gm, None, tmp_path / "fallback.onnx")


def test_the_requested_opset_or_an_error_never_a_silent_other_opset(tmp_path) -> None:
    # Opset 27 with RMSNormalization made the converter fail on onnxscript 0.7 / torch 2.13.
    _, gm = traced(ModelSpec("llama", layers=1))
    out = CANONICALIZE.run(gm).graph_module
    try:
        exported = backend.export(out, None, tmp_path / "o27.onnx", opset=27)
    except backend.OnnxExportError as error:
        assert "asked for opset 27" in str(error)
    else:
        model = onnx.load(str(exported.path))
        assert next(o.version for o in model.opset_import if o.domain == "") == 27


def test_fused_rotary_with_dynamic_batch_is_avoided(tmp_path, monkeypatch) -> None:
    _, gm = traced(ModelSpec("llama", layers=1))
    out = CANONICALIZE.run(gm).graph_module
    exported = backend.export(out, None, tmp_path / "llama.onnx")
    ids = torch.randint(0, 96, (3, 6))  # traced with batch 2
    assert backend.check(out, exported.path, (ids,)).ok
    monkeypatch.setattr("rewriter.backends.onnx.exporter._rotary_trap", lambda proto, spec: False)
    trapped = backend.export(out, None, tmp_path / "trapped.onnx")
    if "RotaryEmbedding" not in _op_types(trapped.path):
        pytest.skip("the exporter no longer fuses RotaryEmbedding; the trap is gone")
    assert exported.notes and not exported.optimized
    with pytest.raises(Exception, match=r"cos_cache|sin_cache|RotaryEmbedding"):
        backend.check(out, trapped.path, (ids,))


NORM_PIPELINES = [
    (family, pipeline)
    for family in ("gpt2", "opt", "gpt_neox", "bloom", "tenc")
    for pipeline in (
        "canonicalize,prernorm",
        "canonicalize,prernorm,fold-ln",
        "canonicalize,crmsnorm",
    )
] + [("llama", "canonicalize,fold-ln")]


@pytest.mark.parametrize(
    ("family", "pipeline"),
    NORM_PIPELINES,
    ids=[f"{f}-{p.split(',', 1)[1]}" for f, p in NORM_PIPELINES],
)
def test_normalization_passes_run_in_onnx_runtime(family: str, pipeline: str, tmp_path) -> None:
    spec = ModelSpec(family, layers=2, outliers=True)
    _, gm = traced(spec)
    out = rewriter.Pipeline.parse(pipeline).run(gm).graph_module
    exported = backend.export(out, None, tmp_path / "model.onnx")
    types = _op_types(exported.path)
    assert "LayerNormalization" not in types
    sess = backend.session(exported.path)
    for batch, seq in [(2, 8), (3, 13)]:
        ids = torch.randint(0, spec.vocab, (batch, seq))
        # ONNX Runtime running the rewritten model against the *original* graph.
        report = backend.check(gm, exported.path, (ids,), sess=sess)
        assert report.ok, f"{family} {pipeline}: {report}"
    if "crmsnorm" in pipeline:
        assert exported.lowering == {"crms_norm": "native"}
    else:
        assert "RMSNormalization" in types
