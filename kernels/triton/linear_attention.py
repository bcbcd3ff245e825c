"""Causal linear attention (``rewriter::linear_attention`` without a softmax window): a chunked
forward and a fused recurrent decoding step, float32 state, with the normalizer.

With feature maps applied (``phi_q``, ``phi_k``: ``[B, H, T, F]``), values ``[B, H, T, D]``, an
optional per-key mask and per-head decay ``gamma``:

    a_ti = gamma^(t-i) (phi_q_t . phi_k_i) m_i   (i <= t)
    y_t = sum_i a_ti v_i / (sum_i a_ti + eps)

**Chunked forward** (:func:`linear_attention_chunked`): one program per (batch, head, slice of
``D``) walks the sequence in chunks of ``C`` tokens, keeping the state ``S`` (``F x D`` slice)
and normalizer ``z`` (``F``) in registers: within a chunk the masked, decayed ``C x C`` product
``phi_q phi_k^T`` times the chunk's values, plus the queries against the state carried in; then
the chunk's keys are folded into the state. O(T) time and memory, ``tl.dot``-shaped work. It can
also return the final state (``rewriter::linear_attention_state`` without a window).

**Decoding step** (:func:`linear_attention_decode`): one program per (batch, head, slice of
``D``): ``S <- gamma S + phi_k v^T``, ``z <- gamma z + phi_k``, ``y = phi_q S / (phi_q z + eps)``
in one pass over the state.

A softmax window (LoLCATs' hybrid) is not in these kernels: the backend runs the op's reference
for it and says so.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import configs, interpreting, next_power_of_2

_CHUNK_CONFIGS = configs(
    [
        {"C": 32, "BD": 32, "num_warps": 4, "num_stages": 2},
        {"C": 64, "BD": 32, "num_warps": 4, "num_stages": 2},
        {"C": 64, "BD": 64, "num_warps": 4, "num_stages": 2},
        {"C": 64, "BD": 64, "num_warps": 8, "num_stages": 2},
        {"C": 128, "BD": 64, "num_warps": 8, "num_stages": 2},
    ],
    {"C": 16, "BD": 32},
)


@triton.autotune(configs=_CHUNK_CONFIGS, key=["T", "F", "D", "HAS_MASK", "HAS_DECAY"])
@triton.jit
def _chunked_kernel(
    FQ,
    FK,
    V,
    MASK,
    DECAY,
    OUT,
    S_OUT,
    Z_OUT,
    heads,
    T,
    F,
    D,
    eps,
    HAS_MASK: tl.constexpr,
    HAS_DECAY: tl.constexpr,
    WRITE_OUT: tl.constexpr,
    WRITE_STATE: tl.constexpr,
    C: tl.constexpr,
    BF: tl.constexpr,
    BD: tl.constexpr,
):
    bh = tl.program_id(0)
    pid_d = tl.program_id(1)
    b = bh // heads
    h = bh % heads
    rf = tl.arange(0, BF)
    rd = pid_d * BD + tl.arange(0, BD)
    f_ok = rf < F
    d_ok = rd < D
    i = tl.arange(0, C)
    causal = i[:, None] >= i[None, :]
    log_gamma = 0.0
    if HAS_DECAY:
        log_gamma = tl.log(tl.cast(tl.load(DECAY + h), tl.float32))
    S = tl.zeros([BF, BD], dtype=tl.float32)
    z = tl.zeros([BF], dtype=tl.float32)
    base_f = bh * T * F
    base_d = bh * T * D
    for start in range(0, T, C):
        rt = start + i
        t_ok = rt < T
        length = tl.minimum(T - start, C)  # valid tokens in this chunk
        fq = tl.load(
            FQ + base_f + rt[:, None] * F + rf[None, :],
            mask=t_ok[:, None] & f_ok[None, :],
            other=0.0,
        )
        fq = tl.cast(fq, tl.float32)
        fk = tl.load(
            FK + base_f + rt[:, None] * F + rf[None, :],
            mask=t_ok[:, None] & f_ok[None, :],
            other=0.0,
        )
        fk = tl.cast(fk, tl.float32)
        if HAS_MASK:
            keep = tl.load(MASK + b * T + rt, mask=t_ok, other=0)
            fk = fk * tl.cast(keep != 0, tl.float32)[:, None]
        v = tl.load(
            V + base_d + rt[:, None] * D + rd[None, :],
            mask=t_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        v = tl.cast(v, tl.float32)
        scores = tl.dot(fq, tl.trans(fk), input_precision="ieee")  # [C, C]
        if HAS_DECAY:
            lag = tl.cast(i[:, None] - i[None, :], tl.float32)
            scores = scores * tl.where(causal, tl.exp(lag * log_gamma), 0.0)
            q_weight = tl.exp(tl.cast(i + 1, tl.float32) * log_gamma)
            k_weight = tl.exp(tl.cast(length - 1 - i, tl.float32) * log_gamma)
            carry = tl.exp(tl.cast(length, tl.float32) * log_gamma)
        else:
            scores = tl.where(causal, scores, 0.0)
            q_weight = tl.full([C], 1.0, tl.float32)
            k_weight = tl.full([C], 1.0, tl.float32)
            carry = 1.0
        if WRITE_OUT:
            fq_w = fq * q_weight[:, None]
            num = tl.dot(scores, v, input_precision="ieee") + tl.dot(
                fq_w, S, input_precision="ieee"
            )
            den = tl.sum(scores, axis=1) + tl.sum(fq_w * z[None, :], axis=1)
            y = num / (den + eps)[:, None]
            tl.store(
                OUT + base_d + rt[:, None] * D + rd[None, :],
                y.to(OUT.dtype.element_ty),
                mask=t_ok[:, None] & d_ok[None, :],
            )
        fk_w = fk * tl.where(t_ok, k_weight, 0.0)[:, None]
        S = S * carry + tl.dot(tl.trans(fk_w), v, input_precision="ieee")
        z = z * carry + tl.sum(fk_w, axis=0)
    if WRITE_STATE:
        tl.store(
            S_OUT + bh * F * D + rf[:, None] * D + rd[None, :],
            S,
            mask=f_ok[:, None] & d_ok[None, :],
        )
        if pid_d == 0:
            tl.store(Z_OUT + bh * F + rf, z, mask=f_ok)


def linear_attention_chunked(
    phi_q: torch.Tensor,
    phi_k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor | None,
    decay: torch.Tensor | None,
    eps: float,
    *,
    write_output: bool = True,
    return_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Causal linear attention from feature maps ``[B, H, T, F]`` and values ``[B, H, T, D]``;
    output ``[B, H, T, D]`` in ``v``'s dtype, and with ``return_state`` the float32 state
    ``S [B, H, F, D]`` and ``z [B, H, F]`` after the last token."""
    batch, heads, length, features = phi_q.shape
    width = v.shape[-1]
    fq, fk, vv = phi_q.contiguous(), phi_k.contiguous(), v.contiguous()
    out = torch.empty_like(vv) if write_output else vv
    state = torch.zeros(batch, heads, features, width, dtype=torch.float32, device=v.device)
    normalizer = torch.zeros(batch, heads, features, dtype=torch.float32, device=v.device)
    mask = key_mask.to(torch.int8).contiguous() if key_mask is not None else fq

    def grid(meta: dict) -> tuple[int, int]:
        return (batch * heads, triton.cdiv(width, meta["BD"]))

    _chunked_kernel[grid](
        fq,
        fk,
        vv,
        mask,
        decay.contiguous() if decay is not None else fq,
        out,
        state,
        normalizer,
        heads,
        length,
        features,
        width,
        float(eps),
        HAS_MASK=key_mask is not None,
        HAS_DECAY=decay is not None,
        WRITE_OUT=write_output,
        WRITE_STATE=return_state,
        BF=max(16, next_power_of_2(features)),
    )
    if return_state:
        return (out if write_output else None), state, normalizer
    return out


@triton.jit
def _decode_kernel(
    S,
    Z,
    FQ,
    FK,
    V,
    VALID,
    DECAY,
    OUT,
    S_NEW,
    Z_NEW,
    heads,
    F,
    D,
    eps,
    HAS_VALID: tl.constexpr,
    HAS_DECAY: tl.constexpr,
    BF: tl.constexpr,
    BD: tl.constexpr,
):
    bh = tl.program_id(0)
    pid_d = tl.program_id(1)
    b = bh // heads
    h = bh % heads
    rf = tl.arange(0, BF)
    rd = pid_d * BD + tl.arange(0, BD)
    f_ok = rf < F
    d_ok = rd < D
    tile = f_ok[:, None] & d_ok[None, :]
    state = tl.load(S + bh * F * D + rf[:, None] * D + rd[None, :], mask=tile, other=0.0)
    z = tl.load(Z + bh * F + rf, mask=f_ok, other=0.0)
    fq = tl.cast(tl.load(FQ + bh * F + rf, mask=f_ok, other=0.0), tl.float32)
    fk = tl.cast(tl.load(FK + bh * F + rf, mask=f_ok, other=0.0), tl.float32)
    v = tl.cast(tl.load(V + bh * D + rd, mask=d_ok, other=0.0), tl.float32)
    if HAS_VALID:
        fk = fk * tl.cast(tl.load(VALID + b) != 0, tl.float32)
    gamma = 1.0
    if HAS_DECAY:
        gamma = tl.cast(tl.load(DECAY + h), tl.float32)
    state = gamma * state + fk[:, None] * v[None, :]
    z = gamma * z + fk
    num = tl.sum(fq[:, None] * state, axis=0)
    den = tl.sum(fq * z, axis=0)
    tl.store(OUT + bh * D + rd, (num / (den + eps)).to(OUT.dtype.element_ty), mask=d_ok)
    tl.store(S_NEW + bh * F * D + rf[:, None] * D + rd[None, :], state, mask=tile)
    if pid_d == 0:
        tl.store(Z_NEW + bh * F + rf, z, mask=f_ok)


def linear_attention_decode(
    state: torch.Tensor,
    normalizer: torch.Tensor,
    phi_q: torch.Tensor,
    phi_k: torch.Tensor,
    v: torch.Tensor,
    key_valid: torch.Tensor | None,
    decay: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One token: state ``S [B, H, F, D]``, ``z [B, H, F]`` (float32), features ``[B, H, F]``,
    value ``[B, H, D]``, ``key_valid [B]`` -> (output ``[B, H, D]``, next ``S``, next ``z``)."""
    batch, heads, features, width = state.shape
    bf = max(16, next_power_of_2(features))
    bd = max(16, min(next_power_of_2(width), 32 if interpreting() else 128))
    out = torch.empty(batch, heads, width, dtype=v.dtype, device=v.device)
    new_state = torch.empty_like(state)
    new_z = torch.empty_like(normalizer)
    valid = key_valid.to(torch.int8).contiguous() if key_valid is not None else out
    grid = (batch * heads, triton.cdiv(width, bd))
    _decode_kernel[grid](
        state.contiguous(),
        normalizer.contiguous(),
        phi_q.contiguous(),
        phi_k.contiguous(),
        v.contiguous(),
        valid,
        decay.contiguous() if decay is not None else out,
        out,
        new_state,
        new_z,
        heads,
        features,
        width,
        float(eps),
        HAS_VALID=key_valid is not None,
        HAS_DECAY=decay is not None,
        BF=bf,
        BD=bd,
    )
    return out, new_state, new_z
