"""``crmsnorm``: Pre-LN -> Pre-CRMSNorm, a residual stream one coordinate narrower, exactly
(Jiang et al. 2023, "Pre-RMSNorm and Pre-CRMSNorm Transformers").

Math. Once every writer is centered (as in ``prernorm``) the stream ``x`` is zero-mean, so its
last coordinate is implied by the others, ``x_d = -sum_{i<d} x_i``, and the stream can be stored
as ``x' = x[:d-1]``:

* writers drop their last output coordinate: ``W' = (C W)[:d-1]``, ``b' = (C b)[:d-1]``,
  embeddings ``(E - mean)[:, :d-1]`` (an explicitly centered writer is sliced);
* every norm becomes ``rewriter::crms_norm(x', eps)``: the first ``d-1`` coordinates of
  ``RMSNorm(x)``, ``x' / sqrt((sum x'^2 + (sum x')^2) / d + eps)``, with no affine;
* every reader absorbs gamma, beta and the dropped coordinate. With ``y`` the normalized full
  vector (zero-mean, so ``y_d = -sum_{i<d} y_i``):
  ``W (gamma * y + beta) + b = sum_{i<d} (W[:, i] gamma_i - W[:, d] gamma_d) y_i + (b + W beta)``,
  so ``W'[:, i] = W[:, i] gamma_i - W[:, d] gamma_d`` and ``b' = b + W beta``.

So every norm must be read only by linear maps (the check and the folding are shared with
``fold-ln``); a tied LM head is untied first. Views along the stream that spell the width ``d``
are rewritten to ``d - 1``. The preconditions of ``prernorm`` apply (Pre-LN only; refusals name
the node and change nothing). Run it on the Pre-LN graph, not after ``prernorm``: without
LayerNorms left, nothing says the stream is zero-mean.

The attention width (``heads * head_dim``) keeps its size; only the residual width shrinks.
``d - 1`` breaks the multiple-of-8 alignment GEMM kernels like; ``bench_norm.py`` measures the
cost.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
import torch.fx

from rewriter.analysis.centering import center_writers, check_writers, layer_to_rms
from rewriter.analysis.folding import (
    NormUnit,
    bias_fold_edit,
    ensure_bias,
    linear_readers,
    norm_units,
    untie_for,
)
from rewriter.analysis.residual import Writer, find_stream
from rewriter.context import PassContext
from rewriter.errors import PreconditionError, describe_node
from rewriter.ir.graph import (
    LinearMap,
    as_linear,
    is_transparent,
    prune_dead_get_attrs,
    refresh_meta,
)
from rewriter.ir.store import Edit
from rewriter.pipeline import Pass, PassResult, option
from rewriter.rewrite.driver import Rewriter

__all__ = ["PreCRMSNormPass"]

aten = torch.ops.aten
_VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)


@dataclasses.dataclass(frozen=True)
class PreCRMSNormPass(Pass):
    """Pre-LN -> Pre-CRMSNorm: a zero-mean residual stream stored in d - 1 coordinates."""

    name: ClassVar[str] = "crmsnorm"

    center_unknown_writers: bool = option(
        False,
        "Center writers of unknown kind with an explicit mean subtraction instead of refusing.",
    )

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        stream = find_stream(gm, anchors=(aten.layer_norm.default,))
        if stream is None:
            return PassResult(
                gm,
                changed=False,
                notes=["no LayerNorm: nothing to do (run crmsnorm on the Pre-LN graph)"],
            )
        check_writers(stream, allow_unknown=self.center_unknown_writers)
        # A norm whose output writes the stream (BLOOM's embedding LayerNorm) reads a region of its
        # own: that region keeps width d (centered, the norm becomes an RMSNorm); the norm's output
        # is centered and sliced into the compressed stream.
        full = stream.writer_norms()
        compressed = [n for n in stream.norms if n not in full]
        plans = _reader_plans(gm, compressed)
        shrink = {w for n in compressed for w in stream.regions[n][1]}
        narrow = {v for n in compressed for v in stream.regions[n][0]}
        prune_dead_get_attrs(gm)
        rw = Rewriter(
            gm, pass_name=self.name, propagate_meta=False
        )  # shapes change: refresh at end
        explicit = center_writers(rw, stream)
        width = stream.width
        for writer in stream.writers:
            if writer.node in shrink:
                _drop_last_output(rw, writer, explicit.get(writer.node), width)
        for node in narrow:
            _narrow_view(rw, node, width)
        for unit, readers in plans:
            for reader in readers:
                _absorb(rw, unit, reader, width)
            _to_crms(rw, unit)
        for norm in full:
            layer_to_rms(rw, norm)
        refresh_meta(gm)
        rw.finish()
        notes = [stream.describe(), f"residual width {width} -> {width - 1}"]
        return PassResult(gm, changed=True, stats=dict(rw.counters), notes=notes)


def _reader_plans(
    gm: torch.fx.GraphModule, norms: list[torch.fx.Node]
) -> list[tuple[NormUnit, list[LinearMap]]]:
    units = {u.norm: u for u in norm_units(gm, frozen=False)}
    plans = []
    for norm in norms:
        unit = units[norm]
        readers, blocker = linear_readers(unit)
        if blocker is not None or not readers:
            raise PreconditionError(
                "crmsnorm needs every norm to be read only by linear maps, but "
                f"{describe_node(norm)} is read by "
                f"{describe_node(blocker) if blocker else 'nothing'}",
                blocker or norm,
            )
        plans.append((unit, readers))
    return plans


# --- writers: drop the last output coordinate ----------------------------------------------------


def _drop_last_output(
    rw: Rewriter, writer: Writer, explicit: torch.fx.Node | None, width: int
) -> None:
    if writer.kind == "linear":
        lin = as_linear(writer.linear.node)  # centering may have untied it
        assert lin is not None
        weight = lin.weight_name
        if lin.layout == "out_in":
            shape = (width - 1, lin.in_features)
            rw.apply(
                Edit(
                    weight,
                    (weight,),
                    lambda b: b.rows(weight),
                    shape=shape,
                    note="drop last output row",
                )
            )
        else:
            shape = (lin.in_features, width - 1)
            rw.apply(
                Edit(
                    weight,
                    (weight,),
                    lambda b: b.rows(weight)[:, : width - 1],
                    shape=shape,
                    note="drop last output column",
                )
            )
        if lin.bias is not None:
            bias = lin.bias_name
            rw.apply(
                Edit(
                    bias,
                    (bias,),
                    lambda b: b.whole(bias)[: width - 1],
                    shape=(width - 1,),
                    note="drop last output",
                )
            )
    elif writer.kind in ("embedding", "tensor"):
        node = writer.node.args[0] if writer.kind == "embedding" else writer.node
        name = str(node.target)
        shape = (*rw.store.shape(name)[:-1], width - 1)
        rw.apply(
            Edit(
                name,
                (name,),
                lambda b: b.rows(name)[..., : width - 1],
                shape=shape,
                note="drop last coordinate",
            )
        )
    else:
        assert explicit is not None
        users = list(explicit.users)
        sliced = rw.call(
            aten.slice.Tensor,
            (explicit, -1, 0, width - 1),
            before=explicit.next,
            rule="drop-last-coordinate",
            meta_from=explicit,
        )
        for user in users:
            user.replace_input_with(explicit, sliced)
    rw.counters["drop-last-coordinate"] += 1


def _narrow_view(rw: Rewriter, node: torch.fx.Node, width: int) -> None:
    """A view along the stream whose target shape spells the width ``d`` now needs ``d - 1``."""
    if node.target not in _VIEWS:
        return
    shape = list(node.args[1])
    if shape and shape[-1] == width:
        shape[-1] = width - 1
        rw.set_args(node, (node.args[0], shape, *node.args[2:]), rule="narrow-view")


# --- readers: absorb gamma, beta and the dropped coordinate --------------------------------------


def _absorb(rw: Rewriter, unit: NormUnit, reader: LinearMap, width: int) -> None:
    weight_node = untie_for(rw, reader.weight, [reader.node])
    lin = as_linear(reader.node)
    assert lin is not None and lin.weight is weight_node
    weight = lin.weight_name
    gamma = str(unit.gamma.target) if unit.gamma is not None else None
    beta = str(unit.beta.target) if unit.beta is not None else None
    if beta is not None:
        lin = ensure_bias(rw, lin)
        rw.apply(bias_fold_edit(lin, beta))
    reads = (weight,) if gamma is None else (weight, gamma)
    last = width - 1
    if lin.layout == "out_in":

        def columns(b: object) -> torch.Tensor:
            rows = b.rows(weight)  # (block of outputs, d)
            scaled = rows * b.whole(gamma)[None, :] if gamma is not None else rows
            return scaled[:, :last] - scaled[:, last:]

        shape = (lin.out_features, last)
        rw.apply(
            Edit(weight, reads, columns, shape=shape, note="absorb gamma and the dropped column")
        )
    else:

        def rows_(b: object) -> torch.Tensor:
            rows = b.rows(weight)  # inputs start..stop of (d, out); stop <= d - 1
            final = b.rows(weight, last, width)  # the dropped input
            if gamma is not None:
                g = b.whole(gamma)
                rows = rows * g[b.start : b.stop, None]
                final = final * g[last]
            return rows - final

        shape = (last, lin.out_features)
        rw.apply(Edit(weight, reads, rows_, shape=shape, note="absorb gamma and the dropped row"))
    _narrow_reader_input(rw, lin, unit, width)
    rw.counters["absorb-into-reader"] += 1


def _narrow_reader_input(rw: Rewriter, lin: LinearMap, unit: NormUnit, width: int) -> None:
    node = lin.input
    while isinstance(node, torch.fx.Node) and node is not unit.output and is_transparent(node):
        _narrow_view(rw, node, width)
        node = node.args[0]


def _to_crms(rw: Rewriter, unit: NormUnit) -> None:
    x = unit.norm.args[0]
    crms = rw.call(
        torch.ops.rewriter.crms_norm.default,
        (x, float(unit.eps)),
        before=unit.norm,
        rule="layer-to-crms",
        meta_from=unit.norm,
    )
    rw.replace(unit.output if unit.beta_add is not None else unit.norm, crms, rule="layer-to-crms")
