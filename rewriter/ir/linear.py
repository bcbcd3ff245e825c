"""Linear maps: one view (:class:`LinearMap`) over every form ``y = x W^T + b`` takes in an
exported graph (``linear``, GPT-2's ``addmm`` over ``Conv1D`` weights, ``mm``/``matmul`` with an
optional bias ``add``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.fx

from rewriter.ir.lookthrough import transparent_users
from rewriter.ir.provenance import module_path

__all__ = ["LinearMap", "as_linear", "is_lm_head", "linear_maps"]

aten = torch.ops.aten


@dataclasses.dataclass(frozen=True)
class LinearMap:
    """One view over every form a linear map ``y = x W^T + b`` takes in an exported graph.

    ``layout`` says how the stored weight is laid out: ``"out_in"`` for ``nn.Linear`` and
    ``aten.linear``, ``"in_out"`` for GPT-2's ``Conv1D`` (``addmm(b, x, W)``) and ``x @ W``.
    """

    node: torch.fx.Node
    """The matmul node (``linear``, ``addmm``, ``mm`` or ``matmul``)."""
    output: torch.fx.Node
    """The node whose value is ``x W^T + b`` (the matmul itself, or the bias ``add``)."""
    input: torch.fx.Node
    weight: torch.fx.Node
    """The ``get_attr`` of the stored weight."""
    layout: str
    bias: torch.fx.Node | None
    in_features: int
    out_features: int

    @property
    def weight_name(self) -> str:
        return str(self.weight.target)

    @property
    def bias_name(self) -> str | None:
        return None if self.bias is None else str(self.bias.target)

    @property
    def module(self) -> str:
        """Module path of the map, from its weight's name (``transformer.h.0.attn.c_attn``)."""
        return self.weight_name.rsplit(".", 1)[0] if "." in self.weight_name else self.weight_name

    @property
    def path(self) -> str:
        """Module path of the map: the module that produced its matmul node, else the module of
        its weight (:attr:`module`). Names adapters and reports."""
        return module_path(self.node) or self.module

    @property
    def out_dim(self) -> int:
        """The weight dimension that indexes output features."""
        return 0 if self.layout == "out_in" else 1

    @property
    def in_dim(self) -> int:
        """The weight dimension that indexes input features."""
        return 1 - self.out_dim


_TRANSPOSES = {aten.t.default, aten.transpose.int, aten.permute.default, aten.numpy_T.default}


def _weight_operand(node: Any) -> tuple[torch.fx.Node, bool] | None:
    """(get_attr, transposed) when ``node`` is a 2-D stored weight or its transpose."""
    if not isinstance(node, torch.fx.Node):
        return None
    if node.op == "get_attr":
        return (node, False) if _val_dim(node) == 2 else None
    if node.op == "call_function" and node.target in _TRANSPOSES:
        source = node.args[0]
        if isinstance(source, torch.fx.Node) and source.op == "get_attr" and _val_dim(source) == 2:
            if node.target == aten.permute.default and list(node.args[1]) != [1, 0]:
                return None
            return source, True
    return None


def _bias_operand(node: Any, out_features: int) -> torch.fx.Node | None:
    if isinstance(node, torch.fx.Node) and node.op == "get_attr":
        val = node.meta.get("val")
        if val is not None and tuple(val.shape) == (out_features,):
            return node
    return None


def as_linear(node: torch.fx.Node) -> LinearMap | None:
    """The linear map computed by ``node``, if it is one (any of the forms export produces)."""
    if node.op != "call_function":
        return None
    if node.target == aten.linear.default:
        return _from_linear(node)
    if node.target == aten.addmm.default:
        return _from_addmm(node)
    if node.target in (aten.mm.default, aten.matmul.default):
        return _from_matmul(node)
    return None


def _from_linear(node: torch.fx.Node) -> LinearMap | None:
    weight = _weight_operand(node.args[1])
    if weight is None or weight[1]:
        return None
    out_f, in_f = _shape(weight[0])
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    if bias is not None and _bias_operand(bias, out_f) is None:
        return None
    return LinearMap(node, node, node.args[0], weight[0], "out_in", bias, in_f, out_f)


def _from_addmm(node: torch.fx.Node) -> LinearMap | None:
    # GPT-2's Conv1D: addmm(bias, x, W) with W stored (in, out); a decomposed linear has W^T.
    if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
        return None
    weight = _weight_operand(node.args[2])
    if weight is None:
        return None
    layout, in_f, out_f = _layout(weight)
    bias = _bias_operand(node.args[0], out_f)
    if bias is None:
        return None
    return LinearMap(node, node, node.args[1], weight[0], layout, bias, in_f, out_f)


def _from_matmul(node: torch.fx.Node) -> LinearMap | None:
    # x @ W (+ b): the bias add, when there is one, is part of the map.
    weight = _weight_operand(node.args[1])
    if weight is None:
        return None
    layout, in_f, out_f = _layout(weight)
    output, bias = node, None
    if len(node.users) == 1:
        user = next(iter(node.users))
        if user.target == aten.add.Tensor and user.args[0] is node and not user.kwargs:
            bias = _bias_operand(user.args[1], out_f)
            output = user if bias is not None else node
    return LinearMap(node, output, node.args[0], weight[0], layout, bias, in_f, out_f)


def _layout(weight: tuple[torch.fx.Node, bool]) -> tuple[str, int, int]:
    """(layout, in_features, out_features) of a matmul's right operand."""
    rows, cols = _shape(weight[0])
    if weight[1]:  # transposed (out, in) storage
        return "out_in", cols, rows
    return "in_out", rows, cols


def is_lm_head(lin: LinearMap) -> bool:
    """A map whose output is a graph output (through views) or whose weight an embedding reads."""
    if any(u.target == aten.embedding.default for u in lin.weight.users):
        return True
    users = transparent_users(lin.output, through_any_argument=True)
    return any(user.op == "output" for user in users)


def linear_maps(gm: torch.fx.GraphModule) -> list[LinearMap]:
    """Every linear map of the graph, in graph order."""
    return [lin for node in gm.graph.nodes if (lin := as_linear(node)) is not None]


def _shape(node: torch.fx.Node) -> tuple[int, ...]:
    return tuple(int(s) for s in node.meta["val"].shape)


def _val_dim(node: torch.fx.Node) -> int | None:
    val = node.meta.get("val")
    return val.dim() if isinstance(val, torch.Tensor) else None
