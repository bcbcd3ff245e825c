"""Decoding linear attention: the recurrent form and ``rewriter::linear_attention_state`` /
``rewriter::linear_attention_decode``, the ops a step graph runs instead of a key/value cache.

* :func:`linear_attention_step` takes one token from a fixed-size float32 state
  (:class:`LinearAttentionState`: ``(S, z)`` plus the window's last keys and values);
  :func:`linear_attention_recurrent` runs it token by token: the third form of
  ``rewriter::linear_attention`` (math: :mod:`rewriter.ops.attention_forms`).
* A linearized layer in a ``rewriter.deploy`` step graph caches its recurrent state instead of
  keys and values. ``linear_attention_state`` turns a prefix into that state (what prefill
  returns); ``linear_attention_decode`` takes one token and the state to the token's output and
  the next state (what decode runs). The state is a list of tensors: ``[S, z]`` without a
  window, ``[S, z, keys, values, features, valid]`` with one (:class:`LinearAttentionState`'s
  fields, in order).

The references and fake kernels take the ops' arguments by schema name
(:func:`rewriter.ops.contract.signature_of`); each op's ``torch.library`` definition below
declares its parameters once.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch

from rewriter.ops.attention_forms import compute_dtype, gate_of, log_decay, sample_tensors
from rewriter.ops.contract import (
    OPS,
    Arguments,
    OpContract,
    SampleSource,
    register,
    signature_of,
)

__all__ = [
    "LinearAttentionState",
    "linear_attention_decode",
    "linear_attention_decode_reference",
    "linear_attention_recurrent",
    "linear_attention_state",
    "linear_attention_state_reference",
    "linear_attention_step",
    "state_size",
]


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


@signature_of("linear_attention_decode", first="state")
def linear_attention_step(a: Arguments) -> tuple[torch.Tensor, LinearAttentionState]:
    """One causal token: a :class:`LinearAttentionState`, then the other arguments of
    ``rewriter::linear_attention_decode``, with inputs ``[B, H, D]`` (features ``[B, H, F]``,
    ``key_valid`` ``[B]``) -> output ``[B, H, Dv]`` and the next state.

    Cost and memory are independent of how many tokens came before.
    """
    state, q, window, key_valid = a.state, a.q, a.window, a.key_valid
    dtype = state.S.dtype
    batch, heads = q.shape[:2]
    log_gamma = log_decay(a.decay, heads, dtype, q.device).reshape(1, heads, 1)
    gamma = torch.exp(log_gamma)
    valid = (
        torch.ones(batch, dtype=torch.bool, device=q.device)
        if key_valid is None
        else key_valid.to(torch.bool)
    )
    fk = a.phi_k.to(dtype) * valid.to(dtype)[:, None, None]
    vv = a.v.to(dtype)
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
        keys = torch.cat([state.keys[:, :, 1:], a.k.to(dtype).unsqueeze(2)], 2)
        values = torch.cat([state.values[:, :, 1:], vv.unsqueeze(2)], 2)
        features = torch.cat([state.features[:, :, 1:], fk.unsqueeze(2)], 2)
        mask = torch.cat([state.valid[:, 1:], valid.unsqueeze(1)], 1)
        distance = torch.arange(
            window - 1, -1, -1, dtype=dtype, device=q.device
        )  # t - i for the buffer
        scores = a.scale * (keys @ q.to(dtype).unsqueeze(-1)).squeeze(-1) + distance * log_gamma
        scores = scores.masked_fill(~mask[:, None, :], -math.inf)
        shift = scores.amax(-1, keepdim=True)
        shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
        gate = gate_of(a.window_gate, heads, dtype, q.device).reshape(1, heads, 1)
        weights = torch.exp(scores - shift) * gate
        window_num = (weights.unsqueeze(-1) * values).sum(2)
        window_den = weights.sum(-1, keepdim=True)
        new = LinearAttentionState(S, z, keys, values, features, mask)
    fq = a.phi_q.to(dtype)
    num = (fq.unsqueeze(-1) * new.S).sum(2) + window_num
    den = (fq * new.z).sum(-1, keepdim=True) + window_den
    return (num / (den + a.eps)).to(q.dtype), new


@signature_of("linear_attention")
def linear_attention_recurrent(a: Arguments) -> torch.Tensor:
    """Token by token through :func:`linear_attention_step` (causal only)."""
    if not a.causal:
        raise ValueError("the recurrent form is causal")
    q, key_mask = a.q, a.key_mask
    batch, heads, length, head_dim = q.shape
    state = LinearAttentionState.empty(
        batch,
        heads,
        head_dim,
        a.v.shape[-1],
        a.phi_q.shape[-1],
        a.window,
        compute_dtype(q),
        q.device,
    )
    settings = {name: a[name] for name in ("decay", "window_gate", "window", "scale", "eps")}
    outputs = []
    for t in range(length):
        token = {name: a[name][:, :, t] for name in ("q", "k", "v", "phi_q", "phi_k")}
        valid = None if key_mask is None else key_mask[:, t]
        y, state = linear_attention_step(state, key_valid=valid, **token, **settings)
        outputs.append(y)
    return torch.stack(outputs, 2)


# --- the deployment ops: a prefix's state and one decode step ------------------------------------


def state_size(window: int) -> int:
    """How many tensors a layer's state has."""
    return 6 if window else 2


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
    return linear_attention_state_reference(**locals())  # its arguments, by name


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
    return linear_attention_decode_reference(**locals())  # its arguments, by name


@signature_of("linear_attention_state")
def linear_attention_state_reference(a: Arguments) -> list[torch.Tensor]:
    """The state :func:`linear_attention_step` holds after the T tokens of ``k``/``v``: keys older
    than the window summed into ``S``/``z`` with weight ``gamma^(T-1-i)``, the last ``window``
    tokens kept as they are (left-filled with invalid entries when T < window)."""
    k, key_mask, window = a.k, a.key_mask, a.window
    dtype = compute_dtype(k)
    batch, heads, length, _ = k.shape
    valid = (
        torch.ones(batch, length, dtype=torch.bool, device=k.device)
        if key_mask is None
        else key_mask.to(torch.bool)
    )
    fk = a.phi_k.to(dtype) * valid.to(dtype)[:, None, :, None]
    vv = a.v.to(dtype)
    age = (length - 1 - torch.arange(length, device=k.device)).to(dtype)  # T - 1 - i
    weight = torch.exp(age * log_decay(a.decay, heads, dtype, k.device).reshape(heads, 1)) * (
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


@signature_of("linear_attention_decode")
def linear_attention_decode_reference(a: Arguments) -> list[torch.Tensor]:
    """One token (``q, k, v, phi_q, phi_k`` of length 1, ``key_valid`` [B]) from ``state``:
    ``[output, *next state]`` through :func:`linear_attention_step`."""
    state, window = a.state, a.window
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
    token = {name: a[name][:, :, 0] for name in ("q", "k", "v", "phi_q", "phi_k")}
    out, new = linear_attention_step(**{**a, **token, "state": current})
    fields = [new.S, new.z]
    if window:
        fields += [new.keys, new.values, new.features, new.valid]
    return [out.unsqueeze(2), *fields]


def _state_shapes(
    k: torch.Tensor, v: torch.Tensor, phi_k: torch.Tensor, window: int
) -> list[torch.Tensor]:
    dtype = compute_dtype(k)
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


@linear_attention_state.register_fake
@signature_of("linear_attention_state")
def _linear_attention_state_fake(a: Arguments) -> list[torch.Tensor]:
    return _state_shapes(a.k, a.v, a.phi_k, a.window)


@linear_attention_decode.register_fake
@signature_of("linear_attention_decode")
def _linear_attention_decode_fake(a: Arguments) -> list[torch.Tensor]:
    q, v = a.q, a.v
    return [q.new_empty((*q.shape[:-1], v.shape[-1])), *(torch.empty_like(s) for s in a.state)]


def _recompute_backward(
    op: str, reference: Callable[..., list[torch.Tensor]], differentiable: tuple[str, ...]
) -> tuple[Callable, Callable]:
    """Autograd for an op returning a list: save its inputs, and in backward recompute
    ``reference`` under autograd and pull the output gradients through it to the
    ``differentiable`` arguments (by name; a list argument's tensors each)."""

    def setup(ctx: object, inputs: tuple, output: object) -> None:
        ctx.inputs = inputs  # type: ignore[attr-defined]

    def backward(ctx: object, grads: list[torch.Tensor | None]) -> tuple:
        inputs = list(ctx.inputs)  # type: ignore[attr-defined]
        names = OPS[op].parameters
        tensor_args = [names.index(name) for name in differentiable]

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


_state_backward, _state_setup = _recompute_backward(
    "linear_attention_state", linear_attention_state_reference, ("k", "v", "phi_k", "decay")
)
linear_attention_state.register_autograd(_state_backward, setup_context=_state_setup)
_decode_backward, _decode_setup = _recompute_backward(
    "linear_attention_decode",
    linear_attention_decode_reference,
    ("q", "k", "v", "phi_q", "phi_k", "decay", "window_gate", "state"),
)
linear_attention_decode.register_autograd(_decode_backward, setup_context=_decode_setup)


def _state_samples(s: SampleSource) -> list[tuple]:
    t = sample_tensors(s)
    k, v, pk, mask, decay = t["k"], t["v"], t["pk"], t["mask"], t["decay"]
    return [(k, v, pk, mask, decay, 0), (k, v, pk, None, None, 4)]


def _decode_samples(s: SampleSource) -> list[tuple]:
    t = sample_tensors(s)
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
