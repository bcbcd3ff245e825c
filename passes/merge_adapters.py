"""``merge-adapters``: fold every adapter into its base weight and remove the adapter branch.

For each adapter (``rewriter.adapters.records``) the base weight becomes ``W + s B R A``, computed
in float64 row blocks through the weight store in the weight's own layout and cast once, and the
branch ``y + s B R A x`` is replaced by the base output; the factors leave the graph. Exact in the
tolerance rule (the only rounding is the final cast). An adapter on a weight that other readers
share (a tied LM head and its embedding) unties it first, so the embedding keeps the original.

``keep_base=true`` keeps each original weight as a buffer ``<weight>.base`` so that
``unmerge-adapters`` can restore it bit for bit; without it unmerging is refused: subtracting
``s B R A`` again would not give back the original bits in float32 or lower.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
import torch.fx

from rewriter.adapters import ADAPTERS_KEY, merge_edit, own_weight, records
from rewriter.context import PassContext
from rewriter.driver import Rewriter
from rewriter.graph import as_linear
from rewriter.pipeline import Pass, PassResult, option

__all__ = ["MergeAdaptersPass"]


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
        kept = {}
        for record in found:
            total = by_name[record.output]
            base_output = total.args[0]
            lin = _linear_of(base_output)
            if lin is None or lin.weight_name != record.weight:
                lin = None
            if lin is not None:
                lin = own_weight(rw, lin)
                weight = lin.weight_name
            else:
                weight = record.weight
            if self.keep_base:
                kept[weight] = rw.store.read(weight).detach().clone()
            rw.apply(merge_edit(gm, record, weight))
            rw.replace(total, base_output, rule="merge-adapter")
        for weight, original in kept.items():
            rw.add_weight(f"{weight}.base", original, rule="keep-base")
        rw.finish(prune_weights=True)
        gm.meta[ADAPTERS_KEY] = []
        if self.keep_base:
            gm.meta["rewriter.merged_adapters"] = found
        stats = {"merge-adapter": len(found)}
        return PassResult(gm, changed=True, stats=stats, notes=[f"{len(found)} adapters merged"])


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
