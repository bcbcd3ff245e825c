"""Marker ops of the step graph a causal LM is traced into for deployment (:mod:`rewriter.deploy`).

A step graph computes a prompt's prefix with a cache and its last token from that cache, in one
graph that takes and returns exactly what a full-sequence forward does. These ops mark where the
graph is cut into a prefill graph and a decode graph after the passes have run:

* ``rewriter::step_part(x, part)``: ``x[:, :-1]`` (``part=0``, what prefill sees) or ``x[:, -1:]``
  (``part=1``, the token decode sees). In the prefill graph it becomes ``x`` itself; in the
  decode graph its input becomes the one-token input.
* ``rewriter::cache_point(x, layer, kind)``: ``x`` unchanged; a tensor prefill hands to decode
  (``kind`` 0: keys, 1: values; 2 and up: a linearized layer's recurrent state, see
  :data:`CACHE_KINDS`). The cut makes it a prefill output and a decode input.

Both are plain slicing and identity, so a step graph runs, trains and verifies like any graph.
"""

from __future__ import annotations

import torch

from rewriter.ops.contract import OpContract, register

__all__ = ["CACHE_KINDS", "FIRST_STATE_KIND", "cache_point", "step_part"]

CACHE_KINDS = {
    0: "key",
    1: "value",
    2: "state",
    3: "normalizer",
    4: "window_key",
    5: "window_value",
    6: "window_feature",
    7: "window_valid",
}
"""Names of the cache kinds: a softmax layer's keys and values (which grow by one position per
token, along dim 2), and a linearized layer's fixed-size state, in
``rewriter::linear_attention_state``'s order (``S``, ``z``, and with a window its last keys,
values, key features and validity)."""

FIRST_STATE_KIND = 2
"""The kind of a linearized layer's first state tensor (``S``)."""


def step_part_reference(x: torch.Tensor, part: int) -> torch.Tensor:
    """``x[:, :-1]`` for ``part=0`` (the prefix), ``x[:, -1:]`` for ``part=1`` (the last token)."""
    if part not in (0, 1):
        raise ValueError(f"step_part: part must be 0 (prefix) or 1 (last token), got {part}")
    return (x[:, :-1] if part == 0 else x[:, -1:]).clone()


@torch.library.custom_op("rewriter::step_part", mutates_args=())
def step_part(x: torch.Tensor, part: int) -> torch.Tensor:
    """The prefix (``part=0``) or the last token (``part=1``) of a [batch, time, ...] tensor."""
    return step_part_reference(x, part)


@step_part.register_fake
def _step_part_fake(x: torch.Tensor, part: int) -> torch.Tensor:
    length = x.shape[1] - 1 if part == 0 else 1
    return x.new_empty((x.shape[0], length, *x.shape[2:]))


def _step_part_backward(ctx: object, grad: torch.Tensor) -> tuple[torch.Tensor | None, None]:
    shape, part = ctx.shape, ctx.part  # type: ignore[attr-defined]
    full = grad.new_zeros(shape)
    if part == 0:
        full[:, :-1] = grad
    else:
        full[:, -1:] = grad
    return full, None


def _step_part_setup(ctx: object, inputs: tuple[torch.Tensor, int], output: torch.Tensor) -> None:
    ctx.shape, ctx.part = inputs[0].shape, inputs[1]  # type: ignore[attr-defined]


step_part.register_autograd(_step_part_backward, setup_context=_step_part_setup)


def cache_point_reference(x: torch.Tensor, layer: int, kind: int) -> torch.Tensor:
    """``x`` (a copy): the marker carries only its layer and kind."""
    return x.clone()


@torch.library.custom_op("rewriter::cache_point", mutates_args=())
def cache_point(x: torch.Tensor, layer: int, kind: int) -> torch.Tensor:
    """``x`` unchanged, marked as the ``kind`` cache tensor of ``layer``."""
    return cache_point_reference(x, layer, kind)


@cache_point.register_fake
def _cache_point_fake(x: torch.Tensor, layer: int, kind: int) -> torch.Tensor:
    return torch.empty_like(x)


cache_point.register_autograd(
    lambda ctx, grad: (grad, None, None), setup_context=lambda ctx, inputs, output: None
)

register(
    OpContract(
        name="step_part",
        overload=torch.ops.rewriter.step_part.default,
        reference=step_part_reference,
        decomposition=step_part_reference,
        summary="the prefix or the last token of a step graph's input (a cut marker)",
        samples=lambda s: [(s.rand(2, 4, 3), 0), (s.rand(2, 4, 3), 1)],
    )
)
register(
    OpContract(
        name="cache_point",
        overload=torch.ops.rewriter.cache_point.default,
        reference=cache_point_reference,
        decomposition=cache_point_reference,
        summary="a cache tensor prefill hands to decode (identity; a cut marker)",
        samples=lambda s: [(s.rand(2, 2, 3, 4), 0, 1)],
    )
)
