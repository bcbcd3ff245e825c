"""ShiftQuant linear (``rewriter::shiftquant_linear``): ``y = x W^T + b`` with ``W`` stored as
packed ``bits``-bit codes and one power-of-two scale per group of ``group`` inputs.

A tiled matmul over ``[M, K] x [K, N]``: each program computes a ``BM x BN`` output tile; for every
``BK`` slice of ``K`` it loads the activations, loads the packed bytes of the ``BN x BK`` weight
tile, unpacks the codes with shifts and masks (codes of 3, 5, 6 and 7 bits straddle bytes: two
bytes are read), applies ``(code - 2^(b-1)) * 2^e`` in registers and accumulates ``tl.dot`` in
float32. The dequantized weight exists only tile by tile, never in memory. The storage format is
the op's (``rewriter/ops/quant.py``): byte ``(i b) // 8`` of a group holds code ``i`` from bit
``(i b) % 8``, low bits first. Tiles are autotuned per (M, N, K, bits, group) on a GPU; the
interpreter uses one small config.

Products: float32 activations use ``tl.dot``'s IEEE float32 mode (no TF32 rounding), so results
equal the reference up to summation order; half-precision activations multiply in their own dtype
(the weights ``code * 2^e`` are exact there while ``e`` stays in its range). Activation
quantization (``act_bits``), a per-row reduction before the matmul, is done by the caller.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import configs

_CONFIGS = configs(
    [
        {"BM": 16, "BN": 64, "BK": 64, "num_warps": 4, "num_stages": 4},
        {"BM": 16, "BN": 128, "BK": 64, "num_warps": 4, "num_stages": 4},
        {"BM": 32, "BN": 64, "BK": 64, "num_warps": 4, "num_stages": 4},
        {"BM": 64, "BN": 64, "BK": 64, "num_warps": 4, "num_stages": 3},
        {"BM": 64, "BN": 128, "BK": 64, "num_warps": 8, "num_stages": 3},
        {"BM": 128, "BN": 128, "BK": 32, "num_warps": 8, "num_stages": 3},
    ],
    {"BM": 16, "BN": 16, "BK": 32},
)


@triton.autotune(configs=_CONFIGS, key=["M", "N", "K", "BITS", "GROUP"])
@triton.jit
def _shiftquant_kernel(
    X,
    P,
    E,
    B,
    Y,
    M,
    N,
    K,
    groups,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    HAS_B: tl.constexpr,
    STRADDLE: tl.constexpr,
    IEEE: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    row_ok = rm < M
    col_ok = rn < N
    group_bytes = GROUP * BITS // 8
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        k_ok = rk < K
        x = tl.load(
            X + rm[:, None] * K + rk[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0
        )
        group = rk // GROUP
        bit = (rk % GROUP) * BITS
        byte = bit // 8
        shift = bit % 8
        tile_ok = col_ok[:, None] & k_ok[None, :]
        base = (
            P + rn[:, None] * (groups * group_bytes) + group[None, :] * group_bytes + byte[None, :]
        )
        word = tl.cast(tl.load(base, mask=tile_ok, other=0), tl.int32)
        if STRADDLE:  # the code's high bits are in the next byte of the group
            spill = tile_ok & (byte[None, :] + 1 < group_bytes)
            word = word | (tl.cast(tl.load(base + 1, mask=spill, other=0), tl.int32) << 8)
        code = (word >> shift[None, :]) & ((1 << BITS) - 1)
        exponent = tl.load(E + rn[:, None] * groups + group[None, :], mask=tile_ok, other=0)
        scale = tl.exp2(tl.cast(exponent, tl.float32))
        w = tl.cast(code - (1 << (BITS - 1)), tl.float32) * scale  # [BN, BK]
        if IEEE:
            acc += tl.dot(tl.cast(x, tl.float32), tl.trans(w), input_precision="ieee")
        else:
            acc += tl.dot(x, tl.trans(w.to(x.dtype)))
    if HAS_B:
        acc += tl.cast(tl.load(B + rn, mask=col_ok, other=0.0), tl.float32)[None, :]
    tl.store(
        Y + rm[:, None] * N + rn[None, :],
        acc.to(Y.dtype.element_ty),
        mask=row_ok[:, None] & col_ok[None, :],
    )


def shiftquant_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    exponents: torch.Tensor,
    bias: torch.Tensor | None,
    bits: int,
    group: int,
    in_features: int,
    act_bits: int = 0,
) -> torch.Tensor:
    """``rewriter::shiftquant_linear`` with activations already quantized when ``act_bits``
    (the backend does that first); output in ``x``'s dtype."""
    if act_bits:
        raise ValueError("quantize the activations before the kernel (act_bits must be 0 here)")
    matrix = x.reshape(-1, x.shape[-1]).contiguous()
    m, k = matrix.shape
    n = packed.shape[0]
    if k != in_features:
        raise ValueError(f"x has {k} features, the weight {in_features}")
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)

    def grid(meta: dict) -> tuple[int, int]:
        return (triton.cdiv(m, meta["BM"]), triton.cdiv(n, meta["BN"]))

    _shiftquant_kernel[grid](
        matrix,
        packed.contiguous(),
        exponents.contiguous(),
        bias.contiguous() if bias is not None else matrix,
        out,
        m,
        n,
        k,
        packed.shape[1],
        BITS=int(bits),
        GROUP=int(group),
        HAS_B=bias is not None,
        STRADDLE=8 % int(bits) != 0,
        IEEE=x.dtype == torch.float32,
    )
    return out.reshape(*x.shape[:-1], n)
