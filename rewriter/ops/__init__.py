"""The ``rewriter::`` op set and the contract every op in it follows (:mod:`.contract`).

Ops (one module per family):

* ``rewriter::crms_norm(x, eps)`` (:mod:`.norms`): Pre-CRMSNorm (Jiang et al. 2023). ``x`` holds
  the first ``d - 1`` coordinates of a zero-mean vector of width ``d`` (the last is ``-sum(x)``);
  ``y = x / sqrt((sum x_i^2 + (sum x_i)^2) / d + eps)``, the first ``d - 1`` coordinates of
  ``rms_norm`` of the full vector. Computed in float32 for half types, like ``aten.rms_norm``.
* ``rewriter::l1_norm(x, weight, bias, eps, centered, factor)`` (:mod:`.norms`): ``d = x -
  mean(x)`` (centered, for LayerNorm) or ``x`` (for RMSNorm); ``y = d / (factor * mean|d| +
  eps) * weight + bias``. No squares or square roots (L1BN, Wu et al. 2018; Guo et al. 2024).
* ``rewriter::shiftquant_linear(x, packed, exponents, bias, bits, group, in_features,
  act_bits)`` (:mod:`.quant`): ``x W^T + b`` with ``W`` stored as packed b-bit integers with
  one power-of-two scale per group of inputs; the format is documented in :mod:`.quant`.
* ``rewriter::linear_attention(q, k, v, phi_q, phi_k, key_mask, decay, window_gate, causal,
  window, scale, eps)`` (:mod:`.attention`): kernelized attention over feature maps, with an
  optional softmax window sharing the normalizer (LoLCATs) and per-head decay; quadratic and
  chunked forms (:mod:`.attention_forms`), the recurrent form and the deployment ops
  ``linear_attention_state`` / ``linear_attention_decode`` (:mod:`.attention_decode`).
* ``rewriter::step_part(x, part)`` and ``rewriter::cache_point(x, layer, kind)``
  (:mod:`.deploy`): slicing and identity that mark where a causal LM's step graph is cut into
  prefill and decode graphs (:mod:`rewriter.deploy`).

An op's parameters are written once, in its ``torch.library`` definition: its forms and fake
kernels take them by name through :func:`signature_of`, passes order a new node's arguments
with :meth:`OpContract.positional`, and backends read a node's with :func:`arguments`.
"""

from __future__ import annotations

from rewriter.ops.attention import linear_attention
from rewriter.ops.contract import (
    OPS,
    Arguments,
    OpContract,
    SampleSource,
    arguments,
    bind,
    check_lowerable,
    decompose,
    decomposition_table,
    register,
    rewriter_nodes,
    signature_of,
)
from rewriter.ops.deploy import cache_point, step_part
from rewriter.ops.norms import GAUSSIAN_FACTOR, crms_norm, l1_norm
from rewriter.ops.quant import shiftquant_linear

__all__ = [
    "GAUSSIAN_FACTOR",
    "OPS",
    "Arguments",
    "OpContract",
    "SampleSource",
    "arguments",
    "bind",
    "cache_point",
    "check_lowerable",
    "crms_norm",
    "decompose",
    "decomposition_table",
    "l1_norm",
    "linear_attention",
    "register",
    "rewriter_nodes",
    "shiftquant_linear",
    "signature_of",
    "step_part",
]
