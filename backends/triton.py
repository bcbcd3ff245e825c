"""Triton backend: the ``rewriter::`` ops (and RMSNorm) run as the Triton kernels of
``kernels/triton`` on a GPU, and rewritten graphs run on them.

Two ways in, sharing one dispatch function per op (same arguments as the op; the kernel for CUDA
tensors, or for CPU tensors under ``TRITON_INTERPRET=1``; the op's reference otherwise):

* :func:`register_cuda_kernels` attaches each dispatch function to its op with
  ``torch.library.register_kernel(op, "cuda", ...)``. The op keeps its reference implementation
  for every other device, its fake kernel, autograd and decomposition; any GraphModule (and
  ``torch.compile``, which sees the op as an opaque call) then runs the kernel on CUDA tensors.
  Why not ``torch.library.triton_op``: defining a ``triton_op`` over an existing ``custom_op`` name
  silently replaces the op, CPU included, and its kernel would have to be traceable by
  ``torch.export`` everywhere we export (ONNX, MLIR), which breaks under the interpreter. The
  price: Inductor cannot fuse into our kernels; it schedules around them.
* :func:`compile` returns a :class:`TritonGraph`: a copy of the graph whose op nodes call the
  dispatch functions directly (so the interpreter runs them on CPU too), with ``aten.rms_norm``
  (and a bias added right after it) lowered to the RMSNorm kernel, ``torch.compile`` for the rest
  when asked, and a plan that names every op without a kernel and every node that runs its
  reference, with the reason.

Kernels cover: ``crms_norm``, ``l1_norm``, ``shiftquant_linear`` (activation quantization first,
in torch), causal ``linear_attention`` without a softmax window, and the deployment ops
``linear_attention_state`` / ``linear_attention_decode`` without a window. A window, non-causal
attention and float64 inputs run the reference, and the plan says so.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.fx
from rewriter.backends.base import (
    Backend,
    Exported,
    Measurement,
    artifact_bytes,
    example_inputs,
    time_calls,
)

from rewriter import ops
from rewriter.ir.graph import copy_graph_module
from rewriter.ir.trace import trace_info
from rewriter.ops.quant import quantize_activations

__all__ = [
    "KERNELS",
    "NATIVE",
    "TritonBackend",
    "TritonGraph",
    "available",
    "compile",
    "register_cuda_kernels",
]

aten = torch.ops.aten
MARKERS = frozenset({"step_part", "cache_point"})
"""Deployment markers: slicing and identity, nothing to accelerate (they run as references)."""


# --- where kernels can run ------------------------------------------------------------------------


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def available() -> tuple[bool, str]:
    """Whether kernels can run here, and why not."""
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed (pip install 'rewriter[triton]')"
    if torch.cuda.is_available():
        return True, f"CUDA device {torch.cuda.get_device_name(0)}"
    if interpreting():
        return True, "Triton interpreter on CPU (TRITON_INTERPRET=1; slow, for tests)"
    return False, "no CUDA device: graphs run the ops' reference implementations"


def _kernel(module: str) -> Any:
    return importlib.import_module(f"rewriter.kernels.triton.{module}")


def _on_kernel_device(x: torch.Tensor) -> bool:
    if x.dtype == torch.float64:
        return False  # kernels accumulate in float32; float64 keeps its reference
    return x.is_cuda or (interpreting() and x.device.type == "cpu")


# --- dispatch functions (the ops' signatures) -----------------------------------------------------


def crms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    if not _on_kernel_device(x):
        return ops.OPS["crms_norm"].reference(x, eps)
    return _kernel("crms_norm").crms_norm(x, eps)


def l1_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    centered: bool,
    factor: float,
) -> torch.Tensor:
    if not _on_kernel_device(x):
        return ops.OPS["l1_norm"].reference(x, weight, bias, eps, centered, factor)
    return _kernel("l1_norm").l1_norm(x, weight, bias, eps, centered, factor)


def shiftquant_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    exponents: torch.Tensor,
    bias: torch.Tensor | None,
    bits: int,
    group: int,
    in_features: int,
    act_bits: int,
) -> torch.Tensor:
    if not _on_kernel_device(x):
        reference = ops.OPS["shiftquant_linear"].reference
        return reference(x, packed, exponents, bias, bits, group, in_features, act_bits)
    if act_bits:
        x = quantize_activations(x, act_bits)
    kernel = _kernel("shiftquant_linear").shiftquant_linear
    return kernel(x, packed, exponents, bias, bits, group, in_features)


def linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    phi_q: torch.Tensor,
    phi_k: torch.Tensor,
    key_mask: torch.Tensor | None,
    decay: torch.Tensor | None,
    window_gate: torch.Tensor | None,
    causal: bool,
    window: int,
    scale: float,
    eps: float,
) -> torch.Tensor:
    if window or not causal or not _on_kernel_device(q):
        return ops.OPS["linear_attention"].decomposition(
            q, k, v, phi_q, phi_k, key_mask, decay, window_gate, causal, window, scale, eps
        )
    out = _kernel("linear_attention").linear_attention_chunked(
        phi_q, phi_k, v, key_mask, decay, eps
    )
    return out.to(q.dtype)


def linear_attention_state(
    k: torch.Tensor,
    v: torch.Tensor,
    phi_k: torch.Tensor,
    key_mask: torch.Tensor | None,
    decay: torch.Tensor | None,
    window: int,
) -> list[torch.Tensor]:
    if window or not _on_kernel_device(k):
        return ops.OPS["linear_attention_state"].reference(k, v, phi_k, key_mask, decay, window)
    _, state, normalizer = _kernel("linear_attention").linear_attention_chunked(
        phi_k, phi_k, v, key_mask, decay, 0.0, write_output=False, return_state=True
    )
    return [state, normalizer]


def linear_attention_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    phi_q: torch.Tensor,
    phi_k: torch.Tensor,
    key_valid: torch.Tensor | None,
    decay: torch.Tensor | None,
    window_gate: torch.Tensor | None,
    state: list[torch.Tensor],
    window: int,
    scale: float,
    eps: float,
) -> list[torch.Tensor]:
    if window or not _on_kernel_device(q) or state[0].dtype != torch.float32:
        return ops.OPS["linear_attention_decode"].reference(
            q, k, v, phi_q, phi_k, key_valid, decay, window_gate, state, window, scale, eps
        )
    out, new_state, new_z = _kernel("linear_attention").linear_attention_decode(
        state[0], state[1], phi_q[:, :, 0], phi_k[:, :, 0], v[:, :, 0], key_valid, decay, eps
    )
    return [out.unsqueeze(2).to(q.dtype), new_state, new_z]


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> torch.Tensor:
    """RMSNorm with optional weight and bias (``aten.rms_norm`` plus a bias add, fused)."""
    if not _on_kernel_device(x):
        width = (x.shape[-1],)
        y = torch.nn.functional.rms_norm(x, width, weight, eps)
        return y + bias if bias is not None else y
    return _kernel("rms_norm").rms_norm(x, weight, bias, eps)


KERNELS: dict[str, Callable[..., Any]] = {
    "crms_norm": crms_norm,
    "l1_norm": l1_norm,
    "shiftquant_linear": shiftquant_linear,
    "linear_attention": linear_attention,
    "linear_attention_state": linear_attention_state,
    "linear_attention_decode": linear_attention_decode,
}
"""``rewriter::`` op name -> its dispatch function (the Triton kernel where it applies)."""

NATIVE = frozenset(KERNELS)
"""The ``rewriter::`` ops this backend has kernels for."""


def _unsupported(name: str, node: torch.fx.Node) -> str | None:
    """Why a node of a kernel-backed op still runs its reference (arguments fixed in the graph)."""
    args = ops.arguments(node)
    if name == "linear_attention" and not args["causal"]:
        return "non-causal linear attention (two matmuls in torch)"
    if name.startswith("linear_attention") and args["window"]:
        return f"softmax window {args['window']} (the kernel has no window part)"
    value = next((a.meta.get("val") for a in node.all_input_nodes if "val" in a.meta), None)
    if isinstance(value, torch.Tensor) and value.dtype == torch.float64:
        return "float64 inputs"
    return None


# --- registration for CUDA dispatch ---------------------------------------------------------------

_REGISTERED = False


def register_cuda_kernels() -> None:
    """Make every kernel-backed op run its Triton kernel on CUDA tensors (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    for name, function in KERNELS.items():
        torch.library.register_kernel(f"rewriter::{name}", "cuda", function)
    _REGISTERED = True


# --- compiling a graph ----------------------------------------------------------------------------


@dataclasses.dataclass
class TritonGraph:
    """A rewritten graph lowered onto the Triton kernels; call it like the graph."""

    graph_module: torch.fx.GraphModule
    plan: dict[str, str]
    """Node -> ``"triton"`` or ``"reference: <why>"``."""
    missing: list[str]
    """``rewriter::`` ops in the graph with no Triton kernel (they run their references)."""
    device: str
    """Where kernels run here (or why they do not)."""
    kernels_run: bool
    compiled: Any = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        runner = self.compiled if self.compiled is not None else self.graph_module
        return runner(*args, **kwargs)

    def summary(self) -> str:
        kernels = sum(1 for how in self.plan.values() if how == "triton")
        where = "run on" if self.kernels_run else "have, but cannot run here,"
        lines = [f"{kernels} of {len(self.plan)} op nodes {where} Triton kernels ({self.device})"]
        lines += [f"  {node}: {how}" for node, how in self.plan.items() if how != "triton"]
        if self.missing:
            lines.append(f"  ops without a Triton kernel: {', '.join(self.missing)}")
        return "\n".join(lines)


def compile(
    gm: torch.fx.GraphModule, *, torch_compile: bool = False, warn: bool = True
) -> TritonGraph:
    """Lower ``gm`` (not changed) onto the Triton kernels; see the module docstring.

    ``torch_compile=True`` also runs the lowered graph through ``torch.compile`` (on a GPU: the
    kernels stay opaque calls and Inductor compiles the rest). Without a GPU it warns and the
    graph runs the references (or the kernels in the interpreter under ``TRITON_INTERPRET=1``).
    """
    runs, device = available()
    if runs and not interpreting():
        register_cuda_kernels()
    work = copy_graph_module(gm)
    plan: dict[str, str] = {}
    missing: set[str] = set()
    for node in list(work.graph.nodes):
        if node.op != "call_function":
            continue
        target = node.target
        if isinstance(target, torch._ops.OpOverload) and target.namespace == "rewriter":
            name = target._opname
            if name in MARKERS:
                continue
            if name not in KERNELS:
                missing.add(name)
                plan[node.name] = "reference: no Triton kernel for this op"
                continue
            reason = _unsupported(name, node)
            if reason:
                plan[node.name] = f"reference: {reason}"
                continue
            node.target = KERNELS[name]
            plan[node.name] = "triton"
        elif target == aten.rms_norm.default:
            _lower_rms_norm(work, node)
            plan[node.name] = "triton"
    work.graph.eliminate_dead_code()
    work.recompile()
    if warn and not runs:
        warnings.warn(f"rewriter.backends.triton: {device}", stacklevel=2)
    compiled = torch.compile(work) if torch_compile else None
    return TritonGraph(work, plan, sorted(missing), device, runs, compiled)


def _lower_rms_norm(gm: torch.fx.GraphModule, node: torch.fx.Node) -> None:
    """``aten.rms_norm(x, shape, weight, eps)`` (and a 1-D bias added right after it) becomes one
    :func:`rms_norm` call."""
    args = list(node.args) + [None] * (4 - len(node.args))
    x, shape, weight, eps = args[:4]
    if len(shape) != 1:
        return  # normalizing over several dims: leave aten's op
    value = x.meta.get("val") if isinstance(x, torch.fx.Node) else None
    if eps is None:
        eps = torch.finfo(value.dtype if value is not None else torch.float32).eps
    bias = None
    users = list(node.users)
    if len(users) == 1 and users[0].target == aten.add.Tensor and users[0].args[0] is node:
        other = users[0].args[1]
        other_value = other.meta.get("val") if isinstance(other, torch.fx.Node) else None
        if isinstance(other_value, torch.Tensor) and tuple(other_value.shape) == tuple(shape):
            bias = other
    with gm.graph.inserting_before(node):
        fused = gm.graph.call_function(rms_norm, (x, weight, bias, float(eps)))
    fused.meta = dict(node.meta)
    if bias is not None:
        add = users[0]
        fused.meta = dict(add.meta)
        add.replace_all_uses_with(fused)
        gm.graph.erase_node(add)
    node.replace_all_uses_with(fused)
    gm.graph.erase_node(node)


# --- the shared backend interface (rewriter.backends.base) ---------------------------------------


class TritonBackend(Backend):
    """The Triton lowering through the shared interface: the lowered graph runs in this
    process; the output folder ``out/triton`` gets its code and per-node plan. Without a GPU the
    kernels do not run (their references do), which :meth:`available` says and the measurement
    records."""

    name = "triton"
    summary = "rewriter:: ops on Triton kernels (GPU; references elsewhere)"
    label = "the Triton lowering"
    options = ("torch_compile",)

    def available(self) -> tuple[bool, str]:
        return available()

    def native(self) -> frozenset[str]:
        return NATIVE

    def plan(self, gm: torch.fx.GraphModule) -> dict[str, str]:
        """``"native"`` for ops with a kernel, ``"reference"`` for the rest: the lowered graph
        calls their Python references (nothing is decomposed or refused)."""
        return {
            name: "native" if name in NATIVE else "reference" for name in ops.rewriter_nodes(gm)
        }

    def checkable(self, exported: Exported) -> tuple[bool, str]:
        return True, "runs in this process (kernels, or their references without a GPU)"

    def export(
        self,
        gm: torch.fx.GraphModule,
        inputs: Sequence[torch.Tensor] | None,
        out: str | os.PathLike[str],
        **options: Any,
    ) -> Exported:
        lowered = compile(gm, warn=False, **options)
        folder = Path(out) / "triton"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "graph.py").write_text(lowered.graph_module.code)
        plan = {"device": lowered.device, "kernels_run": lowered.kernels_run, "nodes": lowered.plan}
        (folder / "plan.json").write_text(json.dumps(plan, indent=2))
        info = {"device": lowered.device, "kernels_run": lowered.kernels_run}
        info["missing"] = lowered.missing
        return Exported(self.name, folder, lowered, info, example_inputs(gm, inputs))

    def check(
        self,
        gm: torch.fx.GraphModule,
        exported: Exported,
        inputs: Sequence[torch.Tensor] | None = None,
    ) -> Any:
        from rewriter.verify import compare_outputs, graph_reference, outputs, run

        args, reference = graph_reference(gm, exported.inputs if inputs is None else inputs)
        got = run(_runner(exported.result), args, trace_info(gm))
        return compare_outputs(reference, outputs(got), None, None)

    def measure(
        self,
        exported: Exported,
        inputs: Sequence[torch.Tensor] | None = None,
        *,
        repeats: int = 10,
    ) -> Measurement:
        from rewriter.verify import run

        args = tuple(exported.inputs if inputs is None else inputs)
        runner, info = _runner(exported.result), trace_info(exported.result.graph_module)

        def call() -> None:
            run(runner, args, info)

        median, low, high = time_calls(call, repeats)
        details = {"device": exported.result.device, "kernels_run": exported.result.kernels_run}
        return Measurement(
            self.name, median, low, high, repeats, artifact_bytes(exported.path), details
        )


def _runner(lowered: TritonGraph) -> torch.nn.Module:
    return lowered.compiled if lowered.compiled is not None else lowered.graph_module
