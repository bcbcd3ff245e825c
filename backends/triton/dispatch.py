"""One dispatch function per kernel-backed op (same arguments as the op): the Triton kernel of
``kernels/triton`` for CUDA tensors, or for CPU tensors under ``TRITON_INTERPRET=1``; the op's
reference otherwise. :func:`register_cuda_kernels` attaches them to the ops for CUDA dispatch.

Why ``torch.library.register_kernel`` and not ``torch.library.triton_op``: defining a
``triton_op`` over an existing ``custom_op`` name silently replaces the op, CPU included, and its
kernel would have to be traceable by ``torch.export`` everywhere we export (ONNX, MLIR), which
breaks under the interpreter. The price: Inductor cannot fuse into our kernels; it schedules
around them.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Callable
from typing import Any

import torch

from rewriter import ops
from rewriter.ops import Arguments, signature_of
from rewriter.ops.quant import quantize_activations

__all__ = [
    "KERNELS",
    "NATIVE",
    "available",
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


# --- where kernels can run ------------------------------------------------------------------------


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def available() -> tuple[bool, str]:
    """Whether kernels can run here, and why not."""
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed (pip install 'rewriter[triton]')"
    if torch.cuda.is_available():
        return True, f"CUDA device {torch.cuda.get_device_name(0)}"
    if interpreting():
        return True, "Triton interpreter on CPU (TRITON_INTERPRET=1; slow, for tests)"
    return False, "no CUDA device: graphs run the ops' reference implementations"


def _kernel(module: str) -> Any:
    return importlib.import_module(f"rewriter.kernels.triton.{module}")


def _on_kernel_device(x: torch.Tensor) -> bool:
    if x.dtype == torch.float64:
        return False  # kernels accumulate in float32; float64 keeps its reference
    return x.is_cuda or (interpreting() and x.device.type == "cpu")


# --- dispatch functions (the ops' signatures) -----------------------------------------------------
# Each op's arguments are bound by its schema (``signature_of``): the parameter lists live once,
# in the ops' ``torch.library`` definitions.


@signature_of("crms_norm")
def crms_norm(a: Arguments) -> torch.Tensor:
    if not _on_kernel_device(a.x):
        return ops.OPS["crms_norm"].reference(**a)
    return _kernel("crms_norm").crms_norm(a.x, a.eps)


@signature_of("l1_norm")
def l1_norm(a: Arguments) -> torch.Tensor:
    if not _on_kernel_device(a.x):
        return ops.OPS["l1_norm"].reference(**a)
    return _kernel("l1_norm").l1_norm(a.x, a.weight, a.bias, a.eps, a.centered, a.factor)


@signature_of("shiftquant_linear")
def shiftquant_linear(a: Arguments) -> torch.Tensor:
    if not _on_kernel_device(a.x):
        return ops.OPS["shiftquant_linear"].reference(**a)
    x = quantize_activations(a.x, a.act_bits) if a.act_bits else a.x
    kernel = _kernel("shiftquant_linear").shiftquant_linear
    return kernel(x, a.packed, a.exponents, a.bias, a.bits, a.group, a.in_features)


@signature_of("linear_attention")
def linear_attention(a: Arguments) -> torch.Tensor:
    if a.window or not a.causal or not _on_kernel_device(a.q):
        return ops.OPS["linear_attention"].decomposition(**a)
    out = _kernel("linear_attention").linear_attention_chunked(
        a.phi_q, a.phi_k, a.v, a.key_mask, a.decay, a.eps
    )
    return out.to(a.q.dtype)


@signature_of("linear_attention_state")
def linear_attention_state(a: Arguments) -> list[torch.Tensor]:
    if a.window or not _on_kernel_device(a.k):
        return ops.OPS["linear_attention_state"].reference(**a)
    _, state, normalizer = _kernel("linear_attention").linear_attention_chunked(
        a.phi_k, a.phi_k, a.v, a.key_mask, a.decay, 0.0, write_output=False, return_state=True
    )
    return [state, normalizer]


@signature_of("linear_attention_decode")
def linear_attention_decode(a: Arguments) -> list[torch.Tensor]:
    state = a.state
    if a.window or not _on_kernel_device(a.q) or state[0].dtype != torch.float32:
        return ops.OPS["linear_attention_decode"].reference(**a)
    phi_q, phi_k, v = a.phi_q[:, :, 0], a.phi_k[:, :, 0], a.v[:, :, 0]  # the one token
    out, new_state, new_z = _kernel("linear_attention").linear_attention_decode(
        state[0], state[1], phi_q, phi_k, v, a.key_valid, a.decay, a.eps
    )
    return [out.unsqueeze(2).to(a.q.dtype), new_state, new_z]


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> torch.Tensor:
    """RMSNorm with optional weight and bias (``aten.rms_norm`` plus a bias add, fused)."""
    if not _on_kernel_device(x):
        width = (x.shape[-1],)
        y = torch.nn.functional.rms_norm(x, width, weight, eps)
        return y + bias if bias is not None else y
    return _kernel("rms_norm").rms_norm(x, weight, bias, eps)


KERNELS: dict[str, Callable[..., Any]] = {
    "crms_norm": crms_norm,
    "l1_norm": l1_norm,
    "shiftquant_linear": shiftquant_linear,
    "linear_attention": linear_attention,
    "linear_attention_state": linear_attention_state,
    "linear_attention_decode": linear_attention_decode,
}
"""``rewriter::`` op name -> its dispatch function (the Triton kernel where it applies)."""

NATIVE = frozenset(KERNELS)
"""The ``rewriter::`` ops this backend has kernels for."""

# --- registration for CUDA dispatch ---------------------------------------------------------------

_REGISTERED = False


def register_cuda_kernels() -> None:
    """Make every kernel-backed op run its Triton kernel on CUDA tensors (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    for name, function in KERNELS.items():
        torch.library.register_kernel(f"rewriter::{name}", "cuda", function)
    _REGISTERED = True
