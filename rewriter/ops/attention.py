"""``rewriter::linear_attention``: kernelized attention with an optional softmax window and decay.

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
* :func:`linear_attention_recurrent`: token by token through :func:`linear_attention_step`, the
  decoding API: a float32 state ``(S, z)`` of fixed size plus the last ``w`` keys and values.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from rewriter.ops.contract import OpContract, SampleSource, register

__all__ = [
    "LinearAttentionState",
    "linear_attention",
    "linear_attention_chunked",
    "linear_attention_decode",
    "linear_attention_quadratic",
    "linear_attention_recurrent",
    "linear_attention_state",
    "linear_attention_step",
    "state_size",
]

CHUNK = 64


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _log_decay(
    decay: torch.Tensor | None, heads: int, dtype: torch.dtype, device: torch.device | None = None
) -> torch.Tensor:
    """Per-head ``log gamma`` as ``[H, 1, 1]`` (zeros without decay)."""
    if decay is None:
        return torch.zeros(heads, 1, 1, dtype=dtype, device=device)
    return torch.log(decay.to(dtype)).reshape(heads, 1, 1)


# --- the quadratic reference ---------------------------------------------------------------------


def linear_attention_quadratic(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    phi_q: torch.Tensor,
    phi_k: torch.Tensor,
    key_mask: torch.Tensor | None,
    decay: torch.Tensor | None,
    window_gate: torch.Tensor | None,
    causal: bool,
    window: int,
    scale: float,
    eps: float,
) -> torch.Tensor:
    """The T x T form: every weight materialized, then masked. The op's reference semantics."""
    dtype = _compute_dtype(q)
    heads, length, keys = q.shape[1], q.shape[2], k.shape[2]
    fq, fk, vv = phi_q.to(dtype), phi_k.to(dtype), v.to(dtype)
    t = torch.arange(length, device=q.device).unsqueeze(1)
    i = torch.arange(keys, device=q.device).unsqueeze(0)
    distance = (t - i).to(dtype)
    log_gamma = _log_decay(decay, heads, dtype, q.device)
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
        scores = scale * (q.to(dtype) @ k.to(dtype).transpose(-1, -2)) + distance * log_gamma
        scores = scores.masked_fill(~band, -math.inf)
        shift = scores.amax(-1, keepdim=True)
        shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
        gate = _gate(window_gate, heads, dtype, q.device)
        weights = weights + gate * torch.exp(scores - shift)
    out = (weights @ vv) / (weights.sum(-1, keepdim=True) + eps)
    return out.to(q.dtype)


def _gate(
    window_gate: torch.Tensor | None,
    heads: int,
    dtype: torch.dtype,
    device: torch.device | None = None,
) -> torch.Tensor:
    if window_gate is None:
        return torch.ones(heads, 1, 1, dtype=dtype, device=device)
    return window_gate.to(dtype).reshape(heads, 1, 1)


# --- the chunked form ----------------------------------------------------------------------------


def linear_attention_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    phi_q: torch.Tensor,
    phi_k: torch.Tensor,
    key_mask: torch.Tensor | None,
    decay: torch.Tensor | None,
    window_gate: torch.Tensor | None,
    causal: bool,
    window: int,
    scale: float,
    eps: float,
    chunk: int = CHUNK,
) -> torch.Tensor:
    """Chunks of ``chunk`` tokens, all in parallel: O(T) memory, matmul-shaped work."""
    dtype = _compute_dtype(q)
    fq, fk, vv = phi_q.to(dtype), phi_k.to(dtype), v.to(dtype)
    if key_mask is not None:
        keep = key_mask.to(dtype)[:, None, :, None]
        fk = fk * keep
    ones = torch.ones_like(vv[..., :1])
    values = torch.cat([vv, ones if key_mask is None else ones * keep], -1)  # last column: z
    if not causal:
        state = fk.transpose(-1, -2) @ values  # [B, H, F, Dv + 1]
        total = fq @ state
    else:
        total = _causal_linear(fq, fk, values, decay, window, chunk)
        if window > 0:
            total = total + _window_part(
                q.to(dtype), k.to(dtype), values, key_mask, decay, window_gate, window, scale, chunk
            )
    out = total[..., :-1] / (total[..., -1:] + eps)
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
    log_gamma = _log_decay(decay, heads, dtype, fq.device).reshape(heads, 1, 1, 1)  # [H,1,1,1]
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
    scores = scale * (qp @ kb.transpose(-1, -2)) + distance * _log_decay(
        decay, heads, dtype, q.device
    ).reshape(heads, 1, 1, 1)
    scores = scores.masked_fill(~valid, -math.inf)
    shift = scores.amax(-1, keepdim=True)
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    weights = torch.exp(scores - shift) * _gate(window_gate, heads, dtype, q.device).reshape(
        heads, 1, 1, 1
    )
    out = weights @ vb  # [B,H,N,C,Dv+1]: the last column sums the weights (values carry ones)
    return out.reshape(batch, heads, n * chunk, values.shape[-1])[:, :, :length]


# --- the recurrent form --------------------------------------------------------------------------


@dataclasses.dataclass
class LinearAttentionState:
    """Decoding state: ``S`` [B, H, F, Dv] and ``z`` [B, H, F] in float32 (keys older than the
    window), and the window's last keys, values, key features and mask."""

    S: torch.Tensor
    z: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    features: torch.Tensor
    valid: torch.Tensor

    @classmethod
    def empty(
        cls,
        batch: int,
        heads: int,
        head_dim: int,
        value_dim: int,
        features: int,
        window: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> LinearAttentionState:
        def zeros(*shape: int, kind: torch.dtype = dtype) -> torch.Tensor:
            return torch.zeros(*shape, dtype=kind, device=device)

        return cls(
            S=zeros(batch, heads, features, value_dim),
            z=zeros(batch, heads, features),
            keys=zeros(batch, heads, window, head_dim),
            values=zeros(batch, heads, window, value_dim),
            features=zeros(batch, heads, window, features),
            valid=zeros(batch, window, kind=torch.bool),
        )


def linear_attention_step(
    state: LinearAttentionState,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    phi_q: torch.Tensor,
    phi_k: torch.Tensor,
    key_valid: torch.Tensor | None,
    decay: torch.Tensor | None,
    window_gate: torch.Tensor | None,
    window: int,
    scale: float,
    eps: float,
) -> tuple[torch.Tensor, LinearAttentionState]:
    """One causal token: inputs ``[B, H, D]`` (features ``[B, H, F]``) -> output ``[B, H, Dv]``.

    Cost and memory are independent of how many tokens came before.
    """
    dtype = state.S.dtype
    batch, heads = q.shape[:2]
    log_gamma = _log_decay(decay, heads, dtype, q.device).reshape(1, heads, 1)
    gamma = torch.exp(log_gamma)
    valid = (
        torch.ones(batch, dtype=torch.bool, device=q.device)
        if key_valid is None
        else key_valid.to(torch.bool)
    )
    fk = phi_k.to(dtype) * valid.to(dtype)[:, None, None]
    vv = v.to(dtype)
    if window == 0:
        S = gamma.unsqueeze(-1) * state.S + fk.unsqueeze(-1) * vv.unsqueeze(-2)
        z = gamma * state.z + fk
        window_num = window_den = 0.0
        new = dataclasses.replace(state, S=S, z=z)
    else:
        # The oldest window entry (token t - w) leaves the window for the state, weighted
        # gamma^w as the state stays scaled to the current position.
        old_f, old_v = state.features[:, :, 0], state.values[:, :, 0]
        weight = torch.exp(window * log_gamma)
        S = gamma.unsqueeze(-1) * state.S + (weight * old_f).unsqueeze(-1) * old_v.unsqueeze(-2)
        z = gamma * state.z + weight * old_f
        keys = torch.cat([state.keys[:, :, 1:], k.to(dtype).unsqueeze(2)], 2)
        values = torch.cat([state.values[:, :, 1:], vv.unsqueeze(2)], 2)
        features = torch.cat([state.features[:, :, 1:], fk.unsqueeze(2)], 2)
        mask = torch.cat([state.valid[:, 1:], valid.unsqueeze(1)], 1)
        distance = torch.arange(
            window - 1, -1, -1, dtype=dtype, device=q.device
        )  # t - i for the buffer
        scores = scale * (keys @ q.to(dtype).unsqueeze(-1)).squeeze(-1) + distance * log_gamma
        scores = scores.masked_fill(~mask[:, None, :], -math.inf)
        shift = scores.amax(-1, keepdim=True)
        shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
        weights = torch.exp(scores - shift) * _gate(window_gate, heads, dtype, q.device).reshape(
            1, heads, 1
        )
        window_num = (weights.unsqueeze(-1) * values).sum(2)
        window_den = weights.sum(-1, keepdim=True)
        new = LinearAttentionState(S, z, keys, values, features, mask)
    fq = phi_q.to(dtype)
    num = (fq.unsqueeze(-1) * new.S).sum(2) + window_num
    den = (fq * new.z).sum(-1, keepdim=True) + window_den
    return (num / (den + eps)).to(q.dtype), new


def linear_attention_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    phi_q: torch.Tensor,
    phi_k: torch.Tensor,
    key_mask: torch.Tensor | None,
    decay: torch.Tensor | None,
    window_gate: torch.Tensor | None,
    causal: bool,
    window: int,
    scale: float,
    eps: float,
) -> torch.Tensor:
    """Token by token through :func:`linear_attention_step` (causal only)."""
    if not causal:
        raise ValueError("the recurrent form is causal")
    batch, heads, length, head_dim = q.shape
    state = LinearAttentionState.empty(
        batch,
        heads,
        head_dim,
        v.shape[-1],
        phi_q.shape[-1],
        window,
        _compute_dtype(q),
        q.device,
    )
    outputs = []
    for t in range(length):
        y, state = linear_attention_step(
            state,
            q[:, :, t],
            k[:, :, t],
            v[:, :, t],
            phi_q[:, :, t],
            phi_k[:, :, t],
            None if key_mask is None else key_mask[:, t],
            decay,
            window_gate,
            window,
            scale,
            eps,
        )
        outputs.append(y)
    return torch.stack(outputs, 2)


# --- the op --------------------------------------------------------------------------------------


@torch.library.custom_op("rewriter::linear_attention", mutates_args=())
def linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    phi_q: torch.Tensor,
    phi_k: torch.Tensor,
    key_mask: torch.Tensor | None,
    decay: torch.Tensor | None,
    window_gate: torch.Tensor | None,
    causal: bool,
    window: int,
    scale: float,
    eps: float,
) -> torch.Tensor:
    """Linear attention (optional softmax window, decay, key mask); the chunked form computes it."""
    return linear_attention_chunked(
        q, k, v, phi_q, phi_k, key_mask, decay, window_gate, causal, window, scale, eps
    )


@linear_attention.register_fake
def _linear_attention_fake(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    phi_q: torch.Tensor,
    phi_k: torch.Tensor,
    key_mask: torch.Tensor | None,
    decay: torch.Tensor | None,
    window_gate: torch.Tensor | None,
    causal: bool,
    window: int,
    scale: float,
    eps: float,
) -> torch.Tensor:
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


_DIFFERENTIABLE = (0, 1, 2, 3, 4, 6, 7)  # q, k, v, phi_q, phi_k, decay, window_gate


def _setup(ctx: object, inputs: tuple, output: torch.Tensor) -> None:
    ctx.save_for_backward(*[inputs[i] for i in range(8)])  # type: ignore[attr-defined]
    ctx.settings = inputs[8:]  # type: ignore[attr-defined]


def _backward(ctx: object, grad: torch.Tensor) -> tuple:
    # Recompute the chunked form under autograd (its memory stays O(T)) and pull the gradient
    # through it: the attention transfer trains feature maps through this.
    saved = list(ctx.saved_tensors)  # type: ignore[attr-defined]
    inputs = [
        t.detach().requires_grad_(t.is_floating_point() and i in _DIFFERENTIABLE)
        if isinstance(t, torch.Tensor)
        else t
        for i, t in enumerate(saved)
    ]
    with torch.enable_grad():
        out = linear_attention_chunked(*inputs, *ctx.settings)  # type: ignore[attr-defined]
        wanted = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
        grads = iter(torch.autograd.grad(out, wanted, grad, allow_unused=True))
    result = [
        next(grads) if isinstance(t, torch.Tensor) and t.requires_grad else None for t in inputs
    ]
    return (*result, None, None, None, None)


linear_attention.register_autograd(_backward, setup_context=_setup)


def _attention_tensors(s: SampleSource) -> dict:
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


def _attention_samples(s: SampleSource) -> list[tuple]:
    t = _attention_tensors(s)
    q, k, v, pq, pk, mask, decay, gate, scale = t.values()
    return [
        (q, k, v, pq, pk, None, None, None, True, 0, scale, 1e-6),
        (q, k, v, pq, pk, mask, decay, None, True, 0, scale, 1e-6),
        (q, k, v, pq, pk, mask, decay, gate, True, 4, scale, 1e-6),
        (q, k, v, pq, pk, mask, None, None, False, 0, scale, 1e-6),
    ]


register(
    OpContract(
        name="linear_attention",
        overload=torch.ops.rewriter.linear_attention.default,
        reference=linear_attention_quadratic,
        decomposition=linear_attention_chunked,
        summary="kernelized attention with an optional softmax window and per-head decay",
        samples=_attention_samples,
    )
)


# --- the deployment ops: a prefix's state and one decode step ------------------------------------
#
# A linearized layer in a ``rewriter.deploy`` step graph caches its recurrent state instead of keys
# and values. ``linear_attention_state`` turns a prefix into that state (what prefill returns);
# ``linear_attention_decode`` takes one token and the state to the token's output and the next
# state (what decode runs). The state is a list of tensors: ``[S, z]`` without a window, ``[S, z,
# keys, values, features, valid]`` with one (:class:`LinearAttentionState`'s fields, in order).


def state_size(window: int) -> int:
    """How many tensors a layer's state has."""
    return 6 if window else 2


def linear_attention_state_reference(
    k: torch.Tensor,
    v: torch.Tensor,
    phi_k: torch.Tensor,
    key_mask: torch.Tensor | None,
    decay: torch.Tensor | None,
    window: int,
) -> list[torch.Tensor]:
    """The state :func:`linear_attention_step` holds after the T tokens of ``k``/``v``: keys older
    than the window summed into ``S``/``z`` with weight ``gamma^(T-1-i)``, the last ``window``
    tokens kept as they are (left-filled with invalid entries when T < window)."""
    dtype = _compute_dtype(k)
    batch, heads, length, _ = k.shape
    valid = (
        torch.ones(batch, length, dtype=torch.bool, device=k.device)
        if key_mask is None
        else key_mask.to(torch.bool)
    )
    fk = phi_k.to(dtype) * valid.to(dtype)[:, None, :, None]
    vv = v.to(dtype)
    age = (length - 1 - torch.arange(length, device=k.device)).to(dtype)  # T - 1 - i
    weight = torch.exp(age * _log_decay(decay, heads, dtype, k.device).reshape(heads, 1)) * (
        age >= window
    )
    weighted = fk * weight[:, :, None]
    S = weighted.transpose(-1, -2) @ vv
    z = weighted.sum(2)
    if not window:
        return [S, z]

    def last(x: torch.Tensor, dim: int, fill: bool | float = 0.0) -> torch.Tensor:
        padding = [0, 0] * (x.dim() - 1 - dim) + [window, 0]
        return torch.nn.functional.pad(x, padding, value=fill).narrow(dim, x.shape[dim], window)

    return [
        S,
        z,
        last(k.to(dtype), 2),
        last(vv, 2),
        last(fk, 2),
        last(valid, 1, False),
    ]


def linear_attention_decode_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    phi_q: torch.Tensor,
    phi_k: torch.Tensor,
    key_valid: torch.Tensor | None,
    decay: torch.Tensor | None,
    window_gate: torch.Tensor | None,
    state: list[torch.Tensor],
    window: int,
    scale: float,
    eps: float,
) -> list[torch.Tensor]:
    """One token (``q, k, v, phi_q, phi_k`` of length 1, ``key_valid`` [B]) from ``state``:
    ``[output, *next state]`` through :func:`linear_attention_step`."""
    if len(state) != state_size(window):
        raise ValueError(
            f"linear_attention_decode: window {window} needs {state_size(window)} state "
            f"tensors, got {len(state)}"
        )
    if window:
        current = LinearAttentionState(*state)
    else:
        none = state[0].new_zeros(0)
        current = LinearAttentionState(state[0], state[1], none, none, none, none.bool())
    out, new = linear_attention_step(
        current,
        q[:, :, 0],
        k[:, :, 0],
        v[:, :, 0],
        phi_q[:, :, 0],
        phi_k[:, :, 0],
        key_valid,
        decay,
        window_gate,
        window,
        scale,
        eps,
    )
    fields = [new.S, new.z]
    if window:
        fields += [new.keys, new.values, new.features, new.valid]
    return [out.unsqueeze(2), *fields]


def _state_shapes(
    k: torch.Tensor, v: torch.Tensor, phi_k: torch.Tensor, window: int
) -> list[torch.Tensor]:
    dtype = _compute_dtype(k)
    batch, heads, _, dim = k.shape
    features, width = phi_k.shape[-1], v.shape[-1]
    shapes = [
        k.new_empty((batch, heads, features, width), dtype=dtype),
        k.new_empty((batch, heads, features), dtype=dtype),
    ]
    if window:
        shapes += [
            k.new_empty((batch, heads, window, dim), dtype=dtype),
            k.new_empty((batch, heads, window, width), dtype=dtype),
            k.new_empty((batch, heads, window, features), dtype=dtype),
            k.new_empty((batch, window), dtype=torch.bool),
        ]
    return shapes


@torch.library.custom_op("rewriter::linear_attention_state", mutates_args=())
def linear_attention_state(
    k: torch.Tensor,
    v: torch.Tensor,
    phi_k: torch.Tensor,
    key_mask: torch.Tensor | None,
    decay: torch.Tensor | None,
    window: int,
) -> list[torch.Tensor]:
    """The decoding state after a prefix (see :func:`linear_attention_state_reference`)."""
    return linear_attention_state_reference(k, v, phi_k, key_mask, decay, window)


@linear_attention_state.register_fake
def _linear_attention_state_fake(
    k: torch.Tensor,
    v: torch.Tensor,
    phi_k: torch.Tensor,
    key_mask: torch.Tensor | None,
    decay: torch.Tensor | None,
    window: int,
) -> list[torch.Tensor]:
    return _state_shapes(k, v, phi_k, window)


@torch.library.custom_op("rewriter::linear_attention_decode", mutates_args=())
def linear_attention_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    phi_q: torch.Tensor,
    phi_k: torch.Tensor,
    key_valid: torch.Tensor | None,
    decay: torch.Tensor | None,
    window_gate: torch.Tensor | None,
    state: list[torch.Tensor],
    window: int,
    scale: float,
    eps: float,
) -> list[torch.Tensor]:
    """One decoding step from a state (see :func:`linear_attention_decode_reference`)."""
    return linear_attention_decode_reference(
        q, k, v, phi_q, phi_k, key_valid, decay, window_gate, state, window, scale, eps
    )


@linear_attention_decode.register_fake
def _linear_attention_decode_fake(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    phi_q: torch.Tensor,
    phi_k: torch.Tensor,
    key_valid: torch.Tensor | None,
    decay: torch.Tensor | None,
    window_gate: torch.Tensor | None,
    state: list[torch.Tensor],
    window: int,
    scale: float,
    eps: float,
) -> list[torch.Tensor]:
    return [q.new_empty((*q.shape[:-1], v.shape[-1])), *(torch.empty_like(s) for s in state)]


def _recompute_backward(reference: object, tensor_args: tuple[int, ...]) -> tuple[object, object]:
    """Autograd for an op returning a list: save its inputs, and in backward recompute
    ``reference`` under autograd and pull the output gradients through it."""

    def setup(ctx: object, inputs: tuple, output: object) -> None:
        ctx.inputs = inputs  # type: ignore[attr-defined]

    def backward(ctx: object, grads: list[torch.Tensor | None]) -> tuple:
        inputs = list(ctx.inputs)  # type: ignore[attr-defined]

        def leaf(t: object) -> object:
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                return t.detach().requires_grad_(True)
            return t.detach() if isinstance(t, torch.Tensor) else t

        for i in tensor_args:
            value = inputs[i]
            inputs[i] = [leaf(t) for t in value] if isinstance(value, list) else leaf(value)
        with torch.enable_grad():
            outputs = reference(*inputs)  # type: ignore[operator]
            pairs = [(o, g) for o, g in zip(outputs, grads) if g is not None and o.requires_grad]
            wanted = [
                t
                for i in tensor_args
                for t in (inputs[i] if isinstance(inputs[i], list) else [inputs[i]])
                if isinstance(t, torch.Tensor) and t.requires_grad
            ]
            found = (
                torch.autograd.grad(
                    [o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True
                )
                if pairs and wanted
                else [None] * len(wanted)
            )
        found_iter = iter(found)

        def grad_of(t: object) -> object:
            if isinstance(t, torch.Tensor) and t.requires_grad:
                return next(found_iter)
            return None

        result: list[object] = []
        for i, value in enumerate(inputs):
            if i not in tensor_args:
                result.append(None)
            elif isinstance(value, list):
                result.append([grad_of(t) for t in value])
            else:
                result.append(grad_of(value))
        return tuple(result)

    return backward, setup


_state_backward, _state_setup = _recompute_backward(linear_attention_state_reference, (0, 1, 2, 4))
linear_attention_state.register_autograd(_state_backward, setup_context=_state_setup)
_decode_backward, _decode_setup = _recompute_backward(
    linear_attention_decode_reference, (0, 1, 2, 3, 4, 6, 7, 8)
)
linear_attention_decode.register_autograd(_decode_backward, setup_context=_decode_setup)


def _state_samples(s: SampleSource) -> list[tuple]:
    t = _attention_tensors(s)
    k, v, pk, mask, decay = t["k"], t["v"], t["pk"], t["mask"], t["decay"]
    return [(k, v, pk, mask, decay, 0), (k, v, pk, None, None, 4)]


def _decode_samples(s: SampleSource) -> list[tuple]:
    t = _attention_tensors(s)
    q, k, v, pq, pk, mask, decay, gate, scale = t.values()
    one = slice(0, 1)
    cases = []
    for window, m, d, g in ((0, mask, decay, None), (4, None, decay, gate), (0, None, None, None)):
        state = linear_attention_state_reference(k, v, pk, m, d, window)
        last = (q[:, :, one], k[:, :, one], v[:, :, one], pq[:, :, one], pk[:, :, one])
        cases.append((*last, None if m is None else m[:, 0], d, g, state, window, scale, 1e-6))
    return cases


register(
    OpContract(
        name="linear_attention_state",
        overload=torch.ops.rewriter.linear_attention_state.default,
        reference=linear_attention_state_reference,
        decomposition=linear_attention_state_reference,
        summary="a linearized layer's decoding state after a prefix (deploy: prefill's cache)",
        samples=_state_samples,
    )
)
register(
    OpContract(
        name="linear_attention_decode",
        overload=torch.ops.rewriter.linear_attention_decode.default,
        reference=linear_attention_decode_reference,
        decomposition=linear_attention_decode_reference,
        summary="one linear-attention decoding step from a fixed-size state (deploy: decode)",
        samples=_decode_samples,
    )
)
