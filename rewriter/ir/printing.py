"""A stable, readable printer of graphs (golden tests, debugging) and op counts."""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable
from typing import Any

import sympy
import torch
import torch.fx

from rewriter.errors import describe_node

__all__ = ["format_graph", "nodes_described", "op_counts"]


def op_counts(gm: torch.fx.GraphModule) -> dict[str, int]:
    """How many call_function nodes of each op the graph has (``{"aten.linear.default": 5}``)."""
    counts: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_function":
            key = _op_name(node.target)
            counts[key] = counts.get(key, 0) + 1
    return counts


def _op_name(target: Any) -> str:
    if target is operator.getitem:
        return "getitem"
    text = str(target)
    return text if "." in text and not text.startswith("<") else getattr(target, "__name__", text)


def format_graph(
    gm: torch.fx.GraphModule,
    *,
    dim_names: dict[str, str] | None = None,
    include: Callable[[torch.fx.Node], bool] | None = None,
) -> str:
    """A stable, readable listing of the graph for golden tests and debugging.

    One line per node: ``%name: f32[batch, seq, 32] = aten.layer_norm.default(%x, [32], ...)``.
    Symbolic dims are renamed ``d0, d1, ...`` in order of first appearance (their export names
    change from run to run), or by ``dim_names`` (``{"s43": "batch"}``).
    """
    renames: dict[sympy.Symbol, sympy.Symbol] = {}
    for key, value in (dim_names or {}).items():
        renames[sympy.Symbol(key, integer=True, positive=True)] = sympy.Symbol(value)
    lines = []
    for node in gm.graph.nodes:
        if include is not None and not include(node):
            continue
        lines.append(_format_node(node, renames))
    return "\n".join(lines)


def _format_node(node: torch.fx.Node, renames: dict[sympy.Symbol, sympy.Symbol]) -> str:
    type_text = _format_type(node.meta.get("val"), renames)
    head = f"%{node.name}{': ' + type_text if type_text else ''}"
    if node.op == "placeholder":
        return f"{head} = input"
    if node.op == "get_attr":
        return f"{head} = weight {node.target}"
    if node.op == "output":
        return f"return {_format_arg(node.args[0], renames)}"
    target = _op_name(node.target) if node.op == "call_function" else f"{node.op} {node.target}"
    args = [_format_arg(a, renames) for a in node.args]
    args += [f"{k}={_format_arg(v, renames)}" for k, v in node.kwargs.items()]
    return f"{head} = {target}({', '.join(args)})"


def _format_type(val: Any, renames: dict[sympy.Symbol, sympy.Symbol]) -> str:
    if isinstance(val, torch.Tensor):
        dims = ", ".join(_format_dim(d, renames) for d in val.shape)
        return f"{_DTYPE_SHORT.get(val.dtype, str(val.dtype))}[{dims}]"
    if isinstance(val, (list, tuple)) and val and all(isinstance(v, torch.Tensor) for v in val):
        return "(" + ", ".join(_format_type(v, renames) for v in val) + ")"
    if isinstance(val, torch.SymInt):
        return "sym " + _format_dim(val, renames)
    return ""


def _format_dim(dim: Any, renames: dict[sympy.Symbol, sympy.Symbol]) -> str:
    if isinstance(dim, int):
        return str(dim)
    expr = dim.node.expr if isinstance(dim, torch.SymInt) else dim
    for symbol in sorted(expr.free_symbols, key=str):
        if symbol not in renames:
            renames[symbol] = sympy.Symbol(f"d{len(renames)}")
    return str(expr.xreplace(renames))


def _format_arg(arg: Any, renames: dict[sympy.Symbol, sympy.Symbol]) -> str:
    if isinstance(arg, torch.fx.Node):
        return f"%{arg.name}"
    if isinstance(arg, (list, tuple)):
        inner = ", ".join(_format_arg(a, renames) for a in arg)
        return f"[{inner}]" if isinstance(arg, list) else f"({inner}{',' if len(arg) == 1 else ''})"
    if isinstance(arg, dict):
        return "{" + ", ".join(f"{k}: {_format_arg(v, renames)}" for k, v in arg.items()) + "}"
    if isinstance(arg, torch.SymInt):
        return _format_dim(arg, renames)
    if isinstance(arg, torch.dtype):
        return _DTYPE_SHORT.get(arg, str(arg))
    if isinstance(arg, torch.device):
        return f"'{arg}'"
    return repr(arg)


_DTYPE_SHORT = {
    torch.float32: "f32",
    torch.float64: "f64",
    torch.float16: "f16",
    torch.bfloat16: "bf16",
    torch.int64: "i64",
    torch.int32: "i32",
    torch.int8: "i8",
    torch.uint8: "u8",
    torch.bool: "b8",
}


def nodes_described(nodes: Iterable[torch.fx.Node]) -> str:
    """Comma-separated :func:`describe_node` of each node (for error messages)."""
    return ", ".join(describe_node(n) for n in nodes)
