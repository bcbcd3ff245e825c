"""Triton backend: the ``rewriter::`` ops (and RMSNorm) run as the Triton kernels of
``kernels/triton`` on a GPU, and rewritten graphs run on them. Two ways in share one dispatch
function per op (:mod:`.dispatch`: the kernel for CUDA tensors, or for CPU tensors under
``TRITON_INTERPRET=1``; the op's reference otherwise): :func:`register_cuda_kernels` attaches each
to its op for CUDA dispatch (the op keeps its reference for every other device, its fake kernel,
autograd and decomposition), and :func:`compile` (:mod:`.lowering`) returns a :class:`TritonGraph`
whose op nodes call them directly, with a plan naming every node that runs its reference and why.
Kernels cover ``crms_norm``, ``l1_norm``, ``shiftquant_linear`` (activation quantization first, in
torch), causal ``linear_attention`` without a softmax window, and the deployment ops
``linear_attention_state`` / ``linear_attention_decode`` without a window; a window, non-causal
attention and float64 inputs run the reference. :class:`TritonBackend` (:mod:`.backend`) is the
shared interface.
"""

from __future__ import annotations

from rewriter.backends.triton.backend import TritonBackend
from rewriter.backends.triton.dispatch import (
    KERNELS,
    NATIVE,
    available,
    crms_norm,
    interpreting,
    l1_norm,
    linear_attention,
    linear_attention_decode,
    linear_attention_state,
    register_cuda_kernels,
    rms_norm,
    shiftquant_linear,
)
from rewriter.backends.triton.lowering import MARKERS, TritonGraph, compile

__all__ = [
    "KERNELS",
    "MARKERS",
    "NATIVE",
    "TritonBackend",
    "TritonGraph",
    "available",
    "compile",
    "crms_norm",
    "interpreting",
    "l1_norm",
    "linear_attention",
    "linear_attention_decode",
    "linear_attention_state",
    "register_cuda_kernels",
    "rms_norm",
    "shiftquant_linear",
]
