"""``nola``: NOLA adapters (Koohpayegani et al. 2024): low-rank factors as combinations of seeded
random bases, with only the coefficients trained.

``A = sum_i alpha_i A_i`` (``k`` bases ``[r, in]``), ``B = sum_j beta_j B_j`` (``l`` bases
``[out, r]``), ``delta W = s B A`` with ``s = alpha / r`` as for LoRA. Only ``alpha`` (k
values) and ``beta`` (l values) train: ``k + l`` parameters per map against LoRA's
``r (in + out)``. (``l`` is the paper's name, kept in the options.)

The bases come from an explicit per-map seed (``seed + 2 * index`` for A, ``+ 1`` for B) through
a CPU ``torch.Generator``, uniform in ``[-1, 1]`` scaled by ``sqrt(3 / in)`` for A (variance
``1 / in``: Kaiming-like once combined) and ``1 / sqrt(r)`` for B; never the global RNG, so the
same seed gives the same bases on every machine and device (the reference code seeds the global
RNG inside forward, and draws on the device's own stream). The graph holds the bases as frozen
tensors, so export and other backends see plain tensors, and the adapter checkpoint stores the
seeds and coefficients only. ``beta`` starts at zero (the injection is a no-op at init) and
``alpha`` at ``N(0, 1/k)`` (so ``A`` has unit-variance rows and ``beta`` gets a gradient).
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch
import torch.fx

from rewriter.analysis.adapters import adapter_dtype, inject, nola_bases, select_targets
from rewriter.context import PassContext
from rewriter.errors import RewriterError
from rewriter.pipeline import Pass, PassResult, option
from rewriter.rewrite.driver import Rewriter

__all__ = ["NOLAPass"]

aten = torch.ops.aten


@dataclasses.dataclass(frozen=True)
class NOLAPass(Pass):
    """NOLA adapters: A and B as trained combinations of seeded random bases."""

    name: ClassVar[str] = "nola"

    targets: str = option("all-linear", "Which maps, as for lora.")
    k: int = option(64, "Bases for A.")
    l: int = option(64, "Bases for B.")  # noqa: E741 - the paper's name
    r: int = option(8, "Rank of A and B.")
    alpha: float = option(8.0, "Scale numerator: s = alpha / r.")
    seed: int = option(0, "Base seed of the per-map basis generators.")

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        if min(self.k, self.l, self.r) < 1:
            raise RewriterError(f"pass '{self.name}': k, l and r must be >= 1")
        chosen = select_targets(gm, self.targets, self.name)
        scale = self.alpha / self.r
        rw = Rewriter(gm, pass_name=self.name)
        per_layer = {}
        for index, lin in enumerate(chosen):
            dtype = adapter_dtype(lin)
            a_basis, b_basis = nola_bases(
                self.seed, index, self.k, self.l, self.r, lin.in_features, lin.out_features
            )
            g = torch.Generator().manual_seed(self.seed + 2 * index)
            alpha = torch.randn(self.k, generator=g) / math.sqrt(self.k)
            factors = {
                "alpha": alpha.to(dtype),
                "beta": torch.zeros(self.l, dtype=dtype),
                "A_basis": a_basis.to(dtype),
                "B_basis": b_basis.to(dtype),
            }
            inject(
                rw,
                lin,
                method="nola",
                factors=factors,
                trainable={"alpha", "beta"},
                scale=scale,
                extra={"seed": self.seed, "index": index, "k": self.k, "l": self.l, "rank": self.r},
            )
            per_layer[lin.path] = self.k + self.l
        rw.finish(prune_weights=True)
        total = sum(per_layer.values())
        note = f"{len(chosen)} adapters, k={self.k}, l={self.l}, {total:,} trainable parameters"
        metrics = {
            "trainable_parameters": total,
            "peft_lora_parameters": sum(self.r * (m.in_features + m.out_features) for m in chosen),
            "per_layer": per_layer,
            "scale": scale,
        }
        return PassResult(
            gm, changed=True, stats={"nola": len(chosen)}, notes=[note], metrics=metrics
        )
