"""``lora``: inject LoRA adapters (Hu et al. 2021) into every targeted linear map of the graph.

Each targeted map ``y = x W^T + b`` gains ``s B A x`` with ``A`` ``[r, in]``, ``B`` ``[out, r]``
and ``s = alpha / r`` (``alpha / sqrt(r)`` with ``rslora``), as PEFT computes it, for every form
the map takes in the graph (``nn.Linear``, GPT-2 ``Conv1D`` whose weight is stored ``(in, out)``,
functional, a tied LM head). ``A`` and ``B`` become trainable parameters of the GraphModule, the
base weights stay frozen: ``rewriter.train(gm, batches, steps=..., lr=...)`` (``params=None``
trains exactly the adapters) fine-tunes them, ``merge-adapters`` folds them back.

Targets, as PEFT users write them (``targets``): a regex (full match on the map's source module
path, PEFT's string form); a comma-separated list of names, each matching a module exactly or as
a dotted suffix (``c_attn,c_proj``); or ``all-linear`` (default), every linear map except the LM
head (a map whose output is a graph output or that shares its weight with an embedding). A module
applied more than once (a shared layer; the prefix and last-token halves of a ``rewriter.deploy``
step graph) gets one adapter whose branch is added at every application.

Initializations (``init``), none touching the global RNG (a CPU generator seeded from the context
seed and the map's index):

* ``default``: ``A`` Kaiming-uniform as ``nn.Linear`` (bound ``1 / sqrt(in)``), ``B = 0``;
* ``gaussian``: ``A ~ N(0, 1/r^2)`` (PEFT's std ``1/r``), ``B = 0``;
* ``pissa`` (Meng et al. 2024): ``W = U S V^T`` (float64 SVD); ``A = sqrt(S_r / s) V_r^T``,
  ``B = U_r sqrt(S_r / s)``, and the base weight is rewritten to ``W - s B A`` through the weight
  store, so the model is unchanged at init while the adapter starts on the principal subspace.

All three leave the model's function unchanged at initialization (exact pass). ``dropout``
(PEFT's ``lora_dropout``) puts a dropout on the adapter's input that is off in the graph (so
inference, merging and export are unaffected) and that :func:`rewriter.train` switches on while
it trains.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar, Literal

import torch
import torch.fx

from rewriter.analysis.adapters import adapter_dtype, inject, own_weight, select_targets
from rewriter.context import PassContext
from rewriter.errors import PreconditionError, RewriterError
from rewriter.ir.graph import LinearMap
from rewriter.ir.store import Block, Edit
from rewriter.pipeline import Pass, PassResult, option
from rewriter.rewrite.driver import Rewriter

__all__ = ["LoRAPass"]


@dataclasses.dataclass(frozen=True)
class LoRAPass(Pass):
    """LoRA adapters on every targeted linear map (trainable A, B; base frozen)."""

    name: ClassVar[str] = "lora"

    targets: str = option(
        "all-linear", "Regex (full match), comma list of names/suffixes, or 'all-linear'."
    )
    r: int = option(8, "Rank.")
    alpha: float = option(8.0, "Scale numerator: s = alpha / r (alpha / sqrt(r) with rslora).")
    rslora: bool = option(False, "Rank-stabilized scaling alpha / sqrt(r).")
    init: Literal["default", "gaussian", "pissa"] = option("default", "How A and B start.")
    dropout: float = option(0.0, "Dropout on the adapter input, active only in rewriter.train.")

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        if self.r < 1:
            raise RewriterError(f"pass '{self.name}': r must be >= 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise RewriterError(
                f"pass '{self.name}': dropout must be in [0, 1), got {self.dropout}"
            )
        chosen = select_targets(gm, self.targets, self.name)
        scale = self.alpha / (math.sqrt(self.r) if self.rslora else self.r)
        rw = Rewriter(gm, pass_name=self.name)
        counts = {"trainable": 0}
        per_layer = {}
        for index, lin in enumerate(chosen):
            if self.init == "pissa":
                lin = own_weight(rw, lin)  # the residual must not reach a tied embedding
            a, b = self._factors(rw, lin, scale, ctx.seed + index)
            inject(
                rw,
                lin,
                method="lora",
                factors={"A": a, "B": b},
                trainable={"A", "B"},
                scale=scale,
                dropout=self.dropout,
                extra={"init": "pissa"} if self.init == "pissa" else None,
            )
            per_layer[_label(lin)] = a.numel() + b.numel()
            counts["trainable"] += a.numel() + b.numel()
        rw.finish(prune_weights=True)
        metrics = {
            "trainable_parameters": counts["trainable"],
            "peft_lora_parameters": sum(self.r * (m.in_features + m.out_features) for m in chosen),
            "per_layer": per_layer,
            "scale": scale,
        }
        note = (
            f"{len(chosen)} adapters, rank {self.r}, {counts['trainable']:,} trainable parameters"
        )
        return PassResult(
            gm, changed=True, stats={"lora": len(chosen)}, notes=[note], metrics=metrics
        )

    def _factors(
        self, rw: Rewriter, lin: LinearMap, scale: float, seed: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = adapter_dtype(lin)
        out_f, in_f, r = lin.out_features, lin.in_features, self.r
        if self.init == "pissa" and r > min(out_f, in_f):  # plain LoRA may be over-parametrized
            raise PreconditionError(
                f"pass '{self.name}': r={r} exceeds the size of {_label(lin)} ({out_f} x {in_f})"
            )
        generator = torch.Generator().manual_seed(seed)
        if self.init == "pissa":
            return _pissa(rw, lin, r, scale, dtype)
        if self.init == "gaussian":
            a = torch.randn(r, in_f, generator=generator, dtype=torch.float64) / r
        else:
            bound = 1.0 / math.sqrt(in_f)
            a = (torch.rand(r, in_f, generator=generator, dtype=torch.float64) * 2 - 1) * bound
        return a.to(dtype), torch.zeros(out_f, r, dtype=dtype)


def _pissa(
    rw: Rewriter, lin: LinearMap, r: int, scale: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Principal factors of W, and the base rewritten to the residual ``W - s B A``."""
    weight = rw.store.read(lin.weight_name).to(torch.float64)
    w = weight if lin.layout == "out_in" else weight.T
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    root = torch.sqrt(s[:r] / scale)
    a = (root[:, None] * vh[:r]).to(dtype)
    b = (u[:, :r] * root[None, :]).to(dtype)
    principal = scale * (b.to(torch.float64) @ a.to(torch.float64))  # what the adapter adds
    name = lin.weight_name

    def residual(block: Block) -> torch.Tensor:
        rows = block.rows(name)
        part = principal if lin.layout == "out_in" else principal.T
        return rows - part[block.start : block.stop]

    rw.apply(Edit(name, (name,), residual, note="pissa residual"))
    return a, b


def _label(lin: LinearMap) -> str:
    return lin.path
