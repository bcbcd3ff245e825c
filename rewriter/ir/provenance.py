"""Where a node comes from: the module that produced it, and names for new tensors it uses."""

from __future__ import annotations

import torch.fx

from rewriter.errors import source_module

__all__ = ["module_path", "weight_name_for"]


def module_path(node: torch.fx.Node) -> str | None:
    """Path of the innermost module that produced ``node`` (``transformer.h.0.attn``)."""
    source = source_module(node)
    return source[0] if source else None


def weight_name_for(node: torch.fx.Node, suffix: str) -> str:
    """A name for a new tensor used by ``node``: its module path plus ``suffix``.

    ``weight_name_for(linear_node, "lora_A") == "transformer.h.0.attn.c_attn.lora_A"``; nodes
    without a source module fall back to the node's own name. The store makes it unique.
    """
    path = module_path(node)
    return f"{path}.{suffix}" if path else f"{node.name}_{suffix}"
