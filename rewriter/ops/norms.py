"""Normalization ops: ``rewriter::crms_norm`` and ``rewriter::l1_norm``."""

from __future__ import annotations

import math

import torch

from rewriter.ops.contract import OpContract, register

__all__ = [
    "GAUSSIAN_FACTOR",
    "crms_norm",
    "crms_norm_reference",
    "l1_norm",
    "l1_norm_reference",
]


# --- crms_norm -----------------------------------------------------------------------------------


def _opmath(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def crms_norm_reference(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Plain-torch semantics of ``rewriter::crms_norm`` (also its ATen decomposition)."""
    xs = _opmath(x)
    width = xs.shape[-1] + 1
    implied = xs.sum(-1, keepdim=True)
    mean_square = (xs.pow(2).sum(-1, keepdim=True) + implied.pow(2)) / width
    return (xs * torch.rsqrt(mean_square + eps)).to(x.dtype)


@torch.library.custom_op("rewriter::crms_norm", mutates_args=())
def crms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Compressed RMSNorm over the last dim of ``x`` (width d - 1 of a zero-mean d-vector)."""
    return crms_norm_reference(x, eps)


@crms_norm.register_fake
def _crms_norm_fake(x: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.empty_like(x)


def _crms_norm_setup(ctx: object, inputs: tuple[torch.Tensor, float], output: torch.Tensor) -> None:
    x, eps = inputs
    ctx.save_for_backward(x)  # type: ignore[attr-defined]
    ctx.eps = eps  # type: ignore[attr-defined]


def _crms_norm_backward(ctx: object, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
    # y_j = x_j r with r = (s/d + eps)^(-1/2), s = sum x^2 + (sum x)^2, so
    # dL/dx_i = g_i r - r^3 (x_i + sum x) / d * sum_j g_j x_j.
    (x,) = ctx.saved_tensors  # type: ignore[attr-defined]
    xs, gs = _opmath(x), _opmath(grad)
    width = xs.shape[-1] + 1
    implied = xs.sum(-1, keepdim=True)
    r = torch.rsqrt((xs.pow(2).sum(-1, keepdim=True) + implied.pow(2)) / width + ctx.eps)  # type: ignore[attr-defined]
    dot = (gs * xs).sum(-1, keepdim=True)
    grad_x = gs * r - r.pow(3) * (xs + implied) * dot / width
    return grad_x.to(x.dtype), None


crms_norm.register_autograd(_crms_norm_backward, setup_context=_crms_norm_setup)

register(
    OpContract(
        name="crms_norm",
        overload=torch.ops.rewriter.crms_norm.default,
        reference=crms_norm_reference,
        decomposition=crms_norm_reference,
        summary="RMSNorm of a zero-mean d-vector stored as its first d-1 coordinates",
        samples=lambda s: [(s.rand(3, s.width), 1e-5), (s.rand(2, 3, 7), 1e-6)],
    )
)


# --- l1_norm -------------------------------------------------------------------------------------


def l1_norm_reference(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    centered: bool,
    factor: float,
) -> torch.Tensor:
    """Plain-torch semantics of ``rewriter::l1_norm`` (also its ATen decomposition).

    ``d = x - mean(x)`` (``centered``) or ``x``; ``y = d / (factor * mean|d| + eps) * weight +
    bias`` over the last dim, in float32 for half inputs.
    """
    xs = _opmath(x)
    d = xs - xs.mean(-1, keepdim=True) if centered else xs
    y = d / (factor * d.abs().mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * _opmath(weight)
    if bias is not None:
        y = y + _opmath(bias)
    return y.to(x.dtype)


@torch.library.custom_op("rewriter::l1_norm", mutates_args=())
def l1_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    centered: bool,
    factor: float,
) -> torch.Tensor:
    """L1 normalization over the last dim: divide by ``factor`` x the mean absolute deviation."""
    return l1_norm_reference(x, weight, bias, eps, centered, factor)


@l1_norm.register_fake
def _l1_norm_fake(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    centered: bool,
    factor: float,
) -> torch.Tensor:
    return torch.empty_like(x)


def _l1_norm_setup(ctx: object, inputs: tuple, output: torch.Tensor) -> None:
    x, weight, bias, eps, centered, factor = inputs
    ctx.save_for_backward(x, weight)  # type: ignore[attr-defined]
    ctx.settings = (eps, centered, factor, bias is not None)  # type: ignore[attr-defined]


def _l1_norm_backward(ctx: object, grad: torch.Tensor) -> tuple:
    # y = d / s, s = c m + eps, m = mean|d|. With g the gradient at y (times the weight):
    # dL/dd_i = g_i / s - (c / n) sign(d_i) sum_j g_j d_j / s^2; centering projects that onto
    # zero-mean vectors (subtract its mean). No squares and no roots: why L1 suits integer math.
    x, weight = ctx.saved_tensors  # type: ignore[attr-defined]
    eps, centered, factor, has_bias = ctx.settings  # type: ignore[attr-defined]
    xs, gs = _opmath(x), _opmath(grad)
    d = xs - xs.mean(-1, keepdim=True) if centered else xs
    s = factor * d.abs().mean(-1, keepdim=True) + eps
    normalized = d / s
    g = gs * _opmath(weight) if weight is not None else gs
    width = xs.shape[-1]
    grad_d = g / s - (factor / width) * d.sign() * (g * d).sum(-1, keepdim=True) / s.pow(2)
    grad_x = grad_d - grad_d.mean(-1, keepdim=True) if centered else grad_d
    reduce = tuple(range(grad.dim() - 1))
    grad_weight = (gs * normalized).sum(reduce).to(weight.dtype) if weight is not None else None
    grad_bias = gs.sum(reduce).to(grad.dtype) if has_bias else None
    return grad_x.to(x.dtype), grad_weight, grad_bias, None, None, None


l1_norm.register_autograd(_l1_norm_backward, setup_context=_l1_norm_setup)

GAUSSIAN_FACTOR = math.sqrt(math.pi / 2)
"""``sqrt(pi/2)``: for Gaussian rows ``E|d| = sigma sqrt(2/pi)``, so this factor times the mean
absolute deviation estimates the standard deviation (L1BN, Wu et al. 2018)."""

register(
    OpContract(
        name="l1_norm",
        overload=torch.ops.rewriter.l1_norm.default,
        reference=l1_norm_reference,
        decomposition=l1_norm_reference,
        summary="x (centered or not) over factor * mean absolute deviation + eps, then affine",
        samples=lambda s: [
            (s.rand(3, s.width), s.rand(s.width), s.rand(s.width), 1e-5, True, 1.25),
            (s.rand(2, 2, 7), None, None, 1e-6, False, 1.0),
        ],
    )
)
