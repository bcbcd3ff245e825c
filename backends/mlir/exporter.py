"""MLIR export through torch-mlir: a rewritten graph as MLIR text in the linalg-on-tensors, TOSA,
StableHLO or torch dialect.

Every ``rewriter::`` op is imported through its ATen decomposition (the op contract), and
``aten.scaled_dot_product_attention`` through a decomposition of our own (matmul, mask, softmax,
matmul): torch-mlir's stock one fails at batch >= 2 on Hugging Face's attention. ShiftQuant
unpacking uses int32 floor division with literal power tables (integer ``pow`` and uint8 shifts
have no lowering in linalg or TOSA).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.fx

from rewriter import ops
from rewriter.errors import LoweringError
from rewriter.ir.graph import copy_graph_module, input_dependent, node_values
from rewriter.ir.trace import trace_info

__all__ = ["DIALECTS", "LIMITS", "Dialect", "MlirExport", "available", "export"]

aten = torch.ops.aten
Dialect = Literal["linalg-on-tensors", "tosa", "stablehlo", "torch"]
DIALECTS: tuple[str, ...] = ("linalg-on-tensors", "tosa", "stablehlo", "torch")

LIMITS: dict[tuple[str, str], str] = {
    ("dynamic", "tosa"): "TOSA needs static shapes (its lowering fails on aten.size.int)",
    ("dynamic", "stablehlo"): "StableHLO fails on cumsum with dynamic shapes",
}
"""(graph kind, dialect) pairs known not to lower, with why (measured; ``docs/backends.md``)."""


def available() -> tuple[bool, str]:
    if importlib.util.find_spec("torch_mlir") is None:
        return False, "torch-mlir is not installed (pip install 'rewriter[mlir]', Python 3.11)"
    return True, "torch-mlir"


@dataclasses.dataclass
class MlirExport:
    """MLIR text of a graph, where it was written, and its signature."""

    text: str
    dialect: str
    path: Path | None
    input_shapes: list[list[int]]
    decomposed: list[str]
    """The ``rewriter::`` ops imported through their decompositions."""
    module: Any = dataclasses.field(default=None, repr=False)
    """The live torch-mlir module (its context knows torch-mlir's own dialects)."""


def _sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """Scaled dot-product attention as matmul, additive mask, softmax, matmul (any batch)."""
    if dropout_p:
        raise LoweringError("attention dropout cannot be exported (eval graphs have none)")
    if enable_gqa and k.shape[-3] != q.shape[-3]:
        repeat = q.shape[-3] // k.shape[-3]
        k = k.repeat_interleave(repeat, -3)
        v = v.repeat_interleave(repeat, -3)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q @ k.transpose(-2, -1)) * scale
    if is_causal:
        t, s = q.shape[-2], k.shape[-2]
        keep = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(s - t)
        scores = scores.masked_fill(~keep, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
    return torch.softmax(scores, -1) @ v


_SDPA = ops.OpContract(
    name="scaled_dot_product_attention",
    overload=aten.scaled_dot_product_attention.default,
    reference=_sdpa,
    decomposition=_sdpa,
    summary="attention as matmul, mask, softmax, matmul",
)


def export(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[torch.Tensor] | None = None,
    path: str | os.PathLike[str] | None = None,
    *,
    dialect: Dialect = "linalg-on-tensors",
    dynamic: bool = False,
) -> MlirExport:
    """MLIR text of ``gm`` (not changed) in ``dialect``, written to ``path`` when given.

    Shapes are static (the example inputs', by default the trace's) unless ``dynamic``, which
    keeps the trace's dynamic dims and only lowers to linalg-on-tensors and torch (``LIMITS``).
    """
    runs, why = available()
    if not runs:
        raise LoweringError(f"MLIR export: {why}")
    if dialect not in DIALECTS:
        raise LoweringError(f"MLIR export: unknown dialect {dialect!r} (one of {DIALECTS})")
    if dynamic and ("dynamic", dialect) in LIMITS:
        raise LoweringError(
            f"MLIR export: {LIMITS[('dynamic', dialect)]}; export with static shapes"
        )
    info = trace_info(gm)
    if example_inputs is None:
        if info is None or info.example_inputs is None:
            raise LoweringError("MLIR export needs example inputs (the graph has no trace info)")
        example_inputs = info.example_inputs
    args = tuple(example_inputs)
    work = copy_graph_module(gm)
    decomposed = sorted(ops.rewriter_nodes(work))
    ops.decompose(work, extra=[_SDPA])  # every rewriter:: op, and attention our way
    if not dynamic:  # fixed shapes: size arithmetic and what depends only on it become constants
        from rewriter.ir.trace import trace

        work = trace(_Positional(work), args)
    _fold_constants(work, args)
    from torch_mlir import fx

    dynamic_shapes = None
    if dynamic:
        batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
        # one entry for _Positional's *args, itself a tuple with one dict per input
        dynamic_shapes = (tuple({0: batch, 1: seq} if a.dim() >= 2 else {} for a in args),)
    try:
        module = fx.export_and_import(
            _Positional(work), *args, output_type=dialect, dynamic_shapes=dynamic_shapes
        )
    except Exception as error:  # torch-mlir reports lowering failures as plain exceptions
        lines = [line for line in str(error).splitlines() if "error:" in line] or [str(error)]
        raise LoweringError(
            f"MLIR export to {dialect} failed: {lines[0].split('error:')[-1].strip()[:400]}"
        ) from error
    if not module.operation.verify():
        raise LoweringError(f"the {dialect} module torch-mlir produced does not verify")
    text = str(module)
    target = Path(path) if path is not None else None
    if target is not None:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    return MlirExport(text, dialect, target, [list(a.shape) for a in args], decomposed, module)


def _fold_constants(gm: torch.fx.GraphModule, args: tuple[torch.Tensor, ...]) -> None:
    """Replace every value that does not depend on the inputs (masks, positions, rotary tables,
    unpacked weights) by a constant: simpler MLIR, and no ``cumsum`` scan (``tm_tensor``, which
    the wheel's Python context cannot parse back)."""
    from rewriter.ir.store import weights

    dependent = input_dependent(gm)
    frontier = [
        n
        for n in gm.graph.nodes
        if n.op == "call_function" and n not in dependent and any(u in dependent for u in n.users)
    ]
    if not frontier:
        return
    wanted = set(frontier)
    values = node_values(gm, args, keep=wanted.__contains__)
    store = weights(gm)
    for node in frontier:
        value = values.get(node)
        if not isinstance(value, torch.Tensor):
            continue
        name = store.fresh_name(f"folded_{node.name}")
        gm.register_buffer(name, value.detach().clone())
        with gm.graph.inserting_before(node):
            constant = gm.graph.get_attr(name)
        constant.meta = dict(node.meta)
        node.replace_all_uses_with(constant)
    gm.graph.eliminate_dead_code()
    gm.recompile()


class _Positional(torch.nn.Module):
    """The graph with positional inputs and a flat tuple of tensor outputs (what MLIR returns)."""

    def __init__(self, gm: torch.fx.GraphModule) -> None:
        super().__init__()
        self.gm = gm

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.gm(*args)
        flat, _ = torch.utils._pytree.tree_flatten(out)
        return tuple(t for t in flat if isinstance(t, torch.Tensor))
