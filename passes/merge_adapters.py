"""``merge-adapters``: fold every adapter into its base weight and remove the adapter branch.

For each adapter (``rewriter.adapters.records``) the base weight becomes ``W + s B R A``, computed
in float64 row blocks through the weight store in the weight's own layout and cast once, and the
branch ``y + s B R A x`` is replaced by the base output; the factors leave the graph. Exact in the
tolerance rule (the only rounding is the final cast). An adapter on a weight that other readers
share (a tied LM head and its embedding) unties it first, so the embedding keeps the original.

``keep_base=true`` keeps each original weight and the adapter's factors (in the graph's
metadata, for this session: they are not written by ``rewriter.save``) so that
``unmerge-adapters`` restores both bit for bit; without it unmerging is refused with the reason:
subtracting ``s B R A`` again would not give back the original bits in float32 or lower.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
import torch.fx

from rewriter.analysis.adapters import (
    ADAPTERS_KEY,
    TRAIN_DROPOUT_KEY,
    AdapterRecord,
    inject,
    merge_edit,
    own_weight,
    records,
)
from rewriter.context import PassContext
from rewriter.errors import PreconditionError, RewriterError
from rewriter.ir.graph import as_linear, linear_maps
from rewriter.pipeline import Pass, PassResult, option
from rewriter.rewrite.driver import Rewriter

__all__ = ["MergeAdaptersPass", "MergedAdapter", "UnmergeAdaptersPass"]


@dataclasses.dataclass(frozen=True)
class MergeAdaptersPass(Pass):
    """Fold every adapter into its base weight (W + s B R A in float64) and drop the branches."""

    name: ClassVar[str] = "merge-adapters"

    keep_base: bool = option(False, "Keep the original weights so unmerging is exact.")

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        found = records(gm)
        if not found:
            return PassResult(gm, changed=False, notes=["no adapters to merge"])
        rw = Rewriter(gm, pass_name=self.name)
        by_name = {n.name: n for n in gm.graph.nodes}
        kept = []
        for record in found:
            totals = [by_name[name] for name in record.outputs]  # one per application
            lin = _linear_of(totals[0].args[0])
            weight = record.weight
            if lin is not None and lin.weight_name == weight:
                weight = own_weight(rw, lin).weight_name  # a tied weight is untied first
            if self.keep_base:
                factors = {
                    role: rw.store.read(name).detach().clone()
                    for role, name in record.tensors.items()
                }
                original = rw.store.read(weight).detach().clone()
                kept.append(MergedAdapter(record, weight, original, factors))
            rw.apply(merge_edit(gm, record, weight))
            for total in totals:
                rw.replace(total, total.args[0], rule="merge-adapter")
        for node in list(gm.graph.nodes):  # adapter dropouts count as impure: erase them by hand
            if node.meta.get(TRAIN_DROPOUT_KEY) and not node.users and rw.is_alive(node):
                rw.erase(node)
        rw.finish(prune_weights=True)
        gm.meta[ADAPTERS_KEY] = []
        gm.meta[MERGED_KEY] = [*gm.meta.get(MERGED_KEY, []), *kept]
        if not self.keep_base:
            gm.meta[MERGED_WITHOUT_BASE_KEY] = gm.meta.get(MERGED_WITHOUT_BASE_KEY, 0) + len(found)
        stats = {"merge-adapter": len(found)}
        return PassResult(gm, changed=True, stats=stats, notes=[f"{len(found)} adapters merged"])


MERGED_KEY = "rewriter.merged_adapters"
MERGED_WITHOUT_BASE_KEY = "rewriter.merged_without_base"


@dataclasses.dataclass
class MergedAdapter:
    """What ``keep_base`` keeps of a merged adapter: its record, the weight it went into, that
    weight's original values and the factors, so unmerging restores both bit for bit."""

    record: AdapterRecord
    weight: str
    original: torch.Tensor
    factors: dict[str, torch.Tensor]


@dataclasses.dataclass(frozen=True)
class UnmergeAdaptersPass(Pass):
    """Undo merge-adapters(keep_base=true) exactly: original weights back, adapter branches back."""

    name: ClassVar[str] = "unmerge-adapters"

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        meta = getattr(gm, "meta", {})
        merged: list[MergedAdapter] = list(meta.get(MERGED_KEY, []))
        if not merged and meta.get(MERGED_WITHOUT_BASE_KEY):
            raise PreconditionError(
                f"pass '{self.name}': {meta[MERGED_WITHOUT_BASE_KEY]} adapters were merged "
                "without keep_base=true: subtracting s B A again would not restore the original "
                "bits in float32 or lower, so they cannot be unmerged exactly"
            )
        if not merged:
            return PassResult(gm, changed=False, notes=["no merged adapters to unmerge"])
        rw = Rewriter(gm, pass_name=self.name)
        for item in reversed(merged):
            rw.store.write(item.weight, item.original.clone(), note="unmerge: original weight")
        maps = {lin.weight_name: lin for lin in linear_maps(gm)}
        restored = []
        for item in merged:
            lin = maps.get(item.weight)
            if lin is None:
                raise RewriterError(
                    f"pass '{self.name}': the weight '{item.weight}' of the {item.record.method} "
                    f"adapter on '{item.record.module}' is no longer read by a linear map"
                )
            record = item.record
            roles = {r for r, n in record.tensors.items() if n in set(record.trainable)}
            restored.append(
                inject(
                    rw,
                    lin,
                    method=record.method,
                    factors=item.factors,
                    trainable=roles,
                    scale=record.scale,
                    extra=record.extra,
                )
            )
            maps = {m.weight_name: m for m in linear_maps(gm)}
        rw.finish(prune_weights=False)
        gm.meta[MERGED_KEY] = []
        return PassResult(
            gm,
            changed=True,
            stats={"unmerge-adapter": len(merged)},
            notes=[f"{len(merged)} adapters unmerged"],
        )


def _linear_of(node: torch.fx.Node) -> object:
    """The linear map whose output ``node`` is (the matmul, or its bias add)."""
    direct = as_linear(node)
    if direct is not None:
        return direct
    for source in node.all_input_nodes:
        lin = as_linear(source)
        if lin is not None and lin.output is node:
            return lin
    return None
