"""Property-based verification: is a rewritten graph equivalent to the model it came from?

Public API, used by the test suite and by users who write their own passes:

* :func:`tolerance` is the one rule for "exact": max abs error ``<= 1e-5 * max|ref| + 1e-6`` in
  float32 and ``<= 1e-10 * max|ref|`` in float64 (bfloat16 / float16 get ``1e-2 * max|ref| +
  1e-3``, the precision of those types).
* :func:`inputs` is a hypothesis strategy of valid inputs for a traced graph: token ids in the
  embedding's range, 0/1 attention masks with padding, float tensors, dynamic dims within their
  proven ranges (and the model's position limit).
* :func:`compare` runs a reference and a candidate on the same inputs and returns an
  :class:`ErrorReport`; approximate passes report it.
* :func:`assert_equivalent` checks the example inputs, then hypothesis-drawn ones, and fails with
  the shrunk counterexample and its error statistics.
* :func:`model_specs` draws random model configs per family (``outliers=True`` injects outlier
  channels and large activations); see :mod:`rewriter.families`.

Writing your own property test::

    from hypothesis import given
    import rewriter
    from rewriter import verify

    @given(spec=verify.model_specs("gpt2", outliers=True))
    def test_my_pass(spec):
        model = spec.build()
        gm = rewriter.trace(model, spec.example_inputs(), dynamic_shapes="auto")
        out = rewriter.Pipeline.parse("canonicalize,my-pass").run(gm).graph_module
        verify.assert_equivalent(model, out, max_examples=5)
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx
from hypothesis import HealthCheck, currently_in_test_context, given, settings
from hypothesis import strategies as st
from hypothesis.control import current_build_context
from torch.utils import _pytree as pytree

from rewriter.analysis import vocab
from rewriter.ir.graph import look_back
from rewriter.ir.trace import TraceInfo, eval_mode, trace_info
from rewriter.verify.families import FAMILIES, Choices, ModelSpec

__all__ = [
    "ErrorReport",
    "InputSpec",
    "assert_equivalent",
    "compare",
    "compare_outputs",
    "input_specs",
    "inputs",
    "model_specs",
    "outputs",
    "run",
    "tolerance",
]

aten = torch.ops.aten


# --- the tolerance rule ------------------------------------------------------------------------


def tolerance(
    reference: torch.Tensor, *, rtol: float | None = None, atol: float | None = None
) -> float:
    """Largest allowed max-abs error against ``reference`` (the project's one rule); integer
    and bool references allow none (ids, masks and counts are equal or wrong)."""
    values = reference.detach()
    if not values.is_floating_point() and not values.is_complex():
        return 0.0
    finite = values[torch.isfinite(values)]
    scale = float(finite.abs().max()) if finite.numel() else 0.0
    return _limit(scale, reference.dtype, rtol, atol)


def _limit(scale: float, dtype: torch.dtype, rtol: float | None, atol: float | None) -> float:
    default_rtol, default_atol = _DEFAULTS.get(dtype, (1e-5, 1e-6))
    rtol = default_rtol if rtol is None else rtol
    atol = default_atol if atol is None else atol
    return rtol * scale + atol


_DEFAULTS = {
    torch.float64: (1e-10, 0.0),
    torch.float32: (1e-5, 1e-6),
    torch.bfloat16: (1e-2, 1e-3),
    torch.float16: (1e-2, 1e-3),
}


@dataclasses.dataclass
class ErrorReport:
    """Error of a candidate against a reference, over every floating output."""

    max_abs: float
    max_rel: float
    mean_abs: float
    ref_max: float
    allowed: float
    """The tolerance the max abs error is held to (the tightest over outputs)."""
    worst_output: int
    outputs: int
    exact_outputs: int = 0
    """Integer / bool outputs, compared for equality."""
    mismatched_exact: int = 0
    within: bool = True
    """Every floating output is within its own tolerance."""

    @property
    def ok(self) -> bool:
        return self.within and self.mismatched_exact == 0 and not math.isnan(self.max_abs)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"ok": self.ok}

    def __str__(self) -> str:
        verdict = "within" if self.ok else "EXCEEDS"
        text = (
            f"max abs {self.max_abs:.3g} ({verdict} tolerance; worst output allows "
            f"{self.allowed:.3g}), max rel {self.max_rel:.3g}, "
            f"mean abs {self.mean_abs:.3g}, max |ref| {self.ref_max:.3g}, worst output "
            f"#{self.worst_output} of {self.outputs}"
        )
        if self.mismatched_exact:
            text += f", {self.mismatched_exact} integer outputs differ"
        return text


# --- running references and candidates ---------------------------------------------------------


def outputs(value: Any) -> list[torch.Tensor]:
    """The tensors in a (possibly nested) model output, in pytree order."""
    return [leaf for leaf in pytree.tree_leaves(value) if isinstance(leaf, torch.Tensor)]


def run(model: torch.nn.Module, inputs: Sequence[torch.Tensor], info: TraceInfo | None) -> Any:
    """Call ``model`` on flat ``inputs`` the way it was traced (eval mode, names, bound kwargs)."""
    own_info = trace_info(model) if isinstance(model, torch.fx.GraphModule) else None
    info = own_info or info
    # A model is compared as it was traced: in eval mode (its own flags are restored after).
    with torch.no_grad(), eval_mode(model):
        if info is None:
            return model(*inputs)
        args, kwargs = info.call_inputs(inputs)
        if own_info is None:
            kwargs = {**kwargs, **info.bound_kwargs}
        return model(*args, **kwargs)


def graph_reference(
    gm: torch.fx.GraphModule, inputs: Sequence[torch.Tensor] | None = None
) -> tuple[tuple[torch.Tensor, ...], list[torch.Tensor]]:
    """The inputs a backend check runs on (the trace's examples by default) and ``gm``'s
    outputs on them: what every backend's ``check`` compares its runtime against."""
    if inputs is None:
        info = trace_info(gm)
        if info is None:
            raise ValueError("check() needs inputs for a graph not made by rewriter.trace")
        inputs = info.example_inputs
    inputs = tuple(inputs)
    return inputs, outputs(run(gm, inputs, None))


def compare(
    reference: torch.nn.Module,
    candidate: torch.nn.Module,
    inputs: Sequence[torch.Tensor] | None = None,
    *,
    rtol: float | None = None,
    atol: float | None = None,
    inputs_of: str = "reference",
) -> ErrorReport:
    """Run both on ``inputs`` (default: the trace's example inputs) and measure the error.

    When the candidate's vocabulary was trimmed (:mod:`rewriter.vocab`), ``inputs`` are in the
    ``inputs_of`` side's ids; the other side gets the same text in its own ids, and the
    reference's logits are taken at the candidate's kept ids.
    """
    info = _info_of(reference, candidate)
    if inputs is None:
        if info is None:
            raise ValueError("compare() needs inputs when neither model is a traced graph")
        inputs = info.example_inputs
    ref_inputs, cand_inputs = _vocab_inputs(reference, candidate, inputs, info, inputs_of)
    ref = outputs(run(reference, ref_inputs, info))
    out = outputs(run(candidate, cand_inputs, info))
    ref = vocab.gather_outputs(ref, vocab.vocab_map(reference), vocab.vocab_map(candidate))
    return compare_outputs(ref, out, rtol, atol)


def _vocab_inputs(
    reference: torch.nn.Module,
    candidate: torch.nn.Module,
    inputs: Sequence[torch.Tensor],
    info: TraceInfo | None,
    inputs_of: str,
) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """The inputs each side takes when their vocabularies differ (a trimmed candidate).

    Inputs given for the reference have ids the candidate removed replaced by its filler token
    (both sides then see the same text); inputs given for the candidate (hypothesis draws) use
    only kept ids and are renumbered for the reference.
    """
    ref_map, cand_map = vocab.vocab_map(reference), vocab.vocab_map(candidate)
    inputs = tuple(inputs)
    if vocab.same_vocab(ref_map, cand_map):
        return inputs, inputs
    names = info.input_names if info is not None else None
    tokens = vocab.token_positions(names, ref_map, cand_map)
    given = cand_map if inputs_of == "candidate" else ref_map
    original = vocab.to_original(inputs, tokens, given)
    if inputs_of != "candidate" and cand_map is not None:
        original = vocab.project(original, tokens, cand_map)
    return (
        vocab.from_original(original, tokens, ref_map),
        vocab.from_original(original, tokens, cand_map),
    )


def _info_of(*models: torch.nn.Module) -> TraceInfo | None:
    for model in models:
        if isinstance(model, torch.fx.GraphModule) and (info := trace_info(model)) is not None:
            return info
    return None


def compare_outputs(
    ref: list[torch.Tensor], out: list[torch.Tensor], rtol: float | None, atol: float | None
) -> ErrorReport:
    """Error of flat candidate outputs against reference outputs (the tolerance rule).

    Each floating output is held to its own tolerance; integer outputs must be equal.
    """
    if len(ref) != len(out):
        raise AssertionError(f"reference has {len(ref)} outputs, candidate {len(out)}")
    max_abs = max_rel = ref_max = total_abs = 0.0
    count = exact = mismatched = worst = 0
    worst_ratio, allowed, violated = -1.0, 0.0, False
    for i, (r, c) in enumerate(zip(ref, out)):
        if r.shape != c.shape:
            raise AssertionError(
                f"output #{i}: shape {tuple(c.shape)} != reference {tuple(r.shape)}"
            )
        if not r.is_floating_point():
            exact += 1
            mismatched += int(not torch.equal(r, c))
            continue
        r64, c64 = r.to(torch.float64), c.to(torch.float64)
        # Equal values (infinities included) and NaN in both at the same place agree.
        agree = (r64 == c64) | (torch.isnan(r64) & torch.isnan(c64))
        diff = torch.where(agree, torch.zeros_like(r64), (c64 - r64).abs())
        finite = r64[torch.isfinite(r64)]
        scale = float(finite.abs().max()) if finite.numel() else 0.0
        error = float(diff.max()) if diff.numel() else 0.0
        if diff.numel() and bool(torch.isnan(diff).any()):
            error = math.nan
        limit = _limit(scale, r.dtype, rtol, atol)
        ratio = (
            math.inf
            if math.isnan(error)
            else (error / limit if limit > 0 else (math.inf if error > 0 else 0.0))
        )
        violated |= math.isnan(error) or error > limit
        if ratio > worst_ratio:
            worst_ratio, worst, allowed = ratio, i, limit
        max_abs = math.nan if math.isnan(error) or math.isnan(max_abs) else max(max_abs, error)
        max_rel = max(max_rel, error / scale if scale > 0 else (0.0 if error == 0 else math.inf))
        ref_max = max(ref_max, scale)
        total_abs += float(diff.nan_to_num(0.0).sum())
        count += diff.numel()
    return ErrorReport(
        max_abs=max_abs,
        max_rel=max_rel,
        mean_abs=total_abs / count if count else 0.0,
        ref_max=ref_max,
        allowed=allowed,
        worst_output=worst,
        outputs=len(ref),
        exact_outputs=exact,
        mismatched_exact=mismatched,
        within=not violated,
    )


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
    parts = _input_parts(_dim_bounds(gm, specs, trace_info(gm), max_size))
    return parts.map(lambda drawn: _build(specs, *drawn))


def _input_parts(
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


def _build(
    specs: Sequence[InputSpec], sizes: dict[str, int], seed: int, padding: str
) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    return tuple(_make(spec, sizes, padding, generator) for spec in specs)


def _dim_bounds(
    gm: torch.fx.GraphModule, specs: Sequence[InputSpec], info: TraceInfo | None, max_size: int
) -> dict[str, tuple[int, int]]:
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


# --- the property check ---------------------------------------------------------------------------


def assert_equivalent(
    reference: torch.nn.Module,
    candidate: torch.nn.Module,
    example_inputs: Sequence[torch.Tensor] | None = None,
    *,
    rtol: float | None = None,
    atol: float | None = None,
    max_examples: int | None = None,
    max_size: int = 16,
) -> ErrorReport:
    """Fail unless ``candidate`` equals ``reference`` within the tolerance rule on every input.

    Checks ``example_inputs`` (default: the trace's), then ``max_examples`` hypothesis-drawn
    inputs (default: the active hypothesis profile's count). A failure names the shrunk input
    (sizes, seed, padding) and the error statistics. Returns the report of the example inputs.
    """
    graph = candidate if isinstance(candidate, torch.fx.GraphModule) else reference
    if not isinstance(graph, torch.fx.GraphModule):
        raise TypeError("assert_equivalent needs at least one traced GraphModule")
    info = _info_of(candidate, reference)
    examples = (
        tuple(example_inputs)
        if example_inputs is not None
        else (info.example_inputs if info is not None else None)
    )
    first = None
    if examples is not None:
        first = compare(reference, candidate, examples, rtol=rtol, atol=atol)
        if not first.ok:
            raise AssertionError(f"not equivalent on the example inputs: {first}")

    strategy = inputs(graph, max_size=max_size)
    side = "candidate" if graph is candidate else "reference"
    count = max_examples if max_examples is not None else settings().max_examples
    if currently_in_test_context():
        # Inside a user's own @given test (over model configs, say): draw from that test's data.
        _check_nested(reference, candidate, graph, count, max_size, rtol, atol, side)
        return first if first is not None else _EMPTY

    @settings(
        max_examples=count,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        database=None,
    )
    @given(drawn=strategy)
    def check(drawn: tuple[torch.Tensor, ...]) -> None:
        report = compare(reference, candidate, drawn, rtol=rtol, atol=atol, inputs_of=side)
        if not report.ok:
            raise AssertionError(f"not equivalent on inputs of shapes {_shapes(drawn)}: {report}")

    check()
    return first if first is not None else _EMPTY


_EMPTY = ErrorReport(0.0, 0.0, 0.0, 0.0, 0.0, 0, 0)


def _shapes(tensors: Sequence[torch.Tensor]) -> str:
    return ", ".join(f"{tuple(t.shape)}" for t in tensors)


def _check_nested(
    reference: torch.nn.Module,
    candidate: torch.nn.Module,
    graph: torch.fx.GraphModule,
    count: int,
    max_size: int,
    rtol: float | None,
    atol: float | None,
    side: str = "candidate",
) -> None:
    """The input draws of a check made inside a running ``@given`` test.

    A nested ``@given`` is refused by hypothesis, so the inputs are drawn from the running test's
    own data: they are part of its example, follow its seed, and shrink with it.
    """
    specs = input_specs(graph)
    bounds = _dim_bounds(graph, specs, trace_info(graph), max_size)
    parts = _input_parts(bounds)
    data = current_build_context().data
    # An explicit @example runs on data with no choices to draw: a fixed generator stands in.
    fixed = random.Random(0) if getattr(data, "max_choices", None) == 0 else None
    for _ in range(count):
        if fixed is None:
            sizes, seed, padding = data.draw(parts)
        else:
            sizes = {name: fixed.randint(lo, hi) for name, (lo, hi) in bounds.items()}
            seed, padding = fixed.randrange(2**31), fixed.choice(["none", "left", "right"])
        drawn = _build(specs, sizes, seed, padding)
        report = compare(reference, candidate, drawn, rtol=rtol, atol=atol, inputs_of=side)
        if not report.ok:
            raise AssertionError(
                f"not equivalent on inputs of shapes {_shapes(drawn)} (sizes {sizes}, seed {seed}, "
                f"padding {padding}): {report}"
            )


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
