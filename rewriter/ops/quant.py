"""``rewriter::shiftquant_linear``: a linear map with b-bit weights and power-of-two group scales.

The storage format (shared by every backend: ONNX ``MatMulNBits``, Triton, HLS):

* the weight ``W`` (``N`` outputs x ``K`` inputs) is cut along ``K`` into groups of ``group``
  columns (``K`` is padded with zeros to a whole number of groups);
* each group has one scale ``2**e`` with ``e`` an integer (``exponents``, int8, ``[N, K/group]``);
* each weight is the integer ``q = W / 2**e``, symmetric in ``[-(2**(b-1) - 1), 2**(b-1) - 1]``,
  stored as the unsigned code ``u = q + 2**(b-1)`` (so the zero point is implicit, ORT's
  default) in ``b`` bits, packed little-endian along ``K``: code ``i`` of a group occupies bits
  ``[i b, (i + 1) b)`` of the group's ``group * b / 8`` bytes (``packed``, uint8,
  ``[N, K/group, group*b/8]``). For 2, 4 and 8 bits this is exactly ``MatMulNBits``' layout
  (low bits first).

``W = (u - 2**(b-1)) * 2**e`` is exact in float32 (a small integer times a power of two), so the
reference implementation dequantizes exactly and every backend can be tested for equality.
Unpacking uses int32 arithmetic only (floor division and remainder by powers of two), which every
MLIR dialect and HLS accepts; uint8 shifts are not.

Optional activation quantization (``act_bits > 0``): each token (row of ``x``) is rounded to
``act_bits`` bits with its own power-of-two scale, the smallest that does not clip.
"""

from __future__ import annotations

import math

import torch

from rewriter.ops.contract import OpContract, SampleSource, register

__all__ = [
    "EXPONENT_RANGE",
    "ceil_log2",
    "dequantize",
    "pack",
    "packed_shape",
    "quantize_activations",
    "quantize_weight",
    "round_to_nearest",
    "shiftquant_linear",
    "shiftquant_linear_reference",
    "unpack",
]

EXPONENT_RANGE = (-126, 127)
"""Exponents are clamped to float32's normal range; smaller groups flush to zero."""


def qmax(bits: int) -> int:
    """Largest magnitude of a symmetric ``bits``-bit integer: ``2**(bits-1) - 1``."""
    return 2 ** (bits - 1) - 1


def ceil_log2(ratio: torch.Tensor) -> torch.Tensor:
    """The smallest integer ``e`` with ``2**e >= ratio`` (ratio > 0), exactly.

    ``ceil(log2(r))`` can be off by one where ``log2`` rounds across an integer; this rounds
    ``log2`` to the nearest integer and corrects with one exact comparison. Backends compute it
    the same way (ONNX has no ``Log2``: ``Log(r) / ln 2`` then the same correction).
    """
    nearest = torch.round(torch.log2(ratio))
    return nearest + (torch.exp2(nearest) < ratio).to(nearest.dtype)


def check_format(bits: int, group: int) -> None:
    if not 2 <= bits <= 8:
        raise ValueError(f"shiftquant: bits must be 2..8, got {bits}")
    if group < 8 or group & (group - 1):
        raise ValueError(f"shiftquant: group must be a power of two >= 8, got {group}")


def packed_shape(out_features: int, in_features: int, bits: int, group: int) -> tuple[int, ...]:
    """Shape of the packed weight: ``(N, ceil(K / group), group * bits / 8)``."""
    return (out_features, -(-in_features // group), group * bits // 8)


# --- packing --------------------------------------------------------------------------------------


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned ``bits``-bit codes ``[..., G]`` (G a multiple of 8) little-endian, as uint8."""
    values = codes.to(torch.int32)
    device = values.device
    if 8 % bits == 0:  # 2, 4, 8: whole codes per byte
        per = 8 // bits
        shifts = (2 ** (bits * torch.arange(per, dtype=torch.int32, device=device))).to(torch.int32)
        grouped = values.reshape(*values.shape[:-1], -1, per)
        return (grouped * shifts).sum(-1).to(torch.uint8)
    powers = 2 ** torch.arange(bits, dtype=torch.int32, device=device)
    bit_array = torch.div(values.unsqueeze(-1), powers, rounding_mode="floor") % 2
    bytes_ = bit_array.reshape(*values.shape[:-1], -1, 8)
    return (bytes_ * 2 ** torch.arange(8, dtype=torch.int32, device=device)).sum(-1).to(torch.uint8)


def _powers(values: list[int], device: torch.device) -> torch.Tensor:
    # Literal int32 constants, not ``2 ** arange``: integer ``pow`` has no lowering in MLIR's
    # linalg and TOSA dialects, and constants fold everywhere.
    return torch.tensor(values, dtype=torch.int32, device=device)


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes (int32) ``[..., G]`` from packed bytes ``[..., G * bits / 8]``, with int32
    floor division and remainder only (no uint8 shifts, which no MLIR dialect or HLS takes)."""
    values = packed.to(torch.int32)
    device = values.device
    if 8 % bits == 0:
        per = 8 // bits
        divisors = _powers([2 ** (bits * i) for i in range(per)], device)
        codes = torch.div(values.unsqueeze(-1), divisors, rounding_mode="floor") % (2**bits)
        return codes.reshape(*values.shape[:-1], -1)
    bit_array = (
        torch.div(
            values.unsqueeze(-1), _powers([2**i for i in range(8)], device), rounding_mode="floor"
        )
        % 2
    )
    per_code = bit_array.reshape(*values.shape[:-1], -1, bits)
    return (per_code * _powers([2**i for i in range(bits)], device)).sum(-1)


def dequantize(
    packed: torch.Tensor,
    exponents: torch.Tensor,
    bits: int,
    in_features: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The weight ``[N, K]`` the packed form stands for (exact in float32)."""
    codes = unpack(packed, bits) - 2 ** (bits - 1)  # [N, groups, group]
    scales = torch.exp2(exponents.to(torch.float32)).unsqueeze(-1)
    weight = (codes.to(torch.float32) * scales).reshape(packed.shape[0], -1)
    return weight[:, :in_features].to(dtype)


# --- quantizing -----------------------------------------------------------------------------------


def quantize_weight(
    weight: torch.Tensor,
    bits: int,
    group: int,
    *,
    search: int = 4,
    block_rows: int | None = None,
    stats: dict[str, float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ShiftQuant-style quantization of ``weight`` ``[N, K]``: ``(packed, exponents)``.

    For every group the scale ``2**e`` is chosen among ``e0, e0 - 1, ..., e0 - search`` where
    ``2**e0`` is the smallest power of two that does not clip the group's largest magnitude;
    smaller scales clip the outliers but resolve the rest more finely, and the one with the
    least squared error wins (ties go to the larger scale). Rows are processed in blocks
    (default: 2**20 elements, so a float64 temporary is 8 MB whatever the weight's size; rows are
    independent, so the block size does not change the result). ``stats``, when given, gets
    ``squared_error`` (``||W - W_q||^2``, from the search's own sums) and ``squared_norm``.
    """
    check_format(bits, group)
    if weight.dim() != 2:
        raise ValueError(f"shiftquant: weight must be 2-D, got shape {tuple(weight.shape)}")
    rows, cols = weight.shape
    groups = -(-cols // group)
    packed = torch.empty(packed_shape(rows, cols, bits, group), dtype=torch.uint8)
    exponents = torch.empty(rows, groups, dtype=torch.int8)
    top = qmax(bits)
    block_rows = block_rows or max(1, 2**20 // max(groups * group, 1))
    for start in range(0, rows, block_rows):
        block = weight[start : start + block_rows].detach().to(torch.float64)
        if cols % group:
            block = torch.nn.functional.pad(block, (0, groups * group - cols))
        grouped = block.reshape(block.shape[0], groups, group)
        amax = grouped.abs().amax(-1)
        zero = amax == 0
        e0 = ceil_log2(torch.where(zero, torch.ones_like(amax), amax) / top)
        # Only the best exponent is kept during the search; its codes are recomputed once.
        # Scales are powers of two, so multiplying by 2^-e is exact (the same as dividing).
        best_e = best_err = None
        for shift in range(search + 1):
            e = (e0 - shift).clamp(*EXPONENT_RANGE)
            q = (grouped * torch.exp2(-e).unsqueeze(-1)).round_().clamp_(-top, top)
            diff = q.mul_(torch.exp2(e).unsqueeze(-1)).sub_(grouped)
            err = diff.mul_(diff).sum(-1)
            if best_err is None:
                best_e, best_err = e, err
            else:
                better = err < best_err
                best_e = torch.where(better, e, best_e)
                best_err = torch.where(better, err, best_err)
        assert best_e is not None and best_err is not None
        if stats is not None:
            stats["squared_error"] = stats.get("squared_error", 0.0) + float(best_err.sum())
            stats["squared_norm"] = stats.get("squared_norm", 0.0) + float(grouped.pow(2).sum())
        best_e = torch.where(zero, torch.zeros_like(best_e), best_e)
        best_q = torch.clamp(torch.round(grouped * torch.exp2(-best_e).unsqueeze(-1)), -top, top)
        codes = (best_q + 2 ** (bits - 1)).to(torch.int32)
        packed[start : start + block_rows] = pack(codes, bits)
        exponents[start : start + block_rows] = best_e.to(torch.int8)
    return packed, exponents


def round_to_nearest(weight: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """The float-scale baseline: symmetric absmax round-to-nearest per group, dequantized.

    Each group's scale is ``max|w| / (2**(bits-1) - 1)`` in floating point: what a quantizer
    without the power-of-two constraint (and without a scale search) does. For comparisons.
    """
    check_format(bits, group)
    rows, cols = weight.shape
    groups = -(-cols // group)
    w = torch.nn.functional.pad(weight.detach().double(), (0, groups * group - cols))
    w = w.reshape(rows, groups, group)
    scale = (w.abs().amax(-1, keepdim=True) / qmax(bits)).clamp_min(1e-300)
    q = torch.clamp(torch.round(w / scale), -qmax(bits), qmax(bits))
    return (q * scale).reshape(rows, -1)[:, :cols].to(weight.dtype)


def quantize_activations(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Round each row of ``x`` to ``bits`` bits with a power-of-two scale (no clipping)."""
    top = qmax(bits)
    xs = x.float()
    amax = xs.abs().amax(-1, keepdim=True)
    safe = torch.where(amax > 0, amax, torch.ones_like(amax))
    exponent = ceil_log2(safe / top).clamp(*EXPONENT_RANGE)
    scale = torch.exp2(exponent)
    return (torch.clamp(torch.round(xs / scale), -top, top) * scale).to(x.dtype)


# --- the op ---------------------------------------------------------------------------------------


def shiftquant_linear_reference(
    x: torch.Tensor,
    packed: torch.Tensor,
    exponents: torch.Tensor,
    bias: torch.Tensor | None,
    bits: int,
    group: int,
    in_features: int,
    act_bits: int,
) -> torch.Tensor:
    """Plain-torch semantics: dequantize exactly, then ``x W^T + b`` (also the decomposition)."""
    weight = dequantize(packed, exponents, bits, in_features, x.dtype)
    if act_bits:
        x = quantize_activations(x, act_bits)
    return torch.nn.functional.linear(x, weight, bias)


@torch.library.custom_op("rewriter::shiftquant_linear", mutates_args=())
def shiftquant_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    exponents: torch.Tensor,
    bias: torch.Tensor | None,
    bits: int,
    group: int,
    in_features: int,
    act_bits: int,
) -> torch.Tensor:
    """``x W^T + b`` with ``W`` stored as packed ``bits``-bit integers and power-of-two scales."""
    return shiftquant_linear_reference(
        x, packed, exponents, bias, bits, group, in_features, act_bits
    )


@shiftquant_linear.register_fake
def _shiftquant_linear_fake(
    x: torch.Tensor,
    packed: torch.Tensor,
    exponents: torch.Tensor,
    bias: torch.Tensor | None,
    bits: int,
    group: int,
    in_features: int,
    act_bits: int,
) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], packed.shape[0]))


def _setup(ctx: object, inputs: tuple, output: torch.Tensor) -> None:
    x, packed, exponents, bias, bits, _group, in_features, _act_bits = inputs
    ctx.save_for_backward(packed, exponents)  # type: ignore[attr-defined]
    ctx.settings = (bits, in_features, bias is not None, x.dtype)  # type: ignore[attr-defined]


def _backward(ctx: object, grad: torch.Tensor) -> tuple:
    # The weights are integers (not trainable); x gets W^T grad, straight through the
    # activation rounding (the straight-through estimator), so adapters and norms around a
    # quantized linear can be trained.
    packed, exponents = ctx.saved_tensors  # type: ignore[attr-defined]
    bits, in_features, has_bias, dtype = ctx.settings  # type: ignore[attr-defined]
    weight = dequantize(packed, exponents, bits, in_features, grad.dtype)
    grad_x = (grad @ weight).to(dtype)
    grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if has_bias else None
    return grad_x, None, None, grad_bias, None, None, None, None


shiftquant_linear.register_autograd(_backward, setup_context=_setup)


def _shiftquant_samples(s: SampleSource) -> list[tuple]:
    cases = []
    for bits, group, act in ((4, 32, 0), (3, 16, 0), (8, 32, 8), (2, 16, 0)):
        weight = torch.randn(10 * s.size + 3, s.width, generator=s.generator)
        packed, exponents = quantize_weight(weight, bits, group)
        bias = s.rand(weight.shape[0]) if bits != 3 else None
        x = s.rand(2, 5, s.width)
        cases.append(
            (x, packed.to(s.device), exponents.to(s.device), bias, bits, group, s.width, act)
        )
    return cases


register(
    OpContract(
        name="shiftquant_linear",
        overload=torch.ops.rewriter.shiftquant_linear.default,
        reference=shiftquant_linear_reference,
        decomposition=shiftquant_linear_reference,
        summary="linear map with packed b-bit weights and power-of-two group scales",
        samples=_shiftquant_samples,
    )
)


def storage_bytes(out_features: int, in_features: int, bits: int, group: int) -> int:
    """Bytes of the packed weight plus its exponents."""
    shape = packed_shape(out_features, in_features, bits, group)
    return math.prod(shape) + shape[0] * shape[1]
