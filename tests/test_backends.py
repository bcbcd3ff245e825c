"""The Backend interface and its registry: every built-in backend exports, checks and measures
through the same methods (on the real runtimes where they run here), third-party backends join
by name, and the CLI's --backend choices come from the registry."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from rewriter.backends.base import Backend, Exported, Measurement

import rewriter
from rewriter import backends
from rewriter.verify.families import ModelSpec


@pytest.fixture(scope="module")
def block():
    # one GPT-2 block with static shapes (MLIR and HLS take the example's shapes), rewritten so
    # the graph carries a rewriter:: op some backends lower natively and others decompose
    config = ModelSpec("gpt2", vocab=64, layers=1, heads=2, head_dim=16, seed=0)
    model = config.build()
    example = config.example_inputs(batch=1, seq=8)
    gm = rewriter.trace(model, example)
    return rewriter.Pipeline.parse("canonicalize,crmsnorm").run(gm).graph_module


def test_the_registry_lists_the_builtins_and_names_what_is_missing() -> None:
    assert backends.available()[:4] == ["onnx", "mlir", "hls", "triton"]
    assert rewriter.available_backends() == backends.available()
    for name in ("onnx", "mlir", "hls", "triton"):
        backend = backends.get_backend(name)
        assert isinstance(backend, Backend) and backend.name == name and backend.summary
        runs, why = backend.available()
        assert isinstance(runs, bool) and why
    with pytest.raises(KeyError, match="unknown backend 'tvm' \\(available: onnx, mlir"):
        backends.get_backend("tvm")


@pytest.mark.parametrize("name", ["onnx", "mlir", "hls", "triton"])
def test_every_backend_exports_checks_and_measures_through_the_interface(
    name: str, block, tmp_path
) -> None:
    backend = backends.get_backend(name)
    runs, why = backend.available()
    if not runs and name != "triton":  # triton's lowering runs here, on its references
        pytest.skip(f"{name}: {why}")
    plan = backend.plan(block)
    assert plan["crms_norm"] == ("native" if "crms_norm" in backend.native() else "decomposed")
    options = {"subgraph": "transformer.h.0"} if name == "hls" else {}
    exported = backend.export(block, None, tmp_path, **options)
    assert isinstance(exported, Exported) and exported.backend == name
    assert exported.path.exists() and tmp_path in exported.path.parents
    json.dumps(exported.info)  # report-ready
    assert backend.checkable(exported)[0]
    report = backend.check(block, exported)
    assert report.ok, report
    # a check that compares: the same artifact against other inputs than the graph's fails
    if name != "hls":  # the HLS project takes its ports' values, computed from the inputs
        other = (torch.randint(0, 64, (1, 8), generator=torch.Generator().manual_seed(9)),)
        wrong = rewriter.Pipeline.parse("l1quant(bits=2)").run(block).graph_module
        assert not backend.check(wrong, exported, other).ok
    measured = backend.measure(exported, repeats=2)
    assert isinstance(measured, Measurement) and measured.bytes > 0
    if name == "hls":  # no latency without the vendor's synthesis; the modelled resources
        assert measured.latency_s is None and measured.details["dsp"] > 0
    else:
        assert 0 < measured.latency_min_s <= measured.latency_s <= measured.latency_max_s
        assert measured.repeats == 2
    assert name in str(measured)


def test_mlir_dialects_that_do_not_run_here_say_so(block, tmp_path) -> None:
    backend = backends.get_backend("mlir")
    if not backend.available()[0]:
        pytest.skip(backend.available()[1])
    exported = backend.export(block, None, tmp_path, dialect="tosa")
    checkable, why = backend.checkable(exported)
    assert not checkable and "tosa" in why
    with pytest.raises(rewriter.LoweringError, match="linalg-on-tensors"):
        backend.check(block, exported)


def test_hls_decomposes_ops_it_has_no_template_for(tmp_path) -> None:
    # step_part has no HLS template: the export inlines its ATen decomposition (a slice)
    # instead of refusing, as the other backends do
    hls = backends.get_backend("hls")
    if not hls.available()[0]:
        pytest.skip(hls.available()[1])

    class Prefix(torch.nn.Module):
        def forward(self, x):
            return torch.ops.rewriter.step_part(x, 0) * 2.0

    x = torch.randn(2, 5, 3)
    gm = rewriter.trace(Prefix(), (x,))
    assert hls.plan(gm) == {"step_part": "decomposed"}
    exported = hls.export(gm, None, tmp_path)
    report = hls.check(gm, exported)
    assert report.ok and exported.inputs[0] is not None
    with torch.no_grad():
        assert tuple(gm(x).shape) == tuple(exported.result.outputs[0]["shape"])


class _Eager(Backend):
    """A third-party backend for the registry tests: the graph's code as a Python file, run
    by torch in this process."""

    name = "eager-code"
    summary = "the graph's Python code"

    def available(self) -> tuple[bool, str]:
        return True, "torch, in this process"

    def native(self) -> frozenset[str]:
        return frozenset()

    def export(self, gm, inputs, out, **options: Any) -> Exported:
        path = Path(out) / "graph.py"
        path.write_text(gm.code)
        args = rewriter.backends.base.example_inputs(gm, inputs)
        return Exported(self.name, path, gm, {"lines": gm.code.count("\n")}, args)

    def check(self, gm, exported, inputs: Sequence[torch.Tensor] | None = None):
        return rewriter.verify.compare(gm, exported.result, inputs or exported.inputs)

    def measure(self, exported, inputs=None, *, repeats: int = 10) -> Measurement:
        median, low, high = rewriter.backends.base.time_calls(
            lambda: exported.result(*exported.inputs), repeats
        )
        return Measurement(self.name, median, low, high, repeats, exported.path.stat().st_size)


def test_a_third_party_backend_joins_by_name_and_the_cli_offers_it(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(backends._REGISTRY, "user", {})
    assert rewriter.register_backend(_Eager) is _Eager
    assert backends.available()[-1] == "eager-code"
    assert isinstance(backends.get_backend("eager-code"), _Eager)
    rewriter.register_backend(_Eager)  # registering the same class again is harmless

    class Clash(_Eager):
        pass

    with pytest.raises(ValueError, match="already registered by _Eager"):
        backends.register_backend(Clash)
    with pytest.raises(ValueError, match="built-in backend"):
        backends.register_backend(type("Onnx", (_Eager,), {"name": "onnx"}))
    with pytest.raises(ValueError, match="kebab-case"):
        backends.register_backend(type("Bad", (_Eager,), {"name": "Bad_Name"}))
    with pytest.raises(TypeError, match="subclass of Backend"):
        backends.register_backend(dict)
    with pytest.raises(TypeError, match="leaves part of the interface out"):
        backends.register_backend(type("Half", (Backend,), {"name": "half"}))

    from rewriter.cli import main

    config = ModelSpec("gpt2", vocab=64, layers=1, seed=0).config()
    (tmp_path / "config.json").write_text(config.to_json_string())
    out = tmp_path / "out"
    argv = ["run", "--model", str(tmp_path / "config.json"), "--passes", "canonicalize"]
    assert main([*argv, "--out", str(out), "--backend", "eager-code", "--seq", "8"]) == 0
    summary = json.loads((out / "report.json").read_text())
    assert summary["eager-code"]["check"]["ok"] and summary["eager-code"]["lines"] > 10
    assert (out / "graph.py").exists()
