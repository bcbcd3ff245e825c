"""``rewriter::linear_attention``: kernelized attention with an optional softmax window and decay.

This module declares the op (its ``torch.library`` definition is the one place its parameters
are written: ``q, k, v, phi_q, phi_k, key_mask, decay, window_gate, causal, window, scale,
eps``), its fake kernel, autograd, samples and contract. The math and the quadratic and
chunked forms are in :mod:`rewriter.ops.attention_forms`; the recurrent form, the decoding
step and the deployment ops ``rewriter::linear_attention_state`` /
``rewriter::linear_attention_decode`` in :mod:`rewriter.ops.attention_decode`. Their names
import from here as well.
"""

from __future__ import annotations

import torch

from rewriter.ops.attention_decode import (
    LinearAttentionState,
    linear_attention_decode,
    linear_attention_decode_reference,
    linear_attention_recurrent,
    linear_attention_state,
    linear_attention_state_reference,
    linear_attention_step,
    state_size,
)
from rewriter.ops.attention_forms import (
    CHUNK,
    linear_attention_chunked,
    linear_attention_quadratic,
    sample_tensors,
)
from rewriter.ops.contract import (
    OPS,
    Arguments,
    OpContract,
    SampleSource,
    register,
    signature_of,
)

__all__ = [
    "CHUNK",
    "LinearAttentionState",
    "linear_attention",
    "linear_attention_chunked",
    "linear_attention_decode",
    "linear_attention_decode_reference",
    "linear_attention_quadratic",
    "linear_attention_recurrent",
    "linear_attention_state",
    "linear_attention_state_reference",
    "linear_attention_step",
    "state_size",
]


@torch.library.custom_op("rewriter::linear_attention", mutates_args=())
def linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    phi_q: torch.Tensor,
    phi_k: torch.Tensor,
    key_mask: torch.Tensor | None,
    decay: torch.Tensor | None,
    window_gate: torch.Tensor | None,
    causal: bool,
    window: int,
    scale: float,
    eps: float,
) -> torch.Tensor:
    """Linear attention (optional softmax window, decay, key mask); the chunked form computes it."""
    return linear_attention_chunked(**locals())  # its arguments, by name


@linear_attention.register_fake
@signature_of("linear_attention")
def _linear_attention_fake(a: Arguments) -> torch.Tensor:
    return a.q.new_empty((*a.q.shape[:-1], a.v.shape[-1]))


_DIFFERENTIABLE = ("q", "k", "v", "phi_q", "phi_k", "decay", "window_gate")


def _setup(ctx: object, inputs: tuple, output: torch.Tensor) -> None:
    # tensors (and absent optional tensors) are saved for backward, the settings kept as they are
    tensors = [x is None or isinstance(x, torch.Tensor) for x in inputs]
    ctx.save_for_backward(*(x for x, t in zip(inputs, tensors) if t))  # type: ignore[attr-defined]
    ctx.layout = tensors  # type: ignore[attr-defined]
    ctx.settings = [x for x, t in zip(inputs, tensors) if not t]  # type: ignore[attr-defined]


def _backward(ctx: object, grad: torch.Tensor) -> tuple:
    # Recompute the chunked form under autograd (its memory stays O(T)) and pull the gradient
    # through it: the attention transfer trains feature maps through this.
    saved, settings = iter(ctx.saved_tensors), iter(ctx.settings)  # type: ignore[attr-defined]
    names = OPS["linear_attention"].parameters
    inputs = [
        next(saved) if tensor else next(settings)
        for tensor in ctx.layout  # type: ignore[attr-defined]
    ]
    inputs = [
        t.detach().requires_grad_(t.is_floating_point() and name in _DIFFERENTIABLE)
        if isinstance(t, torch.Tensor)
        else t
        for name, t in zip(names, inputs)
    ]
    with torch.enable_grad():
        out = linear_attention_chunked(*inputs)
        wanted = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
        grads = iter(torch.autograd.grad(out, wanted, grad, allow_unused=True))
    return tuple(
        next(grads) if isinstance(t, torch.Tensor) and t.requires_grad else None for t in inputs
    )


linear_attention.register_autograd(_backward, setup_context=_setup)


def _attention_samples(s: SampleSource) -> list[tuple]:
    t = sample_tensors(s)
    q, k, v, pq, pk, mask, decay, gate, scale = t.values()
    return [
        (q, k, v, pq, pk, None, None, None, True, 0, scale, 1e-6),
        (q, k, v, pq, pk, mask, decay, None, True, 0, scale, 1e-6),
        (q, k, v, pq, pk, mask, decay, gate, True, 4, scale, 1e-6),
        (q, k, v, pq, pk, mask, None, None, False, 0, scale, 1e-6),
    ]


register(
    OpContract(
        name="linear_attention",
        overload=torch.ops.rewriter.linear_attention.default,
        reference=linear_attention_quadratic,
        decomposition=linear_attention_chunked,
        summary="kernelized attention with an optional softmax window and per-head decay",
        samples=_attention_samples,
    )
)
