"""RMSNorm with optional weight and bias: ``y = x / sqrt(mean(x^2) + eps) * w + b`` per row.

One program per row; the sum of squares and the scaling in one kernel, float32 accumulation,
masked blocks for any width (one block from registers up to ``MAX_ROW_BLOCK``, a loop beyond).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import row_block, rows, warps


@triton.jit
def _rms_norm_kernel(
    X,
    W,
    B,
    Y,
    width,
    eps,
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
        scale = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / width + eps)
        y = x * scale
        if HAS_W:
            y = y * tl.cast(tl.load(W + cols, mask=inside, other=0.0), tl.float32)
        if HAS_B:
            y = y + tl.cast(tl.load(B + cols, mask=inside, other=0.0), tl.float32)
        tl.store(y_row + cols, y.to(Y.dtype.element_ty), mask=inside)
    else:
        total = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, width, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.cast(tl.load(x_row + cols, mask=cols < width, other=0.0), tl.float32)
            total += x * x
        scale = 1.0 / tl.sqrt(tl.sum(total, axis=0) / width + eps)
        for start in range(0, width, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            inside = cols < width
            y = tl.cast(tl.load(x_row + cols, mask=inside, other=0.0), tl.float32) * scale
            if HAS_W:
                y = y * tl.cast(tl.load(W + cols, mask=inside, other=0.0), tl.float32)
            if HAS_B:
                y = y + tl.cast(tl.load(B + cols, mask=inside, other=0.0), tl.float32)
            tl.store(y_row + cols, y.to(Y.dtype.element_ty), mask=inside)


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    *,
    block: int | None = None,
) -> torch.Tensor:
    """RMSNorm over the last dim of ``x`` (output in ``x``'s dtype)."""
    matrix = rows(x)
    width = matrix.shape[1]
    out = torch.empty_like(matrix)
    block = block or row_block(width)
    dummy = matrix  # pointer for an absent weight or bias (never read)
    _rms_norm_kernel[(matrix.shape[0],)](
        matrix,
        weight.contiguous() if weight is not None else dummy,
        bias.contiguous() if bias is not None else dummy,
        out,
        width,
        float(eps),
        HAS_W=weight is not None,
        HAS_B=bias is not None,
        BLOCK=block,
        ONE_BLOCK=width <= block,
        num_warps=warps(block),
    )
    return out.reshape(x.shape)
