"""rewriter::linear_attention: the quadratic, chunked and recurrent forms agree; long inputs;
autograd; the decoding step."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rewriter.ops.attention_decode import (
    LinearAttentionState,
    linear_attention_recurrent,
    linear_attention_step,
    state_size,
)
from rewriter.ops.attention_forms import linear_attention_chunked, linear_attention_quadratic

op = torch.ops.rewriter.linear_attention.default


def _inputs(batch, heads, length, dim, features, seed, *, mask, decay, window, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(batch, heads, length, dim, generator=g, dtype=dtype) for _ in range(2))
    v = torch.randn(batch, heads, length, dim + 1, generator=g, dtype=dtype)
    phi_q, phi_k = (
        torch.rand(batch, heads, length, features, generator=g, dtype=dtype) for _ in range(2)
    )
    key_mask = torch.rand(batch, length, generator=g) > 0.3 if mask else None
    gamma = torch.rand(heads, generator=g, dtype=dtype) * 0.5 + 0.5 if decay else None
    gate = torch.rand(heads, generator=g, dtype=dtype) if window else None
    return q, k, v, phi_q, phi_k, key_mask, gamma, gate


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 2),
    heads=st.integers(1, 3),
    length=st.integers(1, 80),
    dim=st.integers(1, 6),
    features=st.integers(1, 7),
    causal=st.booleans(),
    window=st.sampled_from([0, 1, 5, 17]),
    decay=st.booleans(),
    mask=st.booleans(),
    chunk=st.sampled_from([4, 16, 64]),
    seed=st.integers(0, 999),
)
def test_three_forms_agree(
    batch, heads, length, dim, features, causal, window, decay, mask, chunk, seed
):
    window = window if causal else 0
    decay = decay and causal
    args = (
        *_inputs(batch, heads, length, dim, features, seed, mask=mask, decay=decay, window=window),
        causal,
        window,
        0.7,
        1e-6,
    )
    reference = linear_attention_quadratic(*args)
    chunked = linear_attention_chunked(*args, chunk=chunk)
    torch.testing.assert_close(chunked, reference, rtol=1e-9, atol=1e-10)
    if causal:
        torch.testing.assert_close(
            linear_attention_recurrent(*args), reference, rtol=1e-9, atol=1e-10
        )
    torch.testing.assert_close(op(*args), reference, rtol=1e-9, atol=1e-10)


def test_without_window_or_decay_it_is_normalized_kernel_attention() -> None:
    q, k, v, phi_q, phi_k, *_ = _inputs(1, 2, 9, 3, 4, 0, mask=False, decay=False, window=0)
    weights = (phi_q @ phi_k.transpose(-1, -2)).tril()
    want = weights @ v / (weights.sum(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(
        op(q, k, v, phi_q, phi_k, None, None, None, True, 0, 1.0, 1e-6), want
    )


def test_a_window_covering_everything_with_unit_gate_is_softmax_attention() -> None:
    q, k, v, phi_q, phi_k, *_ = _inputs(2, 2, 12, 4, 3, 1, mask=False, decay=False, window=0)
    got = op(q, k, v, phi_q, phi_k, None, None, None, True, 12, 0.5, 0.0)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.5)
    torch.testing.assert_close(got, want)


def test_long_sequences_stay_finite_in_float32() -> None:
    g = torch.Generator().manual_seed(0)
    length = 8192
    q, k, v = (torch.randn(1, 2, length, 16, generator=g) * 3 for _ in range(3))
    phi_q, phi_k = (torch.nn.functional.elu(t) + 1 for t in (q, k))
    decay = torch.tensor([1.0, 0.999])
    out = op(q, k, v, phi_q, phi_k, None, decay, torch.tensor([0.1, 0.5]), True, 64, 0.25, 1e-6)
    assert torch.isfinite(out).all()
    head = slice(0, 1)
    tail = linear_attention_quadratic(
        q[:, head, -300:],
        k[:, head, -300:],
        v[:, head, -300:],
        phi_q[:, head, -300:],
        phi_k[:, head, -300:],
        None,
        None,
        None,
        True,
        0,
        0.25,
        1e-6,
    )
    assert torch.isfinite(tail).all()


def test_gradcheck_through_every_differentiable_input() -> None:
    args = list(_inputs(1, 2, 7, 3, 4, 3, mask=True, decay=True, window=3))
    for i in (0, 1, 2, 3, 4, 6, 7):
        args[i] = args[i].requires_grad_()

    def f(q, k, v, phi_q, phi_k, gamma, gate):
        return op(q, k, v, phi_q, phi_k, args[5], gamma, gate, True, 3, 0.5, 1e-6)

    assert torch.autograd.gradcheck(f, tuple(args[i] for i in (0, 1, 2, 3, 4, 6, 7)))
    torch.library.opcheck(
        op,
        (*(a.detach() if isinstance(a, torch.Tensor) else a for a in args), True, 3, 0.5, 1e-6),
    )


def test_decoding_state_has_a_fixed_size() -> None:
    q, k, v, phi_q, phi_k, *_ = _inputs(1, 2, 40, 3, 4, 5, mask=False, decay=False, window=0)
    state = LinearAttentionState.empty(1, 2, 3, 4, 4, window=8, dtype=torch.float64)
    sizes = set()
    outputs = []
    for t in range(40):
        y, state = linear_attention_step(
            state,
            q[:, :, t],
            k[:, :, t],
            v[:, :, t],
            phi_q[:, :, t],
            phi_k[:, :, t],
            None,
            None,
            None,
            8,
            0.5,
            1e-6,
        )
        outputs.append(y)
        sizes.add(
            sum(t.numel() for t in (state.S, state.z, state.keys, state.values, state.features))
        )
    assert len(sizes) == 1
    reference = linear_attention_quadratic(
        q, k, v, phi_q, phi_k, None, None, None, True, 8, 0.5, 1e-6
    )
    torch.testing.assert_close(torch.stack(outputs, 2), reference)


def test_recurrent_form_refuses_non_causal() -> None:
    args = _inputs(1, 1, 3, 2, 2, 0, mask=False, decay=False, window=0)
    with pytest.raises(ValueError, match="causal"):
        linear_attention_recurrent(*args, False, 0, 1.0, 1e-6)


@settings(max_examples=30, deadline=None)
@given(
    batch=st.integers(1, 2),
    heads=st.integers(1, 3),
    prefix=st.integers(1, 20),
    steps=st.integers(1, 4),
    dim=st.integers(1, 5),
    features=st.integers(1, 6),
    window=st.sampled_from([0, 1, 3, 9]),
    decay=st.booleans(),
    mask=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_prefix_state_then_decode_steps_equal_the_full_attention(
    batch, heads, prefix, steps, dim, features, window, decay, mask, seed
) -> None:
    # rewriter::linear_attention_state over a prefix, then rewriter::linear_attention_decode one
    # token at a time: every output equals the quadratic reference's row for that token
    length = prefix + steps
    q, k, v, pq, pk, key_mask, gamma, gate = _inputs(
        batch, heads, length, dim, features, seed, mask=mask, decay=decay, window=window
    )
    want = linear_attention_quadratic(
        q, k, v, pq, pk, key_mask, gamma, gate, True, window, 0.4, 1e-6
    )
    P = prefix
    state = torch.ops.rewriter.linear_attention_state(
        k[:, :, :P],
        v[:, :, :P],
        pk[:, :, :P],
        None if key_mask is None else key_mask[:, :P],
        gamma,
        window,
    )
    assert len(state) == state_size(window)
    shapes = [s.shape for s in state]
    for t in range(P, length):
        now = slice(t, t + 1)
        out, *state = torch.ops.rewriter.linear_attention_decode(
            q[:, :, now],
            k[:, :, now],
            v[:, :, now],
            pq[:, :, now],
            pk[:, :, now],
            None if key_mask is None else key_mask[:, t],
            gamma,
            gate,
            state,
            window,
            0.4,
            1e-6,
        )
        torch.testing.assert_close(out, want[:, :, now], rtol=1e-9, atol=1e-9)
        assert [s.shape for s in state] == shapes  # the state does not grow


def test_deploy_ops_have_gradients_and_decompose() -> None:
    from rewriter import ops

    q, k, v, pq, pk, key_mask, gamma, gate = _inputs(
        1, 2, 6, 3, 4, 0, mask=True, decay=True, window=2
    )

    def run(k_, pk_, gate_):
        state = torch.ops.rewriter.linear_attention_state(
            k_[:, :, :5], v[:, :, :5], pk_[:, :, :5], key_mask[:, :5], gamma, 2
        )
        last = slice(5, 6)
        return torch.ops.rewriter.linear_attention_decode(
            q[:, :, last],
            k_[:, :, last],
            v[:, :, last],
            pq[:, :, last],
            pk_[:, :, last],
            key_mask[:, 5],
            gamma,
            gate_,
            state,
            2,
            0.5,
            1e-6,
        )[0]

    leaves = [t.clone().requires_grad_() for t in (k, pk, gate)]
    assert torch.autograd.gradcheck(run, leaves)
    # the ATen decompositions backends use (list inputs and outputs inlined) give the same values
    import rewriter

    class Step(torch.nn.Module):
        def forward(self, k_, pk_):
            return run(k_, pk_, gate)

    gm = rewriter.trace(Step(), (k, pk))
    want = gm(k, pk)
    ops.decompose(gm)
    assert not ops.rewriter_nodes(gm)
    torch.testing.assert_close(gm(k, pk), want, rtol=1e-12, atol=1e-12)
