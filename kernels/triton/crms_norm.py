"""Compressed RMSNorm (``rewriter::crms_norm``): the RMSNorm of a zero-mean ``d``-vector from its
first ``d - 1`` entries, ``y = x / sqrt((sum x^2 + (sum x)^2) / d + eps)``.

One program per row; both sums in one pass, float32 accumulation, masked blocks for any width.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import row_block, rows, warps


@triton.jit
def _crms_norm_kernel(X, Y, width, eps, BLOCK: tl.constexpr, ONE_BLOCK: tl.constexpr):
    row = tl.program_id(0)
    x_row = X + row * width
    y_row = Y + row * width
    if ONE_BLOCK:
        cols = tl.arange(0, BLOCK)
        inside = cols < width
        x = tl.cast(tl.load(x_row + cols, mask=inside, other=0.0), tl.float32)
        implied = tl.sum(x, axis=0)
        squares = tl.sum(x * x, axis=0) + implied * implied
        tl.store(
            y_row + cols,
            (x / tl.sqrt(squares / (width + 1) + eps)).to(Y.dtype.element_ty),
            mask=inside,
        )
    else:
        sums = tl.zeros([BLOCK], dtype=tl.float32)
        total = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, width, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.cast(tl.load(x_row + cols, mask=cols < width, other=0.0), tl.float32)
            sums += x
            total += x * x
        implied = tl.sum(sums, axis=0)
        scale = 1.0 / tl.sqrt((tl.sum(total, axis=0) + implied * implied) / (width + 1) + eps)
        for start in range(0, width, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            inside = cols < width
            x = tl.cast(tl.load(x_row + cols, mask=inside, other=0.0), tl.float32)
            tl.store(y_row + cols, (x * scale).to(Y.dtype.element_ty), mask=inside)


def crms_norm(x: torch.Tensor, eps: float, *, block: int | None = None) -> torch.Tensor:
    """``rewriter::crms_norm`` (same arguments, output in ``x``'s dtype)."""
    matrix = rows(x)
    width = matrix.shape[1]
    out = torch.empty_like(matrix)
    block = block or row_block(width)
    _crms_norm_kernel[(matrix.shape[0],)](
        matrix,
        out,
        width,
        float(eps),
        BLOCK=block,
        ONE_BLOCK=width <= block,
        num_warps=warps(block),
    )
    return out.reshape(x.shape)
