"""``lora-xs``: LoRA-XS adapters (Bałazy et al. 2024): frozen singular vectors of the weight and
a trainable ``r x r`` core.

``delta W = s B R A`` with ``B = U_r`` (``[out, r]``, frozen), ``A = S_r V_r^T`` (``[r, in]``,
frozen) from the truncated SVD of the pretrained ``W = U S V^T`` (float64 by default, float32 on
request: ``svd_dtype``), and ``R`` (``[r, r]``) the only trainable tensor: ``r^2`` parameters per
map whatever its size. ``R`` starts as LoRA-XS does, ``N(0, 1e-5^2)`` (``init=normal``), which
moves the outputs by about 1e-5 relative (so the pass is approximate); ``init=zeros`` makes the
injection an exact no-op and still trains (``R``'s gradient is ``B^T G A^T``, not zero).
The SVD is exact (``torch.linalg.svd``), not randomized: the same weights give the same factors.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal

import torch
import torch.fx

from rewriter.analysis.adapters import adapter_dtype, inject, principal_factors, select_targets
from rewriter.context import PassContext
from rewriter.errors import PreconditionError
from rewriter.ir.graph import LinearMap, module_path
from rewriter.pipeline import Pass, PassResult, option
from rewriter.rewrite.driver import Rewriter

__all__ = ["LoRAXSPass"]


def out_in(rw: Rewriter, lin: LinearMap) -> torch.Tensor:
    weight = rw.store.read(lin.weight_name).detach()
    return weight if lin.layout == "out_in" else weight.T


@dataclasses.dataclass(frozen=True)
class LoRAXSPass(Pass):
    """LoRA-XS: frozen SVD factors of W and a trainable r x r core (r^2 parameters per map)."""

    name: ClassVar[str] = "lora-xs"
    exact: ClassVar[bool] = False

    targets: str = option("all-linear", "Which maps, as for lora.")
    r: int = option(8, "Rank (trainable r^2 per map).")
    alpha: float = option(8.0, "Scale numerator: s = alpha / r.")
    init: Literal["normal", "zeros"] = option("normal", "R ~ N(0, 1e-5^2) (LoRA-XS), or zeros.")
    svd_dtype: Literal["float64", "float32"] = option("float64", "Precision of the SVD.")

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        chosen = select_targets(gm, self.targets, self.name)
        scale = self.alpha / self.r
        rw = Rewriter(gm, pass_name=self.name)
        per_layer = {}
        dtype_svd = getattr(torch, self.svd_dtype)
        for index, lin in enumerate(chosen):
            if self.r > min(lin.in_features, lin.out_features):
                raise PreconditionError(
                    f"pass '{self.name}': r={self.r} exceeds {module_path(lin.node)} "
                    f"({lin.out_features} x {lin.in_features})"
                )
            dtype = adapter_dtype(lin)
            u, s, vh = principal_factors(out_in(rw, lin), self.r, dtype_svd)
            g = torch.Generator().manual_seed(ctx.seed + index)
            core = (
                torch.randn(self.r, self.r, generator=g, dtype=torch.float64) * 1e-5
                if self.init == "normal"
                else torch.zeros(self.r, self.r, dtype=torch.float64)
            )
            factors = {"A": (s[:, None] * vh).to(dtype), "B": u.to(dtype), "R": core.to(dtype)}
            inject(
                rw,
                lin,
                method=self.name,
                factors=factors,
                trainable={"R"},
                scale=scale,
                extra={"svd_dtype": self.svd_dtype},
            )
            per_layer[lin.path] = self.r * self.r
        rw.finish(prune_weights=True)
        total = sum(per_layer.values())
        note = f"{len(chosen)} adapters, rank {self.r}, {total:,} trainable parameters"
        metrics = {
            "trainable_parameters": total,
            "peft_lora_parameters": sum(self.r * (m.in_features + m.out_features) for m in chosen),
            "per_layer": per_layer,
            "scale": scale,
        }
        return PassResult(
            gm, changed=True, stats={self.name: len(chosen)}, notes=[note], metrics=metrics
        )
