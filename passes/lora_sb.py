"""``lora-sb``: LoRA-SB adapters (Ponkshe et al. 2024): the LoRA-XS architecture initialized from
an estimate of the first full fine-tuning update.

On ``samples`` calibration batches the gradient of the next-token loss with respect to every
targeted weight is accumulated (on a private copy of the graph); the first step of sign-based
optimizers (Adam's first step is ``-lr sign(g)``) gives ``delta W_1 = -update_lr sign(sum g)``.
Its truncated SVD ``U_r S_r V_r^T`` (float64) sets ``B = U_r``, ``A = V_r^T`` (both frozen) and the
trainable core ``R = diag(S_r)`` with ``s = 1``: at initialization the model already equals
``W + [delta W_1]_r``, the best rank-r approximation of that first update, and training ``R``
follows the best rank-r projection of the full gradient (the paper's argument). Approximate by
design: the injection changes the model. Needs calibration data.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
import torch.fx

from rewriter.analysis.adapters import adapter_dtype, inject, principal_factors, select_targets
from rewriter.context import PassContext, progress
from rewriter.errors import PreconditionError
from rewriter.ir.graph import copy_graph_module, module_path
from rewriter.ir.trace import trace_info
from rewriter.pipeline import Pass, PassResult, option
from rewriter.pipeline.train import causal_lm_loss, forward, logits_of
from rewriter.rewrite.driver import Rewriter

__all__ = ["LoRASBPass"]


@dataclasses.dataclass(frozen=True)
class LoRASBPass(Pass):
    """LoRA-SB: LoRA-XS factors from the SVD of an estimated first full fine-tuning update."""

    name: ClassVar[str] = "lora-sb"
    exact: ClassVar[bool] = False

    targets: str = option("all-linear", "Which maps, as for lora.")
    r: int = option(8, "Rank (trainable r^2 per map).")
    samples: int = option(4, "Calibration batches for the gradient estimate.")
    update_lr: float = option(1e-4, "Learning rate of the estimated first update.")

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        chosen = select_targets(gm, self.targets, self.name)
        batches = ctx.batches("calibration", limit=self.samples, pass_name=self.name)
        gradients = _gradients(gm, [lin.weight_name for lin in chosen], batches, ctx.progress)
        rw = Rewriter(gm, pass_name=self.name)
        per_layer = {}
        for lin in chosen:
            if self.r > min(lin.in_features, lin.out_features):
                raise PreconditionError(
                    f"pass '{self.name}': r={self.r} exceeds {module_path(lin.node)}"
                )
            g = gradients[lin.weight_name]
            g = g if lin.layout == "out_in" else g.T
            update = -self.update_lr * torch.sign(g)
            u, s, vh = principal_factors(update, self.r)
            dtype = adapter_dtype(lin)
            factors = {"A": vh.to(dtype), "B": u.to(dtype), "R": torch.diag(s).to(dtype)}
            inject(
                rw,
                lin,
                method=self.name,
                factors=factors,
                trainable={"R"},
                scale=1.0,
                extra={"samples": self.samples, "update_lr": self.update_lr},
            )
            per_layer[lin.path] = self.r * self.r
        rw.finish(prune_weights=True)
        total = sum(per_layer.values())
        note = f"{len(chosen)} adapters, rank {self.r}, {total:,} trainable parameters"
        metrics = {
            "trainable_parameters": total,
            "peft_lora_parameters": sum(self.r * (m.in_features + m.out_features) for m in chosen),
            "per_layer": per_layer,
        }
        return PassResult(
            gm, changed=True, stats={self.name: len(chosen)}, notes=[note], metrics=metrics
        )


def _gradients(
    gm: torch.fx.GraphModule, names: list[str], batches: list, show: bool
) -> dict[str, torch.Tensor]:
    """Summed next-token-loss gradients of the named weights, on a private copy of ``gm``."""
    work = copy_graph_module(gm)
    params = {}
    for name in dict.fromkeys(names):
        tensor = work.get_parameter(name)
        fresh = torch.nn.Parameter(tensor.detach().clone(), requires_grad=True)
        owner, _, leaf = name.rpartition(".")
        setattr(work.get_submodule(owner) if owner else work, leaf, fresh)
        params[name] = fresh
    info = trace_info(gm)
    for batch in progress(
        batches, total=len(batches), description="lora-sb: gradients", enabled=show
    ):
        ids = batch["input_ids"] if isinstance(batch, dict) else batch
        loss = causal_lm_loss(logits_of(forward(work, batch, info)), ids)
        loss.backward()
    return {name: p.grad.detach().to(torch.float64) for name, p in params.items()}
