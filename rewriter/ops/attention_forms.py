"""``rewriter::linear_attention``'s math, and its quadratic and chunked forms.

Per batch and head, with feature maps already applied (``phi_q``, ``phi_k``: non-negative, F
features) and a key mask ``m_i`` (padding), a query ``t`` weighs key ``i`` by

    linear part:  a_ti = (phi_q_t . phi_k_i) * gamma^(t-i)        for i <= t - w   (causal)
                                                                  for every i      (non-causal)
    window part:  b_ti = g * exp(s_ti - c_t),  s_ti = scale q_t.k_i + (t-i) log gamma
                                                                  for t - w < i <= t
    y_t = sum_i (a_ti + b_ti) m_i v_i / (sum_i (a_ti + b_ti) m_i + eps)

with ``w`` the window (0: no softmax part), ``g`` the per-head window gate and ``c_t`` the
largest ``s_ti`` in the window (LoLCATs' hybrid: one normalizer shared by both parts, the
softmax part shifted by its own maximum). ``gamma`` is a per-head decay in (0, 1] (Lightning /
TransNormer style; ALiBi's bias ``-slope (t - i)`` is the decay ``exp(-slope)``). Computed in
float32 (float64 stays float64).

Three forms compute the same function, and tests hold them equal:

* :func:`linear_attention_quadratic`: the T x T weights, masked (the reference);
* :func:`linear_attention_chunked`: chunks of C tokens: within a chunk the masked C x C product,
  across chunks the running state ``S = sum phi_k v^T`` and normalizer ``z = sum phi_k``, all
  chunks in parallel (a decayed exclusive prefix sum over chunks, exponents never positive); the
  window part as a band of ``C + w`` keys per chunk. O(T) memory: the op's kernel and its
  decomposition (what ONNX and MLIR lower);
* :func:`rewriter.ops.attention_decode.linear_attention_recurrent`: token by token through
  ``linear_attention_step``, the decoding API: a float32 state ``(S, z)`` of fixed size plus
  the last ``w`` keys and values.

Every form takes the op's arguments (``q, k, v, phi_q, phi_k, key_mask, decay, window_gate,
causal, window, scale, eps``) by the op's schema (:func:`rewriter.ops.contract.signature_of`):
the op's ``torch.library`` definition (:mod:`rewriter.ops.attention`) declares them once.
"""

from __future__ import annotations

import math

import torch

from rewriter.ops.contract import Arguments, SampleSource, signature_of

__all__ = ["CHUNK", "linear_attention_chunked", "linear_attention_quadratic"]

CHUNK = 64


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 stays float64; everything else computes in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def log_decay(
    decay: torch.Tensor | None, heads: int, dtype: torch.dtype, device: torch.device | None = None
) -> torch.Tensor:
    """Per-head ``log gamma`` as ``[H, 1, 1]`` (zeros without decay)."""
    if decay is None:
        return torch.zeros(heads, 1, 1, dtype=dtype, device=device)
    return torch.log(decay.to(dtype)).reshape(heads, 1, 1)


def gate_of(
    window_gate: torch.Tensor | None,
    heads: int,
    dtype: torch.dtype,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Per-head window gate as ``[H, 1, 1]`` (ones without a gate)."""
    if window_gate is None:
        return torch.ones(heads, 1, 1, dtype=dtype, device=device)
    return window_gate.to(dtype).reshape(heads, 1, 1)


# --- the quadratic reference ---------------------------------------------------------------------


@signature_of("linear_attention")
def linear_attention_quadratic(a: Arguments) -> torch.Tensor:
    """The T x T form: every weight materialized, then masked. The op's reference semantics."""
    q, k, causal, window, key_mask = a.q, a.k, a.causal, a.window, a.key_mask
    dtype = compute_dtype(q)
    heads, length, keys = q.shape[1], q.shape[2], k.shape[2]
    fq, fk, vv = a.phi_q.to(dtype), a.phi_k.to(dtype), a.v.to(dtype)
    t = torch.arange(length, device=q.device).unsqueeze(1)
    i = torch.arange(keys, device=q.device).unsqueeze(0)
    distance = (t - i).to(dtype)
    log_gamma = log_decay(a.decay, heads, dtype, q.device)
    linear = fq @ fk.transpose(-1, -2)  # [B, H, T, S]
    if causal:
        visible = i <= t - window
        linear = linear * torch.exp(torch.clamp(distance, min=0) * log_gamma) * visible
    weights = linear
    if key_mask is not None:
        keep = key_mask.to(torch.bool)[:, None, None, :]
        weights = weights * keep
    if causal and window > 0:
        band = (i <= t) & (i > t - window)
        if key_mask is not None:
            band = band & key_mask.to(torch.bool)[:, None, None, :]
        scores = a.scale * (q.to(dtype) @ k.to(dtype).transpose(-1, -2)) + distance * log_gamma
        scores = scores.masked_fill(~band, -math.inf)
        shift = scores.amax(-1, keepdim=True)
        shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
        gate = gate_of(a.window_gate, heads, dtype, q.device)
        weights = weights + gate * torch.exp(scores - shift)
    out = (weights @ vv) / (weights.sum(-1, keepdim=True) + a.eps)
    return out.to(q.dtype)


# --- the chunked form ----------------------------------------------------------------------------


@signature_of("linear_attention")
def linear_attention_chunked(a: Arguments, /, *, chunk: int = CHUNK) -> torch.Tensor:
    """Chunks of ``chunk`` tokens, all in parallel: O(T) memory, matmul-shaped work."""
    q, key_mask, window = a.q, a.key_mask, a.window
    dtype = compute_dtype(q)
    fq, fk, vv = a.phi_q.to(dtype), a.phi_k.to(dtype), a.v.to(dtype)
    if key_mask is not None:
        keep = key_mask.to(dtype)[:, None, :, None]
        fk = fk * keep
    ones = torch.ones_like(vv[..., :1])
    values = torch.cat([vv, ones if key_mask is None else ones * keep], -1)  # last column: z
    if not a.causal:
        state = fk.transpose(-1, -2) @ values  # [B, H, F, Dv + 1]
        total = fq @ state
    else:
        total = _causal_linear(fq, fk, values, a.decay, window, chunk)
        if window > 0:
            total = total + _window_part(
                q.to(dtype),
                a.k.to(dtype),
                values,
                key_mask,
                a.decay,
                a.window_gate,
                window,
                a.scale,
                chunk,
            )
    out = total[..., :-1] / (total[..., -1:] + a.eps)
    return out.to(q.dtype)


def _causal_linear(
    fq: torch.Tensor,
    fk: torch.Tensor,
    values: torch.Tensor,
    decay: torch.Tensor | None,
    lag: int,
    chunk: int,
) -> torch.Tensor:
    """sum_{i <= t - lag} gamma^(t-i) (phi_q_t . phi_k_i) values_i, chunked.

    A lag shifts keys and values ``lag`` places later (zeros in front), which turns it into
    plain causal linear attention with one extra factor gamma^lag.
    """
    batch, heads, length, features = fq.shape
    dtype = fq.dtype
    if lag:
        fk = torch.nn.functional.pad(fk, (0, 0, lag, 0))[:, :, :length]
        values = torch.nn.functional.pad(values, (0, 0, lag, 0))[:, :, :length]
    # n chunks and the padding written so that symbolic shapes see T + pad == n * chunk (a
    # dynamic-length export must not specialize), and no branch on the padding.
    n = (length + chunk - 1) // chunk
    pad = n * chunk - length
    fq = torch.nn.functional.pad(fq, (0, 0, 0, pad))
    fk = torch.nn.functional.pad(fk, (0, 0, 0, pad))
    values = torch.nn.functional.pad(values, (0, 0, 0, pad))
    qc = fq.reshape(batch, heads, n, chunk, features)
    kc = fk.reshape(batch, heads, n, chunk, features)
    vc = values.reshape(batch, heads, n, chunk, values.shape[-1])
    log_gamma = log_decay(decay, heads, dtype, fq.device).reshape(heads, 1, 1, 1)  # [H,1,1,1]
    a = torch.arange(chunk, device=fq.device)
    rel = (a.unsqueeze(1) - a.unsqueeze(0)).to(dtype)  # a - b
    intra_decay = torch.exp(torch.clamp(rel, min=0) * log_gamma) * (rel >= 0)  # [H,1,C,C]
    intra = ((qc @ kc.transpose(-1, -2)) * intra_decay) @ vc  # [B,H,N,C,Dv+1]
    # State entering chunk n: sum_{m<n} gamma^(C(n-1-m)) U_m, U_m = sum_b gamma^(C-1-b) k_b v_b^T.
    key_weight = torch.exp((chunk - 1 - a).to(dtype) * log_gamma).reshape(heads, 1, chunk, 1)
    updates = (kc * key_weight).transpose(-1, -2) @ vc  # [B,H,N,F,Dv+1]
    m = torch.arange(n, device=fq.device)
    steps = (m.unsqueeze(1) - 1 - m.unsqueeze(0)).to(dtype)  # n - 1 - m
    carry = torch.exp(torch.clamp(steps, min=0) * chunk * log_gamma.reshape(heads, 1, 1)) * (
        steps >= 0
    )  # [H, N, N]
    states = torch.einsum("hnm,bhmfd->bhnfd", carry, updates)
    query_weight = torch.exp((a + 1).to(dtype) * log_gamma).reshape(heads, 1, chunk, 1)
    inter = (qc * query_weight) @ states  # [B,H,N,C,Dv+1]
    total = (intra + inter).reshape(batch, heads, n * chunk, values.shape[-1])[:, :, :length]
    if lag and decay is not None:
        total = total * torch.exp(lag * log_gamma.reshape(heads, 1, 1))
    return total


def _window_part(
    q: torch.Tensor,
    k: torch.Tensor,
    values: torch.Tensor,
    key_mask: torch.Tensor | None,
    decay: torch.Tensor | None,
    window_gate: torch.Tensor | None,
    window: int,
    scale: float,
    chunk: int,
) -> torch.Tensor:
    """The softmax band: each chunk of queries against its ``chunk + window`` nearest keys."""
    batch, heads, length, _ = q.shape
    dtype = q.dtype
    n = (length + chunk - 1) // chunk
    pad = n * chunk - length
    qp = torch.nn.functional.pad(q, (0, 0, 0, pad)).reshape(batch, heads, n, chunk, q.shape[-1])
    # Keys padded by `window` in front: block n holds original keys nC - window .. nC + C - 1.
    kp = torch.nn.functional.pad(k, (0, 0, window, pad))
    vp = torch.nn.functional.pad(values, (0, 0, window, pad))
    kb = kp.unfold(2, chunk + window, chunk).transpose(-1, -2)  # [B,H,N,C+w,D]
    vb = vp.unfold(2, chunk + window, chunk).transpose(-1, -2)
    a = torch.arange(chunk, device=q.device).unsqueeze(1)
    b = torch.arange(chunk + window, device=q.device).unsqueeze(0)
    band = (b > a) & (b <= a + window)  # t - w < i <= t
    distance = (a + window - b).to(dtype)  # t - i
    present = (
        key_mask.to(torch.bool)
        if key_mask is not None
        else torch.ones(batch, length, dtype=torch.bool, device=q.device)
    )
    mask = torch.nn.functional.pad(present, (window, pad))  # the front padding is no key
    valid = band & mask.unfold(1, chunk + window, chunk).unsqueeze(2)
    valid = valid.unsqueeze(1)  # [B,1,N,C,C+w]
    scores = scale * (qp @ kb.transpose(-1, -2)) + distance * log_decay(
        decay, heads, dtype, q.device
    ).reshape(heads, 1, 1, 1)
    scores = scores.masked_fill(~valid, -math.inf)
    shift = scores.amax(-1, keepdim=True)
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    weights = torch.exp(scores - shift) * gate_of(window_gate, heads, dtype, q.device).reshape(
        heads, 1, 1, 1
    )
    out = weights @ vb  # [B,H,N,C,Dv+1]: the last column sums the weights (values carry ones)
    return out.reshape(batch, heads, n * chunk, values.shape[-1])[:, :, :length]


# --- sample arguments ----------------------------------------------------------------------------


def sample_tensors(s: SampleSource) -> dict:
    """The tensors the three linear-attention ops' samples share (one draw order)."""
    batch, heads, length, dim, features = 2, 2, 20 * s.size + 3, 8, 6
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[0, :3] = False
    q, k, v = (s.rand(batch, heads, length, dim) for _ in range(3))
    pq, pk = s.positive(batch, heads, length, features), s.positive(batch, heads, length, features)
    return {
        "q": q,
        "k": k,
        "v": v,
        "pq": pq,
        "pk": pk,
        "mask": mask.to(s.device),
        "decay": torch.linspace(0.8, 1.0, heads).to(s.device),
        "gate": torch.full((heads,), 0.3).to(s.device),
        "scale": dim**-0.5,
    }
