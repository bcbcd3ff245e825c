"""rewriter::shiftquant_linear and rewriter::l1_norm: semantics, format, autograd, ONNX."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import rewriter
from rewriter import ops
from rewriter.ops import quant

shiftquant = torch.ops.rewriter.shiftquant_linear.default
l1_norm = torch.ops.rewriter.l1_norm.default
BITS = st.integers(2, 8)
GROUPS = st.sampled_from([8, 16, 32, 64])


@given(
    bits=BITS,
    rows=st.integers(1, 4),
    groups=st.integers(1, 3),
    group=GROUPS,
    seed=st.integers(0, 99),
)
def test_pack_unpack_round_trip(bits: int, rows: int, groups: int, group: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (rows, groups, group), generator=generator, dtype=torch.int32)
    packed = quant.pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (rows, groups, group * bits // 8)
    assert torch.equal(quant.unpack(packed, bits), codes)


def test_packing_matches_matmulnbits_layout() -> None:
    # ORT's MatMulNBits: low bits first along K (element 2i in the low nibble at 4 bits).
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]], dtype=torch.int32)
    assert quant.pack(codes, 4).tolist() == [[0x21, 0x43, 0x65, 0x87]]
    assert quant.pack(torch.tensor([[1, 2, 3, 0, 3, 3, 3, 3]]), 2).tolist() == [[0b00111001, 0xFF]]
    # 3 bits: code 7 (the last) occupies bits 21..23, so its 1 lands on bit 5 of byte 2.
    assert quant.pack(torch.tensor([[7, 0, 0, 0, 0, 0, 0, 1]]), 3).tolist() == [[7, 0, 0b00100000]]


@settings(max_examples=60)
@given(
    bits=BITS,
    rows=st.integers(1, 5),
    cols=st.integers(1, 150),
    group=GROUPS,
    scale=st.sampled_from([1e-4, 1.0, 300.0]),
    seed=st.integers(0, 999),
)
def test_quantized_weights_are_integers_times_powers_of_two(
    bits: int, rows: int, cols: int, group: int, scale: float, seed: int
) -> None:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=generator) * scale
    packed, exponents = quant.quantize_weight(weight, bits, group)
    groups = -(-cols // group)
    assert packed.shape == (rows, groups, group * bits // 8) and exponents.shape == (rows, groups)
    codes = quant.unpack(packed, bits) - 2 ** (bits - 1)
    assert codes.abs().max() <= quant.qmax(bits)  # symmetric: -2^(b-1) never used
    deq = quant.dequantize(packed, exponents, bits, cols, torch.float64)
    assert deq.shape == (rows, cols)
    # Exact: every value is an integer times its group's power of two.
    scales = torch.exp2(exponents.double()).repeat_interleave(group, 1)[:, :cols]
    ratio = deq / scales
    assert torch.equal(ratio, ratio.round())
    # K padded with zeros: the padding codes stand for 0.
    tail = codes.reshape(rows, -1)[:, cols:]
    assert torch.equal(tail, torch.zeros_like(tail))
    # The chosen power of two is at least as good as the smallest one that never clips.
    padded = torch.nn.functional.pad(weight.double(), (0, groups * group - cols)).reshape(
        rows, groups, group
    )
    no_clip = quant.ceil_log2(padded.abs().amax(-1).clamp_min(1e-300) / quant.qmax(bits))
    step = torch.exp2(no_clip).unsqueeze(-1)
    plain = torch.clamp(torch.round(padded / step), -quant.qmax(bits), quant.qmax(bits)) * step
    ours = torch.nn.functional.pad(deq, (0, groups * group - cols)).reshape(rows, groups, group)
    assert ((ours - padded).pow(2).sum(-1) <= (plain - padded).pow(2).sum(-1) * (1 + 1e-12)).all()


@pytest.mark.parametrize(
    ("bits", "search", "winners"),
    [(2, 1, 2), (4, 1, 2), (8, 1, 2), (2, 2, 3), (3, 4, 2), (4, 4, 2)],
)
def test_the_scale_search_keeps_the_least_error_exponent(bits: int, search: int, winners: int):
    # Brute force over e0, e0-1, ..., e0-search: the chosen exponent has the least squared error
    # (ties to the larger scale). On heavy-tailed groups the first `winners` candidates each win
    # somewhere (deeper shifts clip too much to win here), so a search that stops one candidate
    # short, or compares the wrong way, is caught.
    generator = torch.Generator().manual_seed(bits)
    shape = (48, 256)
    weight = torch.randn(shape, generator=generator) * torch.exp(
        2.0 * torch.randn(shape, generator=generator)
    )
    group = 32
    _, exponents = quant.quantize_weight(weight, bits, group, search=search)
    groups = weight.double().reshape(shape[0], -1, group)
    top = quant.qmax(bits)
    e0 = quant.ceil_log2(groups.abs().amax(-1) / top)
    errors = []
    for shift in range(search + 1):
        scale = torch.exp2(e0 - shift).unsqueeze(-1)
        q = torch.clamp(torch.round(groups / scale), -top, top) * scale
        errors.append((q - groups).pow(2).sum(-1))
    best = torch.stack(errors).argmin(0)  # the first minimum: ties go to the larger scale
    assert set(best.unique().tolist()) == set(range(winners))
    assert torch.equal(exponents.long(), (e0 - best).long())


def test_all_zero_groups_and_a_huge_outlier() -> None:
    weight = torch.zeros(2, 64)
    weight[1, 32:] = torch.linspace(-0.01, 0.01, 32)
    weight[1, 40] = 1000.0  # one outlier in the second group of row 1
    packed, exponents = quant.quantize_weight(weight, 4, 32)
    deq = quant.dequantize(packed, exponents, 4, 64)
    assert torch.equal(deq[0], torch.zeros(64)) and exponents[0].tolist() == [0, 0]
    assert torch.equal(deq[1, :32], torch.zeros(32))
    assert deq[1, 40] == 1024.0  # 7 levels of 2^e can hold the outlier: clipping would cost more
    assert (deq[1, 32:40] == 0).all()


@given(st.floats(1e-30, 1e30), st.sampled_from([-1, 0, 1]))
def test_ceil_log2_is_exact(value: float, nudge: int) -> None:
    ratio = torch.tensor(value, dtype=torch.float32)
    if nudge:  # neighbours of exact powers of two are where log2 rounding goes wrong
        ratio = torch.nextafter(
            torch.exp2(torch.round(torch.log2(ratio))), torch.tensor(nudge * math.inf)
        )
    e = int(quant.ceil_log2(ratio))
    assert 2.0**e >= float(ratio) > 2.0 ** (e - 1)


def test_ceil_log2_of_exact_powers_of_two_is_their_exponent() -> None:
    # the draws above almost never hit a power of two exactly, where `<` vs `<=` decides
    exponents = torch.arange(-126, 128, dtype=torch.float32)
    assert torch.equal(quant.ceil_log2(torch.exp2(exponents)), exponents)


@given(bits=BITS, rows=st.integers(1, 4), width=st.integers(1, 40), seed=st.integers(0, 99))
def test_activation_rounding_is_per_token_power_of_two_without_clipping(
    bits: int, rows: int, width: int, seed: int
) -> None:
    x = torch.randn(rows, width, generator=torch.Generator().manual_seed(seed)) * 5
    x[0] = 0.0
    got = quant.quantize_activations(x, bits)
    assert torch.equal(got[0], torch.zeros(width))
    for row, original in zip(got[1:], x[1:]):
        e = int(quant.ceil_log2(original.abs().max() / quant.qmax(bits)))
        assert torch.equal(row / 2.0**e, (row / 2.0**e).round())
        assert (row - original).abs().max() <= 2.0 ** (e - 1) * (1 + 1e-6)  # round, never clip


@settings(max_examples=30)
@given(
    bits=BITS,
    rows=st.integers(1, 3),
    cols=st.integers(1, 70),
    out=st.integers(1, 9),
    bias=st.booleans(),
    act_bits=st.sampled_from([0, 4, 8]),
    seed=st.integers(0, 99),
)
def test_op_is_linear_with_the_dequantized_weight(
    bits: int, rows: int, cols: int, out: int, bias: bool, act_bits: int, seed: int
) -> None:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out, cols, generator=generator)
    packed, exponents = quant.quantize_weight(weight, bits, 16)
    b = torch.randn(out, generator=generator) if bias else None
    x = torch.randn(rows, 3, cols, generator=generator)
    got = shiftquant(x, packed, exponents, b, bits, 16, cols, act_bits)
    xq = quant.quantize_activations(x, act_bits) if act_bits else x
    want = torch.nn.functional.linear(xq, quant.dequantize(packed, exponents, bits, cols), b)
    assert torch.equal(got, want)


def test_op_contracts_opcheck_and_gradcheck() -> None:
    weight = torch.randn(5, 40, dtype=torch.float64)
    packed, exponents = quant.quantize_weight(weight, 4, 16)
    x = torch.randn(2, 3, 40, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(5, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(shiftquant, (x.detach().float(), packed, exponents, None, 4, 16, 40, 0))
    assert torch.autograd.gradcheck(
        lambda x, b: shiftquant(x, packed, exponents, b, 4, 16, 40, 0), (x, bias)
    )
    # Straight-through: with activation rounding the gradient is that of the unrounded map.
    x.grad = None
    shiftquant(x, packed, exponents, None, 4, 16, 40, 4).sum().backward()
    assert torch.equal(
        x.grad, quant.dequantize(packed, exponents, 4, 40, torch.float64).sum(0).expand(2, 3, 40)
    )
    h = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    gamma = torch.randn(9, dtype=torch.float64, requires_grad=True)
    beta = torch.randn(9, dtype=torch.float64, requires_grad=True)
    for centered in (True, False):
        torch.library.opcheck(
            l1_norm, (h.detach().float(), gamma.detach().float(), None, 1e-3, centered, 1.25)
        )
        assert torch.autograd.gradcheck(
            lambda h, g, b, centered=centered: l1_norm(h, g, b, 1e-3, centered, 1.25),
            (h, gamma, beta),
        )
    assert set(ops.OPS) >= {"crms_norm", "l1_norm", "shiftquant_linear"}


@given(
    rows=st.integers(1, 4),
    width=st.integers(2, 64),
    centered=st.booleans(),
    seed=st.integers(0, 99),
)
def test_l1_norm_semantics(rows: int, width: int, centered: bool, seed: int) -> None:
    x = (
        torch.randn(rows, width, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        * 3
        + 1
    )
    y = l1_norm(x, None, None, 0.0, centered, ops.GAUSSIAN_FACTOR)
    d = x - x.mean(-1, keepdim=True) if centered else x
    torch.testing.assert_close(y, d / (ops.GAUSSIAN_FACTOR * d.abs().mean(-1, keepdim=True)))
    torch.testing.assert_close(
        l1_norm(7.5 * x, None, None, 0.0, centered, 1.0), l1_norm(x, None, None, 0.0, centered, 1.0)
    )
    if centered:
        assert y.mean(-1).abs().max() < 1e-12
    # c * mean|d| estimates the standard deviation of Gaussian rows.
    big = (
        torch.randn(20000, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) * 2.0
    )
    assert ops.GAUSSIAN_FACTOR * big.abs().mean() == pytest.approx(2.0, rel=0.03)


class _QuantBlock(torch.nn.Module):
    def __init__(self, bits: int, act_bits: int) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(bits)
        packed, exponents = quant.quantize_weight(
            torch.randn(24, 100, generator=generator), bits, 32
        )
        self.register_buffer("packed", packed)
        self.register_buffer("exponents", exponents)
        self.bias = torch.nn.Parameter(torch.randn(24, generator=generator))
        self.gamma = torch.nn.Parameter(torch.rand(100, generator=generator) + 0.5)
        self.settings = (bits, act_bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bits, act_bits = self.settings
        h = l1_norm(x, self.gamma, None, 1e-3, bits % 2 == 0, 1.2533)
        return shiftquant(h, self.packed, self.exponents, self.bias, bits, 32, 100, act_bits)


@pytest.mark.parametrize("bits", range(2, 9))
def test_onnx_runtime_computes_the_op_exactly(bits: int, tmp_path) -> None:
    onnx = pytest.importorskip("onnx")
    from rewriter.backends import onnx as backend

    gm = rewriter.trace(
        _QuantBlock(bits, 4 if bits == 5 else 0), (torch.randn(2, 5, 100),), dynamic_shapes="auto"
    )
    exported = backend.export(gm, None, tmp_path / "q.onnx")
    kinds = {n.op_type for n in onnx.load(str(exported.path)).graph.node}
    native = bits in backend.nbits_native()
    assert ("MatMulNBits" in kinds) == native and ("DequantizeLinear" in kinds) != native
    sess = backend.session(exported.path, accuracy_level=0)
    report = backend.check(gm, exported.path, (torch.randn(3, 7, 100) * 4,), sess=sess)
    assert report.ok, report
