"""``prernorm``: Pre-LN -> Pre-RMSNorm, exactly (Jiang et al. 2023, "Pre-RMSNorm and Pre-CRMSNorm
Transformers").

Math. With ``C = I - 11^T/d`` the centering projector, ``LN(x) = gamma * Cx / sqrt(mean((Cx)^2) +
eps) + beta`` and ``RMS(x) = gamma * x / sqrt(mean(x^2) + eps)``. If ``mean(x) = 0`` then
``Cx = x`` and ``LN(x) = RMS(x)`` with the *same* eps (both add it to the biased second moment).
In a Pre-LN network every reader of the residual stream is a LayerNorm, and LN is invariant to
adding a multiple of ``1``; so replacing every writer ``W`` of the stream by ``C W`` (and its
bias ``b`` by ``C b``) changes nothing the network computes, makes the stream zero-mean, and
then every LayerNorm equals an RMSNorm.

What the pass does, on any traced Pre-LN graph (no model-specific code):

1. Finds the residual stream by graph analysis anchored on the LayerNorms
   (:func:`rewriter.stream.find_stream`) and checks that it is only read by norms; otherwise it
   refuses, naming the node and its source module, before changing anything: Post-LN models
   (BERT, OPT with ``do_layer_norm_before=False``, BLOOM with
   ``apply_residual_connection_post_layernorm``), hidden states returned as outputs, writers read
   elsewhere.
2. Centers every writer, by op, in float64 through the weight store, cast once:
   ``linear`` (rows and bias), ``addmm`` with GPT-2 ``Conv1D``'s ``(in, out)`` weight (columns and
   bias), ``mm``/``matmul`` + bias, embeddings (each row; OPT's ``project_in`` is a linear
   writer, so its tied token embedding needs no change), stored tensors added to the stream. A
   writer that weight edits cannot center (BLOOM's embedding LayerNorm: its output has gamma and
   beta) gets one explicit ``x - mean(x)`` op. Any other writer is refused unless
   ``center_unknown_writers`` is set (a train-mode dropout, say, would otherwise be silently
   wrapped).
3. A writer whose weight is shared with a non-writer (a tied embedding / LM head) is untied
   first: centering would change the head, so the head keeps the original tensor.
4. Replaces every reader LayerNorm by ``aten.rms_norm`` with the LN's own eps passed explicitly
   (``eps=None`` would mean finfo eps) and gamma, plus ``add(beta)`` when the LN has a bias.

Parallel residual blocks (GPT-NeoX) are handled by the same analysis: both norms read the same
stream node, and the sum of the attention and MLP branches is a stream add of two writers. A
graph without LayerNorm (Llama) is left unchanged, with a note.

Invariants established: no ``aten.layer_norm`` reads the stream; the stream is zero-mean (up to
rounding); the graph's outputs are unchanged within the tolerance rule.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
import torch.fx

from rewriter.analysis.centering import center_writers, check_writers, layer_to_rms
from rewriter.analysis.residual import find_stream
from rewriter.context import PassContext
from rewriter.ir.graph import prune_dead_get_attrs
from rewriter.pipeline import Pass, PassResult, option
from rewriter.rewrite.driver import Rewriter

__all__ = ["PreRMSNormPass"]

aten = torch.ops.aten


@dataclasses.dataclass(frozen=True)
class PreRMSNormPass(Pass):
    """Pre-LN -> Pre-RMSNorm: center every residual writer, then each LayerNorm is an RMSNorm."""

    name: ClassVar[str] = "prernorm"

    center_unknown_writers: bool = option(
        False,
        "Center writers of unknown kind with an explicit mean subtraction instead of refusing.",
    )

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        stream = find_stream(gm, anchors=(aten.layer_norm.default,))
        if stream is None:
            return PassResult(gm, changed=False, notes=["no LayerNorm: nothing to do"])
        check_writers(stream, allow_unknown=self.center_unknown_writers)
        prune_dead_get_attrs(gm)  # frees the names of dead tied aliases for untied copies
        rw = Rewriter(gm, pass_name=self.name)
        center_writers(rw, stream)
        for norm in stream.norms:
            layer_to_rms(rw, norm)
        rw.finish()
        notes = [stream.describe()]
        return PassResult(gm, changed=True, stats=dict(rw.counters), notes=notes)
