"""Fake-tensor metadata: every node's ``meta["val"]`` (shape, dtype, symbolic dims), computed with
the fake mode ``torch.export`` created, and recomputed after an edit."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from rewriter.ir.tensors import get_tensor

__all__ = ["fake_mode_of", "propagate_node", "refresh_meta"]


def fake_mode_of(gm: torch.fx.GraphModule) -> FakeTensorMode | None:
    """The fake mode the export created (shared by every ``meta["val"]``), if there is one."""
    vals = [n.meta.get("val") for n in gm.graph.find_nodes(op="placeholder")]
    vals += [n.meta.get("val") for n in gm.graph.find_nodes(op="get_attr")]
    return detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)])


def refresh_meta(gm: torch.fx.GraphModule) -> None:
    """Recompute every node's ``meta["val"]`` with the export's fake mode (and its shape env)."""
    mode = fake_mode_of(gm)
    if mode is None:
        return
    _fake_get_attrs(gm, mode)
    placeholders = [n.meta["val"] for n in gm.graph.find_nodes(op="placeholder")]
    from torch._dispatch.python import enable_python_dispatcher

    with enable_python_dispatcher():
        FakeTensorProp(gm, mode=mode).propagate_dont_convert_inputs(*placeholders)


def _fake_get_attrs(gm: torch.fx.GraphModule, mode: FakeTensorMode) -> None:
    for node in gm.graph.find_nodes(op="get_attr"):
        tensor = get_tensor(gm, str(node.target))
        val = node.meta.get("val")
        if not _matches(val, tensor):
            node.meta["val"] = mode.from_tensor(tensor, static_shapes=True)


def _matches(val: Any, tensor: torch.Tensor) -> bool:
    return (
        isinstance(val, torch.Tensor)
        and val.shape == tensor.shape
        and val.dtype == tensor.dtype
        and val.device == tensor.device
    )


def propagate_node(
    gm: torch.fx.GraphModule, node: torch.fx.Node, mode: FakeTensorMode | None
) -> None:
    """Set ``node.meta["val"]`` by running its op on its inputs' fake values."""
    if mode is None:
        return
    if node.op == "get_attr":
        node.meta["val"] = mode.from_tensor(get_tensor(gm, str(node.target)), static_shapes=True)
        return
    if node.op != "call_function":
        return

    def fake(arg: Any) -> Any:
        if isinstance(arg, torch.fx.Node):
            if "val" not in arg.meta:
                propagate_node(gm, arg, mode)
            return arg.meta.get("val")
        return arg

    args = torch.fx.node.map_aggregate(node.args, fake)
    kwargs = torch.fx.node.map_aggregate(node.kwargs, fake)
    from torch._dispatch.python import enable_python_dispatcher

    with mode, enable_python_dispatcher():
        node.meta["val"] = node.target(*args, **kwargs)
