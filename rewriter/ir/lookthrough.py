"""Looking through the ops a value passes unchanged (casts, views, token slices, eval dropout):
a residual stream, a linear map's output or a weight keeps its identity across them.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.fx

__all__ = [
    "is_metadata_reader",
    "is_transparent",
    "last_dim",
    "look_back",
    "transparent_users",
]

aten = torch.ops.aten

_CASTS = {aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, aten.type_as.default}
_IDENTITIES = {aten.alias.default, aten.clone.default, aten.contiguous.default, aten.detach.default}
_RESHAPES = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
_METADATA_READERS = {
    aten._assert_tensor_metadata.default,
    aten.sym_size.int,
    aten.sym_numel.default,
    aten.sym_stride.int,
    aten.sym_storage_offset.default,
}


def last_dim(node: Any) -> Any:
    """The size of the last dimension of ``node``'s value (an int or a SymInt); None when
    ``node`` is not a node with a tensor value of at least one dimension."""
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return val.shape[-1] if isinstance(val, torch.Tensor) and val.dim() > 0 else None


def is_transparent(node: torch.fx.Node) -> bool:
    """True when ``node`` passes each last-dim vector of its first input through unchanged.

    These are the ops a residual stream flows through: eval dropout, aliases and clones, dtype
    casts, views, reshapes and transposes that keep the last dimension in place, and slices or
    selects of tokens (any dim but the last).
    """
    if node.op != "call_function" or not node.args or not isinstance(node.args[0], torch.fx.Node):
        return False
    target = node.target
    if target == aten.dropout.default:
        return len(node.args) > 2 and node.args[2] is False
    if target in _IDENTITIES or target in _CASTS:
        return True
    source = node.args[0]
    if target in _RESHAPES:
        return _same_last_dim(source, node)
    if target == aten.transpose.int:
        rank = source.meta["val"].dim()
        dims = {d % rank for d in node.args[1:3]}
        return rank - 1 not in dims
    if target == aten.permute.default:
        perm = list(node.args[1])
        return perm[-1] % len(perm) == len(perm) - 1
    if target in (aten.slice.Tensor, aten.select.int):
        # Picking tokens (any dim but the last) passes each last-dim vector through unchanged.
        rank = source.meta["val"].dim()
        dim = node.args[1] if len(node.args) > 1 else 0
        return isinstance(dim, int) and dim % rank != rank - 1
    return False


def _same_last_dim(a: torch.fx.Node, b: torch.fx.Node) -> bool:
    last_a, last_b = last_dim(a), last_dim(b)
    return isinstance(last_a, int) and last_a == last_b


def is_metadata_reader(node: torch.fx.Node) -> bool:
    """True for nodes that read only a tensor's metadata (asserts, ``sym_size``), not its values."""
    return node.op == "call_function" and node.target in _METADATA_READERS


def look_back(node: torch.fx.Node) -> torch.fx.Node:
    """The first non-transparent producer of ``node`` (``node`` itself if it is not transparent)."""
    while is_transparent(node):
        node = node.args[0]
    return node


def transparent_users(
    node: torch.fx.Node, *, through_any_argument: bool = False
) -> Iterator[torch.fx.Node]:
    """Users of ``node``'s value, looking through transparent ops; metadata readers skipped.

    A transparent op passes on the value of its first argument, so by default it is looked
    through only where the value arrives as that argument (``type_as(x, value)`` casts ``x``: it
    is a user of ``value``, not a carrier of it). ``through_any_argument`` looks through a
    transparent op whatever argument the value arrives as: the looser reach
    :func:`rewriter.ir.linear.is_lm_head` uses to find an output behind views.
    """
    seen: set[torch.fx.Node] = set()
    stack = [(user, node) for user in node.users]
    while stack:
        user, source = stack.pop()
        if user in seen or is_metadata_reader(user):
            continue
        seen.add(user)
        if is_transparent(user) and (through_any_argument or user.args[0] is source):
            stack.extend((next_user, user) for next_user in user.users)
        else:
            yield user
