"""The tensors a graph holds: reading and writing them by attribute path, and finding ties.

A weight of a traced graph is an attribute of its module hierarchy (``transformer.h.0.attn.
c_attn.weight``); a tie is several attribute names bound to one tensor object. Identity, never
``data_ptr``, decides a tie (meta tensors all have ``data_ptr() == 0``). Edits of weights go
through :class:`rewriter.ir.store.WeightStore`, which uses these helpers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import torch
import torch.fx

__all__ = [
    "TieGroup",
    "alias_groups",
    "get_tensor",
    "is_weightless",
    "owner_of",
    "prune_dead_get_attrs",
    "set_tensor",
    "tie_groups",
]


def is_weightless(gm: torch.nn.Module) -> bool:
    """Whether ``gm`` holds its tensors on the meta device (traced without weights): its
    structure can be analysed and rewritten, its outputs cannot be computed."""
    return any(t.device.type == "meta" for t in [*gm.parameters(), *gm.buffers()] if t is not None)


def get_tensor(gm: torch.nn.Module, target: str) -> torch.Tensor:
    """The tensor stored at attribute path ``target``."""
    owner, field = owner_of(gm, target)
    value = getattr(owner, field)
    if not isinstance(value, torch.Tensor):
        raise KeyError(f"'{target}' is a {type(value).__name__}, not a tensor")
    return value


def set_tensor(gm: torch.nn.Module, target: str, value: torch.Tensor) -> None:
    """Store ``value`` at attribute path ``target`` (creating parent modules as needed).

    Keeps the attribute's kind: a parameter stays a parameter (frozen unless it was trainable),
    a buffer a buffer. New names become parameters when ``value`` is one, else buffers.
    """
    *path, field = target.split(".")
    owner: torch.nn.Module = gm
    for part in path:
        child = getattr(owner, part, None)
        if child is None:
            child = torch.nn.Module()
            owner.add_module(part, child)
        owner = child
    old = getattr(owner, field, None)
    was_param = field in owner._parameters
    if isinstance(value, torch.nn.Parameter) or (was_param and old is not None):
        if not isinstance(value, torch.nn.Parameter):
            value = torch.nn.Parameter(value, requires_grad=bool(old.requires_grad))
        owner._buffers.pop(field, None)
        owner._parameters[field] = value
    else:
        owner._parameters.pop(field, None)
        owner._buffers[field] = value


def owner_of(gm: torch.nn.Module, target: str) -> tuple[torch.nn.Module, str]:
    """The module that holds attribute path ``target``, and the attribute's name in it."""
    *path, field = target.split(".")
    owner = gm
    for part in path:
        owner = getattr(owner, part)
    return owner, field


def alias_groups(
    module: torch.nn.Module, *, persistent: bool = False
) -> list[tuple[list[str], torch.Tensor]]:
    """Every tensor of ``module`` with all the attribute names bound to it (by identity; a tied
    embedding and head is one group of two names): parameters, then buffers, in registration
    order. ``persistent``: only names in ``module.state_dict()`` (a tensor with none is left
    out), as a Hugging Face model saves them."""
    kept = set(module.state_dict()) if persistent else None
    groups: dict[int, tuple[list[str], torch.Tensor]] = {}
    for name, tensor in _named_tensors(module):
        if kept is None or name in kept:
            groups.setdefault(id(tensor), ([], tensor))[0].append(name)
    return list(groups.values())


@dataclasses.dataclass(frozen=True)
class TieGroup:
    """Attribute names that hold one tensor object, and the graph nodes that read it."""

    names: tuple[str, ...]
    nodes: tuple[torch.fx.Node, ...]

    @property
    def uses(self) -> int:
        """How many graph uses the tensor has, over all its names."""
        return sum(len(n.users) for n in self.nodes)


def tie_groups(gm: torch.fx.GraphModule) -> list[TieGroup]:
    """Groups of attribute names bound to the same tensor (by identity), with their get_attrs.

    Identity, not ``data_ptr``, decides: meta tensors all have ``data_ptr() == 0``.
    Only groups with more than one name or more than one graph use are returned.
    """
    nodes_by_target: dict[str, list[torch.fx.Node]] = {}
    for node in gm.graph.find_nodes(op="get_attr"):
        nodes_by_target.setdefault(node.target, []).append(node)
    groups = []
    for names, _ in alias_groups(gm):
        nodes = tuple(n for name in names for n in nodes_by_target.get(name, ()))
        group = TieGroup(tuple(names), nodes)
        if len(names) > 1 or group.uses > 1:
            groups.append(group)
    return groups


def _named_tensors(gm: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    yield from gm.named_parameters(remove_duplicate=False)
    yield from gm.named_buffers(remove_duplicate=False)


def prune_dead_get_attrs(gm: torch.fx.GraphModule) -> list[str]:
    """Remove get_attr nodes nobody reads, and the attribute names no node refers to any more.

    A tied embedding/head leaves a dead alias ``get_attr`` under the embedding's name; pruning it
    makes the tie visible as one node used twice. Returns the attribute names removed. The caller
    regenerates the code (``gm.recompile()``, or :meth:`rewriter.driver.Rewriter.finish`).
    """
    for node in list(gm.graph.find_nodes(op="get_attr")):
        if not node.users:
            gm.graph.erase_node(node)
    referenced = {n.target for n in gm.graph.find_nodes(op="get_attr")}
    removed = []
    for name, _ in list(_named_tensors(gm)):
        if name not in referenced:
            owner, field = owner_of(gm, name)
            owner._parameters.pop(field, None)
            owner._buffers.pop(field, None)
            removed.append(name)
    return removed
