"""Attaching a safetensors checkpoint to a weightless graph (:func:`rewriter.trace_weightless`).

:func:`open_checkpoint` gives every tensor of the graph its first version, the stored tensor of
the checkpoint (buffers that no checkpoint holds, like the rotary ``inv_freq``, are recomputed
from the config), and puts the :class:`~rewriter.checkpoint.store.Plan` where
:func:`rewriter.ir.store.weights` finds it.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.fx

from rewriter.checkpoint.shards import Shards
from rewriter.checkpoint.store import Plan
from rewriter.checkpoint.versions import Stored
from rewriter.errors import PreconditionError, RewriterError
from rewriter.ir.store import STORE_KEY
from rewriter.ir.tensors import alias_groups, get_tensor, is_weightless
from rewriter.ir.trace import trace_info
from rewriter.ir.weightless import architecture

__all__ = ["open_checkpoint"]


def open_checkpoint(
    gm: torch.fx.GraphModule,
    source: str | os.PathLike[str] | Shards,
    *,
    spill_dir: str | os.PathLike[str] | None = None,
    config: Any = None,
) -> Plan:
    """Attach the safetensors checkpoint ``source`` to the weightless graph ``gm`` (in place):
    every tensor of the graph is matched by name (any alias of a tied tensor will do) and shape;
    buffers the checkpoint lacks are recomputed from the model's config."""
    if not is_weightless(gm):
        raise PreconditionError(
            "open_checkpoint needs a weightless graph (rewriter.trace_weightless)"
        )
    shards = source if isinstance(source, Shards) else Shards(source)
    plan = Plan(shards, spill_dir=spill_dir)
    missing: dict[str, list[str]] = {}
    for names, tensor in alias_groups(gm):
        key = next((n for n in names if n in shards), None)
        if key is None:
            missing[names[0]] = names
            continue
        entry = shards.entries[key]
        if entry.shape != tuple(tensor.shape):
            raise RewriterError(
                f"checkpoint tensor '{key}' has shape {entry.shape}, the graph expects "
                f"{tuple(tensor.shape)}"
            )
        if entry.dtype != tensor.dtype:
            raise RewriterError(
                f"checkpoint tensor '{key}' is {entry.dtype}, the graph was traced with "
                f"{tensor.dtype}: trace with trace_weightless(..., dtype={entry.dtype})"
            )
        plan.register(tensor, Stored(shards, key, entry.shape, entry.dtype))
    if missing:
        computed = _buffer_values_from_config(gm, config, list(missing))
        for name, names in missing.items():
            value = computed.get(name)
            if value is None:
                raise RewriterError(
                    f"the checkpoint has no tensor '{name}' (nor its aliases {names[1:]}), and it "
                    "is not a buffer the model computes from its config"
                )
            plan.register(get_tensor(gm, name), plan.hold(value.to(get_tensor(gm, name).dtype)))
    gm.meta[STORE_KEY] = plan
    return plan


def _buffer_values_from_config(
    gm: torch.fx.GraphModule, config: Any, names: list[str]
) -> dict[str, torch.Tensor]:
    """Buffers a model computes in ``__init__`` (rotary ``inv_freq``): rebuilt by constructing
    the owning module again on the CPU from the model's config."""
    if config is None:
        info = trace_info(gm)
        if info is None or info.config is None:
            return {}
        config = info.config
    config, cls = architecture(config)
    with torch.device("meta"):
        model = cls(config)
    values: dict[str, torch.Tensor] = {}
    for name in names:
        owner_path, _, local = name.rpartition(".")
        try:
            owner = model.get_submodule(owner_path)
        except AttributeError:
            continue
        owner_config = getattr(owner, "config", None)
        if owner_config is None:
            continue
        try:
            fresh = type(owner)(owner_config)
        except TypeError:
            continue
        value = getattr(fresh, local, None)
        if isinstance(value, torch.Tensor) and value.device.type != "meta":
            values[name] = value.detach()
    return values
