"""Hypothesis strategies: valid inputs for a traced graph, and small model configs.

:func:`inputs` draws valid flat inputs for a graph: token ids in the embedding's range, 0/1
attention masks with padding, float tensors, dynamic dims within their proven ranges (and the
model's position limit). Each draw is made of dim sizes, a value seed and a padding side
(:func:`input_parts`, :func:`build_inputs`), so examples shrink to small, readable cases.
:func:`model_specs` draws random model configs per family (``outliers=True`` injects outlier
channels and large activations); see :mod:`rewriter.verify.families`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx
from hypothesis import strategies as st

from rewriter.analysis import vocab
from rewriter.ir.graph import look_back
from rewriter.ir.trace import TraceInfo, trace_info
from rewriter.verify.families import FAMILIES, Choices, ModelSpec

__all__ = ["InputSpec", "input_specs", "inputs", "model_specs", "position_limits"]

aten = torch.ops.aten


# --- input strategies -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """What a valid value of one graph input looks like."""

    name: str
    dtype: torch.dtype
    shape: tuple[int | str, ...]
    """Static sizes, or the name of a dynamic dim."""
    kind: str
    """``"tokens"`` (ids below ``high``), ``"mask"`` (0/1, padded), ``"int"`` or ``"float"``."""
    high: int = 2
    values: torch.Tensor | None = dataclasses.field(default=None, compare=False)
    """For ``"tokens"``: the ids to draw from, when not all ids below ``high`` are valid (a
    trimmed graph that still takes original ids)."""


def input_specs(gm: torch.fx.GraphModule) -> list[InputSpec]:
    """One :class:`InputSpec` per graph input, from the placeholders and their uses."""
    info = trace_info(gm)
    names = info.input_names if info is not None else None
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    dim_names = _dim_names(info, placeholders)
    specs = []
    for i, node in enumerate(placeholders):
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            continue
        name = names[i] if names is not None and i < len(names) else node.name
        shape = tuple(_dim_label(d, dim_names) for d in val.shape)
        specs.append(_classify(gm, node, name, val.dtype, shape))
    return specs


def _dim_label(dim: Any, dim_names: dict[str, str]) -> int | str:
    if isinstance(dim, torch.SymInt):
        return dim_names.get(str(dim.node.expr), str(dim.node.expr))
    return int(dim)


def _dim_names(info: TraceInfo | None, placeholders: list[torch.fx.Node]) -> dict[str, str]:
    names: dict[str, str] = {}
    if info is None:
        return names
    for input_name, node in zip(info.input_names, placeholders):
        val = node.meta.get("val")
        for axis, dim_name in info.dynamic_dims.get(input_name, {}).items():
            size = val.shape[axis]
            if isinstance(size, torch.SymInt):
                names.setdefault(str(size.node.expr), dim_name)
    return names


def _classify(
    gm: torch.fx.GraphModule, node: torch.fx.Node, name: str, dtype: torch.dtype, shape: tuple
) -> InputSpec:
    if dtype.is_floating_point:
        return InputSpec(name, dtype, shape, "float")
    vmap = vocab.vocab_map(gm)
    if vmap is not None and vmap.ids == "original" and name in vmap.token_inputs:
        return InputSpec(name, dtype, shape, "tokens", vmap.original_size, vmap.kept)
    rows = _embedding_rows(node)
    if rows is not None:
        return InputSpec(name, dtype, shape, "tokens", rows)
    if "mask" in name or dtype == torch.bool:
        return InputSpec(name, dtype, shape, "mask")
    return InputSpec(name, dtype, shape, "int", 2)


def _embedding_rows(node: torch.fx.Node) -> int | None:
    """Rows of the embedding tables the input indexes (the smallest, if several)."""
    rows = []
    stack, seen = [node], set()
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        for user in current.users:
            if user.op != "call_function":
                continue
            if user.target == aten.embedding.default and look_back(user.args[1]) is look_back(
                current
            ):
                table = user.args[0].meta.get("val")
                if table is not None:
                    rows.append(int(table.shape[0]))
            elif user.target in (
                aten.view.default,
                aten.reshape.default,
                aten.unsqueeze.default,
                aten.expand.default,
                aten.to.dtype,
                aten._to_copy.default,
                aten.clone.default,
                aten.alias.default,
                aten.slice.Tensor,
                torch.ops.rewriter.step_part.default,
            ):
                stack.append(user)
    return min(rows) if rows else None


def inputs(
    gm: torch.fx.GraphModule,
    *,
    max_size: int = 16,
    specs: Sequence[InputSpec] | None = None,
) -> st.SearchStrategy[tuple[torch.Tensor, ...]]:
    """A strategy of valid flat inputs (``TraceInfo.input_names`` order) for ``gm``.

    Dynamic dims are drawn within their proven range, capped by ``max_size`` and the model's
    position limit; values come from a drawn seed, so examples shrink to small, readable cases.
    """
    specs = list(specs) if specs is not None else input_specs(gm)
    parts = input_parts(dim_bounds(gm, specs, trace_info(gm), max_size))
    return parts.map(lambda drawn: build_inputs(specs, *drawn))


def input_parts(
    bounds: dict[str, tuple[int, int]],
) -> st.SearchStrategy[tuple[dict[str, int], int, str]]:
    """What one drawn input is made from: the dim sizes, a value seed and a padding side."""

    @st.composite
    def draw(draw_fn: Any) -> tuple[dict[str, int], int, str]:
        sizes = {
            name: draw_fn(st.integers(lo, hi), label=name) for name, (lo, hi) in bounds.items()
        }
        seed = draw_fn(st.integers(0, 2**31 - 1), label="seed")
        padding = draw_fn(st.sampled_from(["none", "left", "right"]), label="padding")
        return sizes, seed, padding

    return draw()


def build_inputs(
    specs: Sequence[InputSpec], sizes: dict[str, int], seed: int, padding: str
) -> tuple[torch.Tensor, ...]:
    """The flat inputs one draw of :func:`input_parts` stands for (deterministic in the seed)."""
    generator = torch.Generator().manual_seed(seed)
    return tuple(_make(spec, sizes, padding, generator) for spec in specs)


def dim_bounds(
    gm: torch.fx.GraphModule, specs: Sequence[InputSpec], info: TraceInfo | None, max_size: int
) -> dict[str, tuple[int, int]]:
    """Range of each dynamic dim of ``specs``: proven range, ``max_size``, position limits."""
    limits = position_limits(gm)
    bounds: dict[str, tuple[int, int]] = {}
    for spec in specs:
        for dim in spec.shape:
            if isinstance(dim, str) and dim not in bounds:
                lo, hi = (1, None)
                if info is not None and dim in info.dim_ranges:
                    lo, hi = info.dim_ranges[dim]
                upper = max_size if hi is None else min(hi, max_size)
                if info is not None and info.max_positions and ("seq" in dim or "len" in dim):
                    upper = min(upper, info.max_positions)
                if dim in limits:
                    upper = min(upper, limits[dim])
                bounds[dim] = (max(lo, 1), max(upper, max(lo, 1)))
    return bounds


_INDEX_CARRIERS = {
    aten.unsqueeze.default,
    aten.expand.default,
    aten.view.default,
    aten.reshape.default,
    aten.slice.Tensor,
    aten.to.dtype,
    aten._to_copy.default,
    aten.clone.default,
}


def position_limits(gm: torch.fx.GraphModule) -> dict[str, int]:
    """Dims that index a position table (``embedding(table, arange(seq) + offset)``), bounded by
    the table's rows. Keys are dim labels as in :func:`input_specs`."""
    info = trace_info(gm)
    names = _dim_names(info, list(gm.graph.find_nodes(op="placeholder")))
    limits: dict[str, int] = {}
    for node in gm.graph.find_nodes(op="call_function", target=aten.embedding.default):
        table = node.args[0].meta.get("val") if isinstance(node.args[0], torch.fx.Node) else None
        index, offset = node.args[1], 0
        while isinstance(index, torch.fx.Node) and index.op == "call_function":
            if index.target in _INDEX_CARRIERS:
                index = index.args[0]
            elif index.target == aten.add.Tensor and isinstance(index.args[1], int):
                offset += index.args[1]
                index = index.args[0]
            else:
                break
        if (
            table is None
            or not isinstance(index, torch.fx.Node)
            or index.target != aten.arange.default
        ):
            continue
        end = index.args[0] if len(index.args) == 1 else None
        size = end.meta.get("val") if isinstance(end, torch.fx.Node) else None
        if isinstance(size, torch.SymInt):
            label = names.get(str(size.node.expr), str(size.node.expr))
            limit = int(table.shape[0]) - offset
            limits[label] = min(limit, limits.get(label, limit))
    return limits


def _make(
    spec: InputSpec, sizes: dict[str, int], padding: str, generator: torch.Generator
) -> torch.Tensor:
    shape = tuple(sizes[d] if isinstance(d, str) else d for d in spec.shape)
    if spec.kind == "float":
        return torch.randn(shape, generator=generator).to(spec.dtype)
    if spec.kind == "tokens" and spec.values is not None:
        picks = torch.randint(0, spec.values.numel(), shape, generator=generator)
        return spec.values[picks].to(spec.dtype)
    if spec.kind == "tokens":
        return torch.randint(0, spec.high, shape, generator=generator).to(spec.dtype)
    if spec.kind == "mask":
        mask = torch.ones(shape, dtype=torch.long)
        if padding != "none" and len(shape) == 2 and shape[1] > 1:
            for row in range(shape[0]):
                pad = int(torch.randint(0, shape[1], (1,), generator=generator))
                if padding == "left":
                    mask[row, :pad] = 0
                else:
                    mask[row, shape[1] - pad :] = 0
        return mask.to(spec.dtype)
    return torch.randint(0, spec.high, shape, generator=generator).to(spec.dtype)


class _HypothesisChoices(Choices):
    def __init__(self, draw_fn: Any) -> None:
        self.draw_fn = draw_fn

    def choice(self, options: list[Any]) -> Any:
        return self.draw_fn(st.sampled_from(options))

    def integer(self, low: int, high: int) -> int:
        return self.draw_fn(st.integers(low, high))

    def boolean(self) -> bool:
        return self.draw_fn(st.booleans())


# --- model config strategies ----------------------------------------------------------------------


def model_specs(
    family: str | Sequence[str] = FAMILIES,
    *,
    outliers: bool | None = None,
    max_layers: int = 3,
    dtype: torch.dtype = torch.float32,
    **fixed: Any,
) -> st.SearchStrategy[ModelSpec]:
    """Random small model configs of one or more families.

    Draws layers (1..``max_layers``), heads, head size, vocabulary, tied or untied head, biases
    or not, and family switches (GPT-NeoX parallel residual, OPT's projected embeddings, Llama's
    grouped-query attention). ``outliers=None`` draws it too. ``fixed`` pins any field.
    """
    families = [family] if isinstance(family, str) else list(family)
    for f in families:
        if f not in FAMILIES:
            raise ValueError(f"unknown family '{f}' (known: {', '.join(FAMILIES)})")

    @st.composite
    def draw(draw_fn: Any) -> ModelSpec:
        chosen = draw_fn(st.sampled_from(families))
        spec = ModelSpec.draw(
            _HypothesisChoices(draw_fn), chosen, outliers=outliers, max_layers=max_layers
        )
        options = dict(spec.options) | dict(fixed.get("options", ()))
        values = {k: v for k, v in fixed.items() if k != "options"}
        return dataclasses.replace(spec, dtype=dtype, **values).with_options(**options)

    return draw()
