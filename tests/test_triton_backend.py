"""rewriter.backends.triton without a GPU (the kernels themselves are tested under the
interpreter in tests/triton): the plan, the warning, references that give the graph's outputs,
ops without a kernel named, CUDA registration that leaves CPU alone."""

from __future__ import annotations

import os

import pytest
import torch

import rewriter
from rewriter.verify.families import ModelSpec

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
    reason="checks the behaviour without a GPU or interpreter",
)


@torch.library.custom_op("rewriter::test_only_double", mutates_args=())
def _double(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@_double.register_fake
def _double_fake(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


class _WithUnknownOp(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.rewriter.test_only_double(x) + 1


def test_without_a_gpu_compile_warns_and_runs_the_references() -> None:
    from rewriter.backends import triton as backend

    spec = ModelSpec("llama", vocab=48, layers=2, seed=1)
    model = spec.build()
    example = spec.example_inputs(batch=2, seq=6)
    gm = rewriter.trace(model, example, dynamic_shapes="auto")
    ctx = rewriter.PassContext(
        calibration=torch.randint(0, 48, (4, 12)), progress=False, batch_size=2
    )
    out = (
        rewriter.Pipeline.parse("canonicalize,l1quant(bits=4),linearize(feature_map=elu,window=2)")
        .run(gm, ctx)
        .graph_module
    )
    with pytest.warns(UserWarning, match="no CUDA device"):
        compiled = backend.compile(out)
    assert not compiled.kernels_run
    reasons = [how for how in compiled.plan.values() if how != "triton"]
    assert reasons and all("softmax window 2" in how for how in reasons), compiled.plan
    assert "cannot run here" in compiled.summary()
    with torch.no_grad():
        torch.testing.assert_close(compiled(example[0]).logits, out(example[0]).logits)
    assert rewriter.graph.format_graph(out) == rewriter.graph.format_graph(out)  # input untouched


def test_ops_without_a_kernel_are_named() -> None:
    from rewriter.backends import triton as backend

    gm = rewriter.trace(_WithUnknownOp(), (torch.randn(3, 4),))
    compiled = backend.compile(gm, warn=False)
    assert compiled.missing == ["test_only_double"]
    assert "no Triton kernel" in next(iter(compiled.plan.values()))
    assert "test_only_double" in compiled.summary()
    x = torch.randn(3, 4)
    torch.testing.assert_close(compiled(x), x * 2 + 1)


def test_cuda_registration_leaves_other_devices_on_the_reference() -> None:
    from rewriter.backends import triton as backend

    backend.register_cuda_kernels()
    backend.register_cuda_kernels()  # idempotent
    x = torch.randn(2, 9)
    torch.testing.assert_close(
        torch.ops.rewriter.crms_norm(x, 1e-5), rewriter.ops.OPS["crms_norm"].reference(x, 1e-5)
    )
    assert backend.NATIVE >= {"crms_norm", "l1_norm", "shiftquant_linear", "linear_attention"}


class _NormThenAdd(torch.nn.Module):
    """``rms_norm`` then ``add(y, bias, alpha=alpha)``: a bias add only when ``alpha`` is 1."""

    def __init__(self, alpha: float) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.weight = torch.nn.Parameter(torch.rand(6, generator=generator) + 0.5)
        self.bias = torch.nn.Parameter(torch.randn(6, generator=generator) + 1.0)
        self.alpha = alpha

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.nn.functional.rms_norm(x, (6,), self.weight, 1e-6)
        return torch.add(y, self.bias, alpha=self.alpha)


@pytest.mark.parametrize(("alpha", "fused"), [(1, True), (3, False)])
def test_rms_norm_takes_only_a_plain_add_as_its_bias(alpha, fused) -> None:
    # add(y, b, alpha=3) is y + 3 b: folding it into the RMSNorm as a bias would drop the 3
    from rewriter.backends import triton as backend

    model = _NormThenAdd(alpha)
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(1))
    gm = rewriter.trace(model, (x,))
    compiled = backend.compile(gm, warn=False)
    targets = [n.target for n in compiled.graph_module.graph.nodes if n.op == "call_function"]
    assert targets.count(backend.rms_norm) == 1
    assert (torch.ops.aten.add.Tensor not in targets) == fused, targets
    with torch.no_grad():
        got, want = compiled(x), model(x)
    assert (got - want).abs().max() <= rewriter.verify.tolerance(want)
