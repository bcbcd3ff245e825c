"""``fold-ln``: fold every normalization's gamma and beta into the linear maps that read it.

Math (TransformerLens ``fold_ln``; SliceGPT layernorm fusion). A reader of a norm computes
``W (N(x) * gamma + beta) + b = (W diag(gamma)) N(x) + (b + W beta)``, so

    W' = W diag(gamma)        b' = b + W beta

and the norm keeps only its normalizer ``N``. Works for LayerNorm and RMSNorm, original or
produced by ``prernorm`` (``rms_norm(x, gamma) + beta`` is one unit), for every form of linear
reader (``aten.linear``, GPT-2 ``Conv1D`` / ``addmm`` with its ``(in, out)`` weight, ``matmul`` +
bias), for several readers of one norm (separate q/k/v projections, GPT-NeoX's parallel attention
and MLP), for readers without a bias (one is created), and for the final norm feeding a tied LM
head (the head is untied first; the embedding keeps the original tensor).

Frozen norms (what ``ln-freeze`` leaves: ``(x - mean(x)) * g + beta``, or ``x * g + beta`` for an
RMSNorm, with stored vectors ``g`` and ``beta``) fold the same way, their centering included
(``W C``: each reader row loses its mean over the inputs), and then disappear: the graph is
LN-free. The same covers any stored per-channel scale read only by linear maps (a half-precision
Llama RMSNorm's weight, which ``canonicalize`` keeps separate).

Precondition, per norm: every reader of its output (through views and other value-preserving ops)
is a linear map. A norm read by anything else is left as it is, and the report says which reader
kept it. Exact in the tolerance rule: in float64 the folded weights reproduce the original to
rounding.

Invariant established: no folded norm has an affine; outputs unchanged.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
import torch.fx

from rewriter.analysis.folding import (
    NormUnit,
    fold_affine,
    linear_readers,
    norm_module_key,
    norm_units,
)
from rewriter.context import PassContext
from rewriter.errors import describe_node
from rewriter.ir.graph import LinearMap, prune_dead_get_attrs
from rewriter.pipeline import Pass, PassResult
from rewriter.rewrite.driver import Rewriter

__all__ = ["FoldNormPass"]


@dataclasses.dataclass(frozen=True)
class FoldNormPass(Pass):
    """Fold LayerNorm / RMSNorm gamma and beta into the linear maps that read each norm."""

    name: ClassVar[str] = "fold-ln"

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        units = [u for u in norm_units(gm) if u.has_affine and _foldable_affine(u)]
        plans, notes = [], []
        for unit in units:
            readers, blocker = linear_readers(unit)
            if blocker is not None:
                if not unit.frozen or unit.centers:  # a stray channel scale needs no note
                    reason = f"read by {describe_node(blocker)}, not a linear map"
                    notes.append(f"kept {describe_node(unit.norm)}: {reason}")
            elif readers:
                plans.append((unit, readers))
        if not plans:
            note = "no norm with an affine read only by linear maps: nothing to do"
            if not units and _written_out_norms(gm):
                note += (
                    " (the graph has written-out normalizations, pow/mean/rsqrt as Llama's "
                    "RMSNorm traces: run canonicalize first, e.g. canonicalize,fold-ln)"
                )
            notes.append(note)
            return PassResult(gm, changed=False, notes=notes)
        prune_dead_get_attrs(gm)
        rw = Rewriter(gm, pass_name=self.name)
        # One norm module applied more than once (a shared layer; the prefix and last-token
        # halves of a step graph) folds once into the weights its applications share.
        groups: dict[tuple[object, ...], list[tuple[NormUnit, list[LinearMap]]]] = {}
        for unit, readers in plans:
            groups.setdefault(norm_module_key(unit, readers), []).append((unit, readers))
        for (unit, readers), *also in groups.values():
            fold_affine(rw, unit, readers, rule="fold-into-reader", also=also)
        rw.finish()
        stats = dict(rw.counters)
        stats["norms-folded"] = sum(not unit.frozen for unit, _ in plans)
        frozen = sum(unit.frozen for unit, _ in plans)
        if frozen:
            stats["frozen-norms-folded"] = frozen
        return PassResult(gm, changed=True, stats=stats, notes=notes)


def _foldable_affine(unit: object) -> bool:
    """Gamma and beta are stored tensors (a computed gain, such as Gemma's 1 + w, is kept)."""
    gamma, beta = unit.gamma, unit.beta  # type: ignore[attr-defined]
    return all(
        v is None or (isinstance(v, torch.fx.Node) and v.op == "get_attr") for v in (gamma, beta)
    )


def _written_out_norms(gm: torch.fx.GraphModule) -> bool:
    """Whether the graph divides by a root it computes (``rsqrt``): a norm canonicalize would
    recognise and fold-ln could then fold."""
    return any(
        node.op == "call_function" and node.target == torch.ops.aten.rsqrt.default
        for node in gm.graph.nodes
    )
