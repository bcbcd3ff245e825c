"""L1 normalization (``rewriter::l1_norm``): ``d = x - mean(x)`` (centered) or ``x``, then
``y = d / (factor * mean|d| + eps) * w + b``. No square and no square root.

One program per row, float32 accumulation, masked blocks for any width: from registers in one
block up to ``MAX_ROW_BLOCK``, otherwise a pass for the mean, one for the mean absolute deviation
and one for the output.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import row_block, rows, warps


@triton.jit
def _l1_norm_kernel(
    X,
    W,
    B,
    Y,
    width,
    eps,
    factor,
    CENTERED: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    BLOCK: tl.constexpr,
    ONE_BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    x_row = X + row * width
    y_row = Y + row * width
    if ONE_BLOCK:
        cols = tl.arange(0, BLOCK)
        inside = cols < width
        x = tl.cast(tl.load(x_row + cols, mask=inside, other=0.0), tl.float32)
        if CENTERED:
            x = tl.where(inside, x - tl.sum(x, axis=0) / width, 0.0)
        scale = 1.0 / (factor * (tl.sum(tl.abs(x), axis=0) / width) + eps)
        y = x * scale
        if HAS_W:
            y = y * tl.cast(tl.load(W + cols, mask=inside, other=0.0), tl.float32)
        if HAS_B:
            y = y + tl.cast(tl.load(B + cols, mask=inside, other=0.0), tl.float32)
        tl.store(y_row + cols, y.to(Y.dtype.element_ty), mask=inside)
    else:
        mean = 0.0
        if CENTERED:
            sums = tl.zeros([BLOCK], dtype=tl.float32)
            for start in range(0, width, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                sums += tl.cast(tl.load(x_row + cols, mask=cols < width, other=0.0), tl.float32)
            mean = tl.sum(sums, axis=0) / width
        deviations = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, width, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            inside = cols < width
            x = tl.cast(tl.load(x_row + cols, mask=inside, other=0.0), tl.float32)
            deviations += tl.where(inside, tl.abs(x - mean), 0.0)
        scale = 1.0 / (factor * (tl.sum(deviations, axis=0) / width) + eps)
        for start in range(0, width, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            inside = cols < width
            x = tl.cast(tl.load(x_row + cols, mask=inside, other=0.0), tl.float32)
            y = (x - mean) * scale
            if HAS_W:
                y = y * tl.cast(tl.load(W + cols, mask=inside, other=0.0), tl.float32)
            if HAS_B:
                y = y + tl.cast(tl.load(B + cols, mask=inside, other=0.0), tl.float32)
            tl.store(y_row + cols, y.to(Y.dtype.element_ty), mask=inside)


def l1_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    centered: bool,
    factor: float,
    *,
    block: int | None = None,
) -> torch.Tensor:
    """``rewriter::l1_norm`` (same arguments, output in ``x``'s dtype)."""
    matrix = rows(x)
    width = matrix.shape[1]
    out = torch.empty_like(matrix)
    block = block or row_block(width)
    _l1_norm_kernel[(matrix.shape[0],)](
        matrix,
        weight.contiguous() if weight is not None else matrix,
        bias.contiguous() if bias is not None else matrix,
        out,
        width,
        float(eps),
        float(factor),
        CENTERED=bool(centered),
        HAS_W=weight is not None,
        HAS_B=bias is not None,
        BLOCK=block,
        ONE_BLOCK=width <= block,
        num_warps=warps(block),
    )
    return out.reshape(x.shape)
