"""A rewritten graph lowered onto the Triton kernels: :func:`compile` returns a
:class:`TritonGraph`, a copy of the graph whose op nodes call the dispatch functions of
:mod:`rewriter.backends.triton.dispatch` directly (so the interpreter runs them on CPU too), with
``aten.rms_norm`` (and a bias added right after it) lowered to the RMSNorm kernel,
``torch.compile`` for the rest when asked, and a plan that names every op without a kernel and
every node that runs its reference, with the reason."""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import torch
import torch.fx
from rewriter.backends.triton.dispatch import (
    KERNELS,
    available,
    interpreting,
    register_cuda_kernels,
    rms_norm,
)

from rewriter import ops
from rewriter.ir.graph import copy_graph_module

__all__ = ["MARKERS", "TritonGraph", "compile"]

aten = torch.ops.aten
MARKERS = frozenset({"step_part", "cache_point"})
"""Deployment markers: slicing and identity, nothing to accelerate (they run as references)."""


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
    args = ops.arguments(node)
    x, shape, weight, eps = (args[n] for n in ("input", "normalized_shape", "weight", "eps"))
    if len(shape) != 1:
        return  # normalizing over several dims: leave aten's op
    value = x.meta.get("val") if isinstance(x, torch.fx.Node) else None
    if eps is None:
        eps = torch.finfo(value.dtype if value is not None else torch.float32).eps
    bias = None
    users = list(node.users)
    if len(users) == 1 and users[0].target == aten.add.Tensor:
        add = ops.arguments(users[0])
        other = add["other"]
        other_value = other.meta.get("val") if isinstance(other, torch.fx.Node) else None
        shaped = isinstance(other_value, torch.Tensor) and tuple(other_value.shape) == tuple(shape)
        if add["self"] is node and add["alpha"] == 1 and shaped:
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
