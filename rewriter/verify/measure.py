"""Measuring a candidate against a reference: the tolerance rule and ``compare``.

:func:`tolerance` is the one rule for "exact": max abs error ``<= 1e-5 * max|ref| + 1e-6`` in
float32 and ``<= 1e-10 * max|ref|`` in float64 (bfloat16 / float16 get ``1e-2 * max|ref| +
1e-3``, the precision of those types). :func:`compare` runs a reference and a candidate on the
same inputs (their own ids each, when the candidate's vocabulary was trimmed) and returns an
:class:`ErrorReport`; approximate passes report it. :func:`compare_outputs` applies the rule to
flat outputs, which is what every backend's ``check`` does.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx
from torch.utils import _pytree as pytree

from rewriter.analysis import vocab
from rewriter.ir.trace import TraceInfo, eval_mode, trace_info

__all__ = [
    "ErrorReport",
    "compare",
    "compare_outputs",
    "graph_reference",
    "outputs",
    "run",
    "tolerance",
]

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
    info = info_of(reference, candidate)
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


def info_of(*models: torch.nn.Module) -> TraceInfo | None:
    """The trace info of the first traced graph among ``models`` (None if none is one)."""
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
