"""``canonicalize``: remove no-op nodes and recognise composite normalizations.

Runs first and is cheap; no pass needs it for correctness (every pass works on a raw trace too),
but it makes graphs smaller and uniform:

* no-ops: eval-mode dropout, ``alias``, ``clone``, casts to the dtype a value already has,
  views/expands/slices that keep the shape, ``x + 0``, ``x * 1``, and ``_assert_tensor_metadata``
  checks the value's own metadata already proves (they also block ``gm.double()``);
* RMSNorm written out as Hugging Face Llama does (``to(f32)``, ``pow``, ``mean``, ``add eps``,
  ``rsqrt``, ``mul``, cast back, ``mul weight``) becomes ``aten.rms_norm`` with the eps it used;
* LayerNorm written out (``x - mean``, biased variance, ``/ sqrt(var + eps)`` or
  ``* rsqrt(var + eps)``, optional ``* weight + bias``) becomes ``aten.layer_norm``;
* softmax attention written out (``softmax(q @ k^T * s + mask) @ v``, as eager attention
  implementations export it) becomes ``aten.scaled_dot_product_attention(q, k, v, mask,
  scale=s)``, so every later pass sees attention in one form. BLOOM's form, an additive
  per-head bias (ALiBi) inside ``baddbmm`` on ``[B*H, T, D]`` views, becomes SDPA on the 4-D
  tensors with the bias added to the mask. A softmax computed in a wider dtype than q (BLOOM in
  half precision upcasts to float32) is left alone: SDPA would round differently.

Both recognitions are built bottom-up from small rules (normalize, fold the casts, absorb the
weight, absorb the bias), so partial forms (no weight, no bias) are recognised too. Values are
preserved exactly in float32 and float64 up to the reduction order of the fused kernels, which
the equivalence tests bound with the project's tolerance rule. In float16/bfloat16, folding the
casts is exact (``aten.rms_norm`` computes in float32 and casts back, as Llama does), but the
weight stays a separate multiply: ``aten.rms_norm`` would multiply by it before its single cast,
Llama multiplies after, and absorbing it would change the rounding (measured: a 1% logit
difference through a few bfloat16 layers with outlier channels).

Invariant established: no ``dropout``/``alias``/no-op nodes; composite norms are single ops; the
graph's outputs are unchanged. The dead alias ``get_attr`` of a tied embedding is pruned.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch.fx

from rewriter.analysis.canonicalize import RULES_ATTENTION, RULES_NOOPS, RULES_NORMS, canonicalize
from rewriter.context import PassContext
from rewriter.pipeline import Pass, PassResult, option

__all__ = ["RULES_ATTENTION", "RULES_NOOPS", "RULES_NORMS", "CanonicalizePass"]


@dataclasses.dataclass(frozen=True)
class CanonicalizePass(Pass):
    """Remove dropout, aliases and no-ops; recognise composite RMSNorm and LayerNorm."""

    name: ClassVar[str] = "canonicalize"

    norms: bool = option(True, "Recognise written-out RMSNorm / LayerNorm as single ops.")
    attention: bool = option(
        True, "Recognise written-out softmax attention as scaled_dot_product_attention."
    )
    max_iterations: int = option(10, "Bound on rule sweeps over the graph (fixpoint iteration).")

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        done = canonicalize(
            gm,
            norms=self.norms,
            attention=self.attention,
            max_iterations=self.max_iterations,
            pass_name=self.name,
        )
        return PassResult(
            gm, changed=done.changed, stats=done.stats, notes=done.notes, rules=done.rules
        )
