"""Every Triton kernel against its op's reference, hypothesis over shapes (widths that are not
a multiple of the block included), tiny sizes: the interpreter runs each program in numpy."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rewriter import ops, verify
from rewriter.ops import attention as A
from rewriter.ops import quant as Q
from rewriter.testing import op_samples

FAST = settings(max_examples=12, deadline=None)


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    """The project's tolerance rule (``verify.tolerance``): each kernel claims its reference's
    values up to float rounding; a half-precision result gets the rule of its own dtype."""
    assert got.shape == want.shape, (got.shape, want.shape)
    if not want.is_floating_point():  # masks and counts: equal, or wrong
        assert torch.equal(got.cpu(), want.cpu())
        return
    rule = want.to(got.dtype) if got.element_size() < want.element_size() else want
    limit = verify.tolerance(rule.detach().cpu())
    error = float((got.double().cpu() - want.double().cpu()).abs().max()) if got.numel() else 0.0
    assert error <= limit, f"max abs error {error:.3g} > {limit:.3g} allowed (dtype {got.dtype})"


@FAST
@given(
    rows=st.integers(1, 5),
    width=st.integers(1, 300),
    block=st.sampled_from([None, 16, 64]),
    affine=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_norm_kernels_match_their_references(rows, width, block, affine, seed) -> None:
    from rewriter.kernels.triton import crms_norm, l1_norm, rms_norm

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, width, generator=g) * 3 + 1
    w = torch.randn(width, generator=g) if affine else None
    b = torch.randn(width, generator=g) if affine else None
    want = torch.nn.functional.rms_norm(x, (width,), w, 1e-5) + (b if b is not None else 0)
    _close(rms_norm.rms_norm(x, w, b, 1e-5, block=block), want)
    _close(crms_norm.crms_norm(x, 1e-5, block=block), ops.OPS["crms_norm"].reference(x, 1e-5))
    for centered in (True, False):
        reference = ops.OPS["l1_norm"].reference(x, w, b, 1e-5, centered, 1.25)
        _close(l1_norm.l1_norm(x, w, b, 1e-5, centered, 1.25, block=block), reference)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_norm_kernels_accumulate_half_inputs_in_float32(dtype) -> None:
    from rewriter.kernels.triton import crms_norm, l1_norm

    x = (torch.randn(3, 77) * 20).to(dtype)
    got = crms_norm.crms_norm(x, 1e-5)
    assert got.dtype == dtype
    _close(got, ops.OPS["crms_norm"].reference(x, 1e-5))
    _close(
        l1_norm.l1_norm(x, None, None, 1e-5, True, 1.0),
        ops.OPS["l1_norm"].reference(x, None, None, 1e-5, True, 1.0),
    )


@FAST
@given(
    bits=st.sampled_from([2, 3, 4, 5, 6, 7, 8]),
    group=st.sampled_from([16, 32, 64]),
    m=st.integers(1, 20),
    n=st.integers(1, 40),
    k=st.integers(1, 100),
    bias=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_shiftquant_kernel_equals_the_exact_dequantized_matmul(
    bits, group, m, n, k, bias, seed
) -> None:
    from rewriter.kernels.triton import shiftquant_linear

    g = torch.Generator().manual_seed(seed)
    packed, exponents = Q.quantize_weight(torch.randn(n, k, generator=g), bits, group)
    x = torch.randn(m, k, generator=g)
    b = torch.randn(n, generator=g) if bias else None
    want = Q.shiftquant_linear_reference(x, packed, exponents, b, bits, group, k, 0)
    got = shiftquant_linear.shiftquant_linear(x, packed, exponents, b, bits, group, k)
    _close(got, want)


def test_shiftquant_kernel_takes_every_sample_of_the_op() -> None:
    from rewriter.backends import triton as backend

    for args in op_samples("shiftquant_linear"):
        want = ops.OPS["shiftquant_linear"].reference(*args)
        _close(backend.shiftquant_linear(*args), want)  # act_bits quantized first


@FAST
@given(
    batch=st.integers(1, 2),
    heads=st.integers(1, 2),
    length=st.integers(1, 50),
    features=st.integers(1, 20),
    width=st.integers(1, 40),
    mask=st.booleans(),
    decay=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_chunked_linear_attention_and_its_state(
    batch, heads, length, features, width, mask, decay, seed
) -> None:
    from rewriter.kernels.triton import linear_attention

    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, length, 4, generator=g)
    v = torch.randn(batch, heads, length, width, generator=g)
    pq, pk = (torch.rand(batch, heads, length, features, generator=g) for _ in range(2))
    key_mask = torch.rand(batch, length, generator=g) > 0.3 if mask else None
    gamma = torch.rand(heads, generator=g) * 0.4 + 0.6 if decay else None
    want = A.linear_attention_quadratic(q, q, v, pq, pk, key_mask, gamma, None, True, 0, 0.5, 1e-6)
    out, state, z = linear_attention.linear_attention_chunked(
        pq, pk, v, key_mask, gamma, 1e-6, return_state=True
    )
    _close(out, want)
    S, Z = A.linear_attention_state_reference(q, v, pk, key_mask, gamma, 0)
    _close(state, S)
    _close(z, Z)


def test_fused_decode_step_continues_the_chunked_state() -> None:
    from rewriter.kernels.triton import linear_attention

    g = torch.Generator().manual_seed(0)
    batch, heads, length, features, width = 2, 3, 19, 10, 12
    v = torch.randn(batch, heads, length, width, generator=g)
    pk = torch.rand(batch, heads, length, features, generator=g)
    gamma = torch.tensor([1.0, 0.9, 0.7])
    _, state, z = linear_attention.linear_attention_chunked(
        pk, pk, v, None, gamma, 1e-6, write_output=False, return_state=True
    )
    for step in range(3):  # three decoding steps against the reference step
        fq, fk = (
            torch.rand(batch, heads, features, generator=g),
            torch.rand(batch, heads, features, generator=g),
        )
        value = torch.randn(batch, heads, width, generator=g)
        valid = torch.tensor([True, step != 1])
        q = torch.zeros(batch, heads, 1, 4)
        want = A.linear_attention_decode_reference(
            q,
            q,
            value[:, :, None],
            fq[:, :, None],
            fk[:, :, None],
            valid,
            gamma,
            None,
            [state, z],
            0,
            0.5,
            1e-6,
        )
        out, state, z = linear_attention.linear_attention_decode(
            state, z, fq, fk, value, valid, gamma, 1e-6
        )
        _close(out, want[0][:, :, 0])
        _close(state, want[1])
        _close(z, want[2])


@pytest.mark.parametrize(
    "name",
    sorted(
        [
            "crms_norm",
            "l1_norm",
            "linear_attention",
            "linear_attention_state",
            "linear_attention_decode",
        ]
    ),
)
def test_backend_dispatch_equals_the_reference_on_every_sample(name) -> None:
    # the dispatch functions the backend attaches: kernels where they apply, the reference for
    # the rest (a window, non-causal attention), the same values either way
    from rewriter.backends import triton as backend

    for args in op_samples(name):
        got, want = backend.KERNELS[name](*args), ops.OPS[name].reference(*args)
        for a, b in zip(*(r if isinstance(r, list) else [r] for r in (got, want))):
            _close(a, b)
