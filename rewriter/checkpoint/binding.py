"""Binding written weights to a weightless graph: :func:`bind` (and ``rewriter.load(pt2,
weights_dir)``) puts the tensors of a directory written by
:func:`rewriter.checkpoint.write_checkpoint` into the graph, restoring ties, and moves the device
constants the meta trace baked in to the weights' device.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.fx

from rewriter.checkpoint.shards import INDEX_FILE, Shards
from rewriter.errors import RewriterError
from rewriter.ir.store import STORE_KEY
from rewriter.ir.tensors import alias_groups, set_tensor

__all__ = ["bind", "retarget_devices"]


def bind(
    gm: torch.fx.GraphModule,
    directory: str | os.PathLike[str],
    *,
    device: str | torch.device = "cpu",
) -> torch.fx.GraphModule:
    """Load the weights in ``directory`` (written by :func:`write_checkpoint`) into the
    weightless graph ``gm`` (in place), restoring ties, and move the graph's device constants
    from ``meta`` to ``device``. Returns ``gm``."""
    device = torch.device(device)
    shards = Shards(directory)
    index_file = Path(directory) / INDEX_FILE
    aliases: dict[str, str] = {}
    if index_file.exists():
        aliases = json.loads(index_file.read_text()).get("metadata", {}).get("aliases", {})
    loaded: dict[str, torch.Tensor] = {}
    missing = []
    for names, tensor in alias_groups(gm):
        key = next((n for n in names if n in shards), None) or next(
            (aliases[n] for n in names if n in aliases and aliases[n] in shards), None
        )
        if key is None:
            missing.append(names[0])
            continue
        if key not in loaded:
            value = shards.view(key).to(device, copy=True)
            shards.release(key)
            if tuple(value.shape) != tuple(tensor.shape):
                raise RewriterError(
                    f"'{key}' in {directory} has shape {tuple(value.shape)}, the graph expects "
                    f"{tuple(tensor.shape)}"
                )
            loaded[key] = value
        value = loaded[key]
        if isinstance(tensor, torch.nn.Parameter):
            value = torch.nn.Parameter(value, requires_grad=False)
            loaded[key] = value
        for name in names:
            set_tensor(gm, name, value)
    shards.close()
    if missing:
        raise RewriterError(f"{directory} has no weights named {missing[:5]}")
    retarget_devices(gm, device)
    gm.meta.pop(STORE_KEY, None)
    return gm


def retarget_devices(gm: torch.fx.GraphModule, device: torch.device) -> int:
    """Point the ``device=meta`` arguments a meta trace baked into the graph (positions from
    ``arange``, casts) at ``device``. Returns how many nodes changed."""

    def swap(value: Any) -> Any:
        if isinstance(value, torch.device) and value.type == "meta":
            return device
        return value

    changed = 0
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        args = torch.fx.node.map_aggregate(node.args, swap)
        kwargs = torch.fx.node.map_aggregate(node.kwargs, swap)
        if args != node.args or kwargs != node.kwargs:
            node.args, node.kwargs = args, kwargs
            changed += 1
    if changed:
        gm.recompile()
    return changed
