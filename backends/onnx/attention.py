"""``rewriter::linear_attention`` in ONNX: the chunked causal form (prefix sums of per-chunk
states, with or without decay) and the softmax window as a band of keys gathered per chunk, in
standard ops for any sequence length."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx

from rewriter.ops import Arguments, signature_of

__all__ = ["linear_attention"]


@signature_of("linear_attention")
def linear_attention(a: Arguments, /, *, chunk: int = 64) -> Any:
    """``rewriter::linear_attention`` in its chunked form with standard ops, any sequence length.

    The same computation as :func:`rewriter.ops.attention.linear_attention_chunked`: values carry
    a ones column (the normalizer); causal: chunks of ``chunk`` tokens, the masked product within
    a chunk and an exclusive prefix sum of per-chunk states across chunks (``CumSum``; with decay,
    an ``Einsum`` with the chunk-to-chunk decay matrix, exponents never positive); the softmax
    window as a band of ``chunk + window`` keys gathered per chunk. Computed in float32. Takes
    the op's arguments by its schema (:func:`rewriter.ops.signature_of`), like the exporter
    passes them.
    """
    from onnxscript import opset18 as op

    q, key_mask, decay, window, causal = a.q, a.key_mask, a.decay, a.window, a.causal
    f32 = onnx.TensorProto.FLOAT
    qf, kf, vf = (op.Cast(t, to=f32) for t in (q, a.k, a.v))
    fq, fk = op.Cast(a.phi_q, to=f32), op.Cast(a.phi_k, to=f32)
    ones = op.Expand(
        op.Constant(value_float=1.0),
        op.Concat(op.Shape(vf, end=3), op.Constant(value_ints=[1]), axis=0),
    )
    if key_mask is not None:
        keep = op.Unsqueeze(op.Cast(key_mask, to=f32), op.Constant(value_ints=[1, 3]))  # [B,1,T,1]
        fk = op.Mul(fk, keep)
        ones = op.Mul(ones, keep)
    values = op.Concat(vf, ones, axis=-1)  # [B, H, T, Dv + 1]
    if not causal:
        total = op.MatMul(fq, op.MatMul(op.Transpose(fk, perm=[0, 1, 3, 2]), values))
    else:
        log_gamma = None if decay is None else op.Log(op.Cast(decay, to=f32))  # [H]
        total = _causal_linear_onnx(op, fq, fk, values, log_gamma, int(window), chunk)
        if window:
            total = op.Add(
                total,
                _window_onnx(
                    op,
                    qf,
                    kf,
                    values,
                    key_mask,
                    log_gamma,
                    a.window_gate,
                    int(window),
                    float(a.scale),
                    chunk,
                ),
            )
    width = op.Shape(vf, start=3, end=4)
    numerator = op.Slice(total, op.Constant(value_ints=[0]), width, op.Constant(value_ints=[3]))
    denominator = op.Slice(
        total, width, op.Add(width, op.Constant(value_ints=[1])), op.Constant(value_ints=[3])
    )
    out = op.Div(numerator, op.Add(denominator, op.Constant(value_float=float(a.eps))))
    return op.CastLike(out, q)


def _chunks(op: Any, x: Any, chunk: int) -> tuple[Any, Any, Any]:
    """``x`` [B, H, T, E] padded to whole chunks and viewed as [B, H, n, chunk, E]; (view, n, T)."""
    length = op.Shape(x, start=2, end=3)
    c = op.Constant(value_ints=[chunk])
    n = op.Div(op.Add(length, op.Constant(value_ints=[chunk - 1])), c)
    pad = op.Sub(op.Mul(n, c), length)
    zeros2 = op.Constant(value_ints=[0, 0])
    zero1 = op.Constant(value_ints=[0])
    pads = op.Concat(zeros2, zero1, zero1, zeros2, pad, zero1, axis=0)
    padded = op.Pad(x, pads)
    shape = op.Concat(op.Shape(x, end=2), n, c, op.Shape(x, start=3, end=4), axis=0)
    return op.Reshape(padded, shape), n, length


def _unchunk(op: Any, x: Any, length: Any) -> Any:
    shape = op.Concat(
        op.Shape(x, end=2), op.Constant(value_ints=[-1]), op.Shape(x, start=4, end=5), axis=0
    )
    flat = op.Reshape(x, shape)
    return op.Slice(flat, op.Constant(value_ints=[0]), length, op.Constant(value_ints=[2]))


def _decay_powers(op: Any, log_gamma: Any, exponents: Any, shape_tail: list[int]) -> Any:
    """``exp(exponents * log_gamma_h)`` shaped [H, *shape_tail] (exponents float, >= 0)."""
    lg = op.Reshape(log_gamma, op.Constant(value_ints=[-1] + [1] * len(shape_tail)))
    return op.Exp(op.Mul(lg, exponents))


def _causal_linear_onnx(
    op: Any, fq: Any, fk: Any, values: Any, log_gamma: Any, lag: int, chunk: int
) -> Any:

    f32 = onnx.TensorProto.FLOAT
    if lag:
        length = op.Shape(fk, start=2, end=3)
        front = op.Constant(value_ints=[0, 0, lag, 0, 0, 0, 0, 0])
        start, axis = op.Constant(value_ints=[0]), op.Constant(value_ints=[2])
        fk = op.Slice(op.Pad(fk, front), start, length, axis)
        values = op.Slice(op.Pad(values, front), start, length, axis)
    qc, n, length = _chunks(op, fq, chunk)
    kc, _, _ = _chunks(op, fk, chunk)
    vc, _, _ = _chunks(op, values, chunk)
    rel = np.subtract.outer(np.arange(chunk), np.arange(chunk)).astype(np.float32)
    causal = op.Constant(value=onnx.numpy_helper.from_array((rel >= 0).astype(np.float32), "tril"))
    scores = op.MatMul(qc, op.Transpose(kc, perm=[0, 1, 2, 4, 3]))  # [B,H,n,C,C]
    if log_gamma is not None:
        distance = op.Constant(
            value=onnx.numpy_helper.from_array(np.maximum(rel, 0)[None, None], "rel")
        )
        scores = op.Mul(scores, op.Mul(_decay_powers(op, log_gamma, distance, [1, 1, 1]), causal))
    else:
        scores = op.Mul(scores, causal)
    intra = op.MatMul(scores, vc)
    if log_gamma is None:
        updates = op.MatMul(op.Transpose(kc, perm=[0, 1, 2, 4, 3]), vc)  # [B,H,n,F,E]
        states = op.CumSum(updates, op.Constant(value_int=2), exclusive=1)
        inter = op.MatMul(qc, states)
    else:
        tail = np.arange(chunk - 1, -1, -1, dtype=np.float32).reshape(1, 1, chunk, 1)
        key_weight = _decay_powers(
            op, log_gamma, op.Constant(value=onnx.numpy_helper.from_array(tail, "kw")), [1, 1, 1]
        )
        updates = op.MatMul(op.Transpose(op.Mul(kc, key_weight), perm=[0, 1, 2, 4, 3]), vc)
        m = op.Cast(
            op.Range(
                op.Constant(value_int=0),
                op.Squeeze(n, op.Constant(value_ints=[0])),
                op.Constant(value_int=1),
            ),
            to=f32,
        )
        steps = op.Sub(
            op.Sub(op.Unsqueeze(m, op.Constant(value_ints=[1])), op.Constant(value_float=1.0)),
            op.Unsqueeze(m, op.Constant(value_ints=[0])),
        )
        valid = op.Cast(op.GreaterOrEqual(steps, op.Constant(value_float=0.0)), to=f32)
        exponent = op.Mul(op.Relu(steps), op.Constant(value_float=float(chunk)))
        carry = op.Mul(_decay_powers(op, log_gamma, exponent, [1, 1]), valid)  # [H, n, n]
        states = op.Einsum(carry, updates, equation="hnm,bhmfd->bhnfd")
        head = np.arange(1, chunk + 1, dtype=np.float32).reshape(1, 1, chunk, 1)
        query_weight = _decay_powers(
            op, log_gamma, op.Constant(value=onnx.numpy_helper.from_array(head, "qw")), [1, 1, 1]
        )
        inter = op.MatMul(op.Mul(qc, query_weight), states)
    total = _unchunk(op, op.Add(intra, inter), length)
    if lag and log_gamma is not None:
        total = op.Mul(
            total,
            op.Reshape(
                op.Exp(op.Mul(log_gamma, op.Constant(value_float=float(lag)))),
                op.Constant(value_ints=[-1, 1, 1]),
            ),
        )
    return total


def _window_onnx(
    op: Any,
    q: Any,
    k: Any,
    values: Any,
    key_mask: Any,
    log_gamma: Any,
    gate: Any,
    window: int,
    scale: float,
    chunk: int,
) -> Any:

    f32 = onnx.TensorProto.FLOAT
    qc, n, length = _chunks(op, q, chunk)
    nn = op.Squeeze(n, op.Constant(value_ints=[0]))
    # Key block of chunk j: padded positions j*C .. j*C + C + w - 1 (keys j*C - w .. j*C + C - 1).
    starts = op.Mul(
        op.Range(op.Constant(value_int=0), nn, op.Constant(value_int=1)),
        op.Constant(value_int=chunk),
    )
    offsets = op.Constant(value_ints=list(range(chunk + window)))
    index = op.Add(
        op.Unsqueeze(starts, op.Constant(value_ints=[1])),
        op.Unsqueeze(offsets, op.Constant(value_ints=[0])),
    )
    pad = op.Sub(op.Mul(n, op.Constant(value_ints=[chunk])), length)
    zeros2, zero1 = op.Constant(value_ints=[0, 0]), op.Constant(value_ints=[0])
    pads = op.Concat(zeros2, op.Constant(value_ints=[window]), zero1, zeros2, pad, zero1, axis=0)
    kb = op.Gather(op.Pad(k, pads), index, axis=2)  # [B,H,n,C+w,D]
    vb = op.Gather(op.Pad(values, pads), index, axis=2)
    present = (
        op.Cast(key_mask, to=f32)
        if key_mask is not None
        else op.Expand(op.Constant(value_float=1.0), op.Concat(op.Shape(q, end=1), length, axis=0))
    )
    mask_pads = op.Concat(zero1, op.Constant(value_ints=[window]), zero1, pad, axis=0)
    mb = op.Gather(op.Pad(present, mask_pads), index, axis=1)  # [B, n, C+w]
    a = np.arange(chunk).reshape(chunk, 1)
    b = np.arange(chunk + window).reshape(1, chunk + window)
    band = ((b > a) & (b <= a + window)).astype(np.float32)
    distance = (a + window - b).astype(np.float32)
    valid = op.Mul(
        op.Unsqueeze(mb, op.Constant(value_ints=[1, 3])),
        op.Constant(value=onnx.numpy_helper.from_array(band, "band")),
    )
    scores = op.Mul(
        op.MatMul(qc, op.Transpose(kb, perm=[0, 1, 2, 4, 3])), op.Constant(value_float=scale)
    )
    if log_gamma is not None:
        dist = op.Constant(value=onnx.numpy_helper.from_array(distance[None, None], "dist"))
        scores = op.Add(
            scores, op.Mul(op.Reshape(log_gamma, op.Constant(value_ints=[-1, 1, 1, 1])), dist)
        )
    masked = op.Where(
        op.Cast(valid, to=onnx.TensorProto.BOOL), scores, op.Constant(value_float=-np.inf)
    )
    shift = op.ReduceMax(masked, op.Constant(value_ints=[-1]), keepdims=1)
    shift = op.Where(op.IsInf(shift), op.Constant(value_float=0.0), shift)
    weights = op.Mul(op.Exp(op.Sub(masked, shift)), valid)
    if gate is not None:
        weights = op.Mul(
            weights, op.Reshape(op.Cast(gate, to=f32), op.Constant(value_ints=[-1, 1, 1, 1]))
        )
    return _unchunk(op, op.MatMul(weights, vb), length)
