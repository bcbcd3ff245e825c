"""ONNX Runtime backend: export a rewritten graph, run it, and check it against the graph.

Lowering goes through ``torch.onnx.export(..., dynamo=True)`` on the traced GraphModule (a
re-export with the dynamic shapes recorded at trace time) and a translation table for the
``rewriter::`` ops this backend lowers natively (:data:`NATIVE`). Any other ``rewriter::`` op is
replaced by its ATen decomposition first (the op contract); an op with neither is refused with an
error naming the op and the node.

Fused ORT kernels are used where they exist: ``aten.rms_norm`` becomes ``RMSNormalization``
(opset 23, CPU kernel since ORT 1.23); below opset 23 it becomes ORT's
``SimplifiedLayerNormalization`` instead of a chain of ReduceMean / Pow / Sqrt nodes.

Two exporter traps are handled, each with a regression test:

* **silent opset fallback**: when the final version conversion fails, the exporter logs a
  warning and leaves the model at opset 18, which is invalid if the graph uses newer ops. The
  exported opset is checked and a mismatch raises :class:`OnnxExportError`.
* **fused RotaryEmbedding with dynamic batch**: at opset 23 the exporter's optimizer fuses
  rotary position embeddings into ``RotaryEmbedding`` nodes whose cos/sin caches keep batch 1,
  and ORT then fails on any other batch size ("cos_cache ... expected same shape as x"). When the
  batch is dynamic and the optimized model has such a node, the unoptimized graph (the model is
  exported once, then optimized) is kept instead (ORT's own graph optimizations still run at
  session start).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
import torch.fx
from rewriter.backends.base import (
    Backend,
    Exported,
    Measurement,
    artifact_bytes,
    example_inputs,
    time_calls,
)

from rewriter import ops
from rewriter.errors import LoweringError, RewriterError
from rewriter.ir.graph import copy_graph_module, output_names
from rewriter.ir.trace import TraceInfo, trace_info
from rewriter.verify import ErrorReport, compare_outputs, graph_reference

__all__ = [
    "NATIVE",
    "OnnxBackend",
    "OnnxExport",
    "OnnxExportError",
    "OrtCausalLM",
    "check",
    "export",
    "export_causal_lm",
    "nbits_native",
    "run",
    "session",
]

DEFAULT_OPSET = 23


class OnnxExportError(RewriterError):
    """The exporter produced something other than what was asked for."""


# --- translations of rewriter:: ops ---------------------------------------------------------------


def _crms_norm(x: Any, eps: float) -> Any:
    """``x / sqrt((sum x^2 + (sum x)^2) / (n + 1) + eps)`` in float32 for half inputs."""
    from onnxscript import opset18 as op

    compute = op.Cast(x, to=onnx.TensorProto.FLOAT) if _is_half(x) else x
    width = op.CastLike(op.Add(op.Shape(compute, start=-1), op.Constant(value_int=1)), compute)
    axes = op.Constant(value_ints=[-1])
    implied = op.ReduceSum(compute, axes, keepdims=1)
    squares = op.ReduceSum(op.Mul(compute, compute), axes, keepdims=1)
    mean_square = op.Div(op.Add(squares, op.Mul(implied, implied)), width)
    epsilon = op.CastLike(op.Constant(value_float=float(eps)), compute)
    result = op.Div(compute, op.Sqrt(op.Add(mean_square, epsilon)))
    return op.CastLike(result, x) if _is_half(x) else result


def _l1_norm(x: Any, weight: Any, bias: Any, eps: float, centered: bool, factor: float) -> Any:
    """``d / (factor * mean|d| + eps) * weight + bias``, ``d = x - mean(x)`` or ``x``."""
    from onnxscript import opset18 as op

    compute = op.Cast(x, to=onnx.TensorProto.FLOAT) if _is_half(x) else x
    axes = op.Constant(value_ints=[-1])
    d = op.Sub(compute, op.ReduceMean(compute, axes, keepdims=1)) if centered else compute
    mad = op.ReduceMean(op.Abs(d), axes, keepdims=1)
    constant = op.CastLike(op.Constant(value_float=float(factor)), compute)
    epsilon = op.CastLike(op.Constant(value_float=float(eps)), compute)
    result = op.Div(d, op.Add(op.Mul(mad, constant), epsilon))
    if weight is not None:
        result = op.Mul(result, op.CastLike(weight, result))
    if bias is not None:
        result = op.Add(result, op.CastLike(bias, result))
    return op.CastLike(result, x) if _is_half(x) else result


def _shiftquant_linear(
    x: Any,
    packed: Any,
    exponents: Any,
    bias: Any,
    bits: int,
    group: int,
    in_features: int,
    act_bits: int,
    *,
    accuracy_level: int,
    nbits_native: frozenset[int],
) -> Any:
    """``com.microsoft::MatMulNBits`` for the bit widths ORT runs; otherwise the codes are
    unpacked (int32 arithmetic on the packed bytes) into a blocked ``DequantizeLinear`` and a
    ``MatMul``. The power-of-two scales become float scales ``2**e`` (exact)."""
    from onnxscript import opset18 as op

    out_features = int(packed.shape[0])
    if act_bits:
        x = _quantize_activations_onnx(x, act_bits)
    scales = op.CastLike(
        op.Pow(op.Constant(value_float=2.0), op.Cast(exponents, to=onnx.TensorProto.FLOAT)), x
    )
    if bits in nbits_native:
        inputs = [x, packed, scales] + ([None, None, bias] if bias is not None else [])
        return _msft().MatMulNBits(
            *inputs,
            K=int(in_features),
            N=out_features,
            bits=int(bits),
            block_size=int(group),
            accuracy_level=int(accuracy_level),
        )
    codes = _unpack_onnx(packed, int(bits), int(group))  # int64 [N, groups, group]
    signed = op.Cast(
        op.Reshape(
            op.Sub(codes, op.Constant(value_int=2 ** (bits - 1))),
            op.Constant(value_ints=[out_features, -1]),
        ),
        to=onnx.TensorProto.INT8,
    )
    from onnxscript import opset23

    weight = opset23.DequantizeLinear(signed, scales, axis=1, block_size=int(group))
    weight = op.Slice(
        weight,
        op.Constant(value_ints=[0]),
        op.Constant(value_ints=[int(in_features)]),
        op.Constant(value_ints=[1]),
    )
    result = op.MatMul(x, op.Transpose(weight, perm=[1, 0]))
    return op.Add(result, op.CastLike(bias, result)) if bias is not None else result


def _unpack_onnx(packed: Any, bits: int, group: int) -> Any:
    """Codes of packed uint8 ``[N, groups, group*bits/8]`` as int64 ``[N, groups, group]``.

    Code ``i`` is ``((byte[j] + 256 byte[j+1]) / 2**s) mod 2**bits``, ``j, s = divmod(i bits, 8)``.
    """
    from onnxscript import opset18 as op

    blob = group * bits // 8
    low = [(i * bits) // 8 for i in range(group)]
    high = [min(j + 1, blob - 1) for j in low]
    shift = [2 ** ((i * bits) % 8) for i in range(group)]
    values = op.Cast(packed, to=onnx.TensorProto.INT64)  # Constant(value_int) is int64
    low_bytes = op.Gather(values, op.Constant(value_ints=low), axis=2)
    high_bytes = op.Gather(values, op.Constant(value_ints=high), axis=2)
    word = op.Add(low_bytes, op.Mul(high_bytes, op.Constant(value_int=256)))
    return op.Mod(op.Div(word, op.Constant(value_ints=shift)), op.Constant(value_int=2**bits))


def _quantize_activations_onnx(x: Any, bits: int) -> Any:
    """Per-row power-of-two rounding, computed exactly as :func:`rewriter.ops.quant.ceil_log2`."""
    import math

    from onnxscript import opset18 as op

    top = 2 ** (bits - 1) - 1
    xs = op.Cast(x, to=onnx.TensorProto.FLOAT)
    amax = op.ReduceMax(op.Abs(xs), op.Constant(value_ints=[-1]), keepdims=1)
    one = op.Constant(value_float=1.0)
    safe = op.Where(op.Greater(amax, op.Constant(value_float=0.0)), amax, one)
    ratio = op.Div(safe, op.Constant(value_float=float(top)))
    two = op.Constant(value_float=2.0)
    nearest = op.Round(op.Div(op.Log(ratio), op.Constant(value_float=math.log(2.0))))
    exponent = op.Add(
        nearest, op.Cast(op.Less(op.Pow(two, nearest), ratio), to=onnx.TensorProto.FLOAT)
    )
    exponent = op.Clip(exponent, op.Constant(value_float=-126.0), op.Constant(value_float=127.0))
    scale = op.Pow(two, exponent)
    bound = op.Constant(value_float=float(top))
    rounded = op.Clip(op.Round(op.Div(xs, scale)), op.Neg(bound), bound)
    return op.CastLike(op.Mul(rounded, scale), x)


def _linear_attention(
    q: Any,
    k: Any,
    v: Any,
    phi_q: Any,
    phi_k: Any,
    key_mask: Any,
    decay: Any,
    window_gate: Any,
    causal: bool,
    window: int,
    scale: float,
    eps: float,
    *,
    chunk: int = 64,
) -> Any:
    """``rewriter::linear_attention`` in its chunked form with standard ops, any sequence length.

    The same computation as :func:`rewriter.ops.attention.linear_attention_chunked`: values carry
    a ones column (the normalizer); causal: chunks of ``chunk`` tokens, the masked product within
    a chunk and an exclusive prefix sum of per-chunk states across chunks (``CumSum``; with decay,
    an ``Einsum`` with the chunk-to-chunk decay matrix, exponents never positive); the softmax
    window as a band of ``chunk + window`` keys gathered per chunk. Computed in float32.
    """
    from onnxscript import opset18 as op

    f32 = onnx.TensorProto.FLOAT
    qf, kf, vf = (op.Cast(t, to=f32) for t in (q, k, v))
    fq, fk = op.Cast(phi_q, to=f32), op.Cast(phi_k, to=f32)
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
                    window_gate,
                    int(window),
                    float(scale),
                    chunk,
                ),
            )
    width = op.Shape(vf, start=3, end=4)
    numerator = op.Slice(total, op.Constant(value_ints=[0]), width, op.Constant(value_ints=[3]))
    denominator = op.Slice(
        total, width, op.Add(width, op.Constant(value_ints=[1])), op.Constant(value_ints=[3])
    )
    out = op.Div(numerator, op.Add(denominator, op.Constant(value_float=float(eps))))
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
    import numpy as np

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
    import numpy as np

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


def _msft() -> Any:
    """The ``com.microsoft`` opset with ``MatMulNBits``' schema registered (onnxscript needs it)."""
    from onnxscript import values

    if not _schema_registered("MatMulNBits", "com.microsoft"):
        param = onnx.defs.OpSchema.FormalParameter
        optional = onnx.defs.OpSchema.FormalParameterOption.Optional
        attr = onnx.defs.OpSchema.Attribute
        integer = onnx.defs.OpSchema.AttrType.INT
        floats = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]
        schema = onnx.defs.OpSchema(
            "MatMulNBits",
            "com.microsoft",
            1,
            inputs=[
                param("A", "T1"),
                param("B", "T2"),
                param("scales", "T1"),
                param("zero_points", "T3", param_option=optional),
                param("g_idx", "T4", param_option=optional),
                param("bias", "T1", param_option=optional),
            ],
            outputs=[param("Y", "T1")],
            type_constraints=[
                ("T1", floats, ""),
                ("T2", ["tensor(uint8)", "tensor(int32)"], ""),
                ("T3", ["tensor(uint8)", "tensor(int32)", *floats], ""),
                ("T4", ["tensor(int32)"], ""),
            ],
            attributes=[
                attr("K", integer, ""),
                attr("N", integer, ""),
                attr("bits", integer, ""),
                attr("block_size", integer, ""),
                attr("accuracy_level", integer, ""),
            ],
        )
        onnx.defs.register_schema(schema)
    return values.Opset("com.microsoft", 1)


def nbits_native() -> frozenset[int]:
    """Bit widths ORT's CPU ``MatMulNBits`` runs here: 4 and 8, and 2 from ORT 1.24 on."""
    try:
        import onnxruntime
    except ImportError:
        return frozenset({4, 8})
    version = tuple(int(p) for p in onnxruntime.__version__.split(".")[:2])
    return frozenset({2, 4, 8} if version >= (1, 24) else {4, 8})


def _is_half(value: Any) -> bool:
    dtype = getattr(value, "dtype", None)
    return dtype is not None and str(dtype).upper().endswith(("FLOAT16", "BFLOAT16"))


NATIVE: dict[str, Any] = {
    "crms_norm": _crms_norm,
    "l1_norm": _l1_norm,
    "shiftquant_linear": _shiftquant_linear,
    "linear_attention": _linear_attention,
}
"""``rewriter::`` ops this backend lowers natively, with their ONNX translations (as data)."""


def _rms_norm(
    x: Any, normalized_shape: Sequence[int], weight: Any = None, eps: Any = None, *, opset: int
) -> Any:
    """``aten.rms_norm`` as one fused node: ``RMSNormalization`` (opset 23) or ORT's
    ``SimplifiedLayerNormalization`` below it. A missing weight becomes a constant of ones (the
    exporter would otherwise build it at run time with Shape / ConstantOfShape)."""
    from onnxscript import opset18 as op

    width = int(normalized_shape[-1])
    epsilon = _default_eps(x) if eps is None else float(eps)  # aten: None means finfo(dtype).eps
    if weight is None:
        ones = onnx.helper.make_tensor("ones", onnx.TensorProto.FLOAT, [width], [1.0] * width)
        weight = op.CastLike(op.Constant(value=ones), x)
    axis = -len(normalized_shape)
    if opset >= 23:
        from onnxscript import opset23

        return opset23.RMSNormalization(x, weight, axis=axis, epsilon=epsilon, stash_type=1)
    return _ort_default_domain().SimplifiedLayerNormalization(
        x, weight, axis=axis, epsilon=epsilon, stash_type=1
    )


def _default_eps(x: Any) -> float:
    name = str(getattr(x, "dtype", "")).upper()
    for key, dtype in (
        ("BFLOAT16", torch.bfloat16),
        ("FLOAT16", torch.float16),
        ("DOUBLE", torch.float64),
    ):
        if name.endswith(key):
            return float(torch.finfo(dtype).eps)
    return float(torch.finfo(torch.float32).eps)


def _ort_default_domain() -> Any:
    # SimplifiedLayerNormalization is an ORT contrib op registered in the default domain.
    from onnxscript import values

    if not _schema_registered("SimplifiedLayerNormalization", ""):
        schema = onnx.defs.OpSchema(
            "SimplifiedLayerNormalization",
            "",
            1,
            inputs=[
                onnx.defs.OpSchema.FormalParameter("X", "T"),
                onnx.defs.OpSchema.FormalParameter("scale", "V"),
            ],
            outputs=[onnx.defs.OpSchema.FormalParameter("Y", "V")],
            type_constraints=[
                (
                    "T",
                    ["tensor(float)", "tensor(float16)", "tensor(double)", "tensor(bfloat16)"],
                    "",
                ),
                (
                    "V",
                    ["tensor(float)", "tensor(float16)", "tensor(double)", "tensor(bfloat16)"],
                    "",
                ),
            ],
            attributes=[
                onnx.defs.OpSchema.Attribute("axis", onnx.defs.OpSchema.AttrType.INT, ""),
                onnx.defs.OpSchema.Attribute("epsilon", onnx.defs.OpSchema.AttrType.FLOAT, ""),
                onnx.defs.OpSchema.Attribute("stash_type", onnx.defs.OpSchema.AttrType.INT, ""),
            ],
        )
        onnx.defs.register_schema(schema)
    return values.Opset("", 1)


def _schema_registered(name: str, domain: str) -> bool:
    try:
        onnx.defs.get_schema(name, 1, domain)
    except onnx.defs.SchemaError:
        return False
    return True


def translation_table(
    gm: torch.fx.GraphModule, opset: int, *, accuracy_level: int = 0
) -> dict[Any, Any]:
    """The custom translation table for ``gm`` at ``opset``."""
    table: dict[Any, Any] = {}
    for name in ops.rewriter_nodes(gm):
        if name == "shiftquant_linear":
            table[ops.OPS[name].overload] = functools.partial(
                _shiftquant_linear, accuracy_level=accuracy_level, nbits_native=nbits_native()
            )
        elif name in NATIVE:
            table[ops.OPS[name].overload] = NATIVE[name]
    table[torch.ops.aten.rms_norm.default] = functools.partial(_rms_norm, opset=opset)
    return table


# --- export -------------------------------------------------------------------------------------


@dataclasses.dataclass
class OnnxExport:
    """Where the model went and what the export did."""

    path: Path
    opset: int
    input_names: list[str]
    output_names: list[str]
    dynamic_axes: dict[str, dict[int, str]]
    lowering: dict[str, str]
    """How each ``rewriter::`` op was lowered: ``"native"`` or ``"decomposed"``."""
    optimized: bool
    """Whether the exporter's optimizer ran (off after the RotaryEmbedding trap)."""
    notes: list[str]


def export(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[torch.Tensor] | None = None,
    path: str | os.PathLike[str] = "model.onnx",
    *,
    dynamic_shapes: Any = "trace",
    opset: int = DEFAULT_OPSET,
    optimize: bool = True,
    external_data: bool | None = None,
    accuracy_level: int = 0,
) -> OnnxExport:
    """Export ``gm`` to an ONNX file that ONNX Runtime runs.

    ``dynamic_shapes="trace"`` reuses the dims recorded when the graph was traced (None: static).
    ``accuracy_level`` goes into every ``MatMulNBits`` node (quantized linears): 0 computes in
    the input's float type (exact), 4 lets ORT quantize activations to int8 (fast on CPU, not
    exact).

    Example::

        >>> result = rewriter.backends.onnx.export(gm, (input_ids,), "out/model.onnx")
        >>> rewriter.backends.onnx.check(gm, result.path).ok
        True
    """
    info = trace_info(gm)
    _, args, kwargs = _call_inputs(gm, info, example_inputs)
    spec = (
        info.dynamic_shapes
        if (dynamic_shapes == "trace" and info is not None)
        else (None if dynamic_shapes == "trace" else dynamic_shapes)
    )
    plan = ops.check_lowerable(gm, "onnx", native=set(NATIVE))
    work = gm
    decomposed = [name for name, how in plan.items() if how == "decomposed"]
    if decomposed:
        work = ops.decompose(copy_graph_module(gm), decomposed)
    table = translation_table(work, opset, accuracy_level=accuracy_level)
    names = (list(info.input_names) if info is not None else None, output_names(gm))
    # Exported once without the optimizer, which then runs on the program: when its result has
    # the rotary trap, the unoptimized graph is kept (exporting again cost a second export).
    program = _export(work, args, kwargs, spec, opset, table, False, names)
    notes: list[str] = []
    optimized = False
    if optimize:
        plain = program.model.clone()
        program.optimize()
        optimized = True
        if _rotary_trap(program.model_proto, spec):
            notes.append(
                "kept the exporter's graph unoptimized (its optimizer fuses RotaryEmbedding, "
                "which breaks dynamic batch)"
            )
            program.model = plain
            optimized = False
    _check_opset(program.model_proto, opset)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    program.save(str(path), external_data=external_data)
    proto = program.model_proto
    return OnnxExport(
        path=path,
        opset=opset,
        input_names=[i.name for i in proto.graph.input],
        output_names=[o.name for o in proto.graph.output],
        dynamic_axes=_dynamic_axes(proto),
        lowering=plan,
        optimized=optimized,
        notes=notes,
    )


def _call_inputs(
    gm: torch.fx.GraphModule, info: TraceInfo | None, example_inputs: Sequence[torch.Tensor] | None
) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...], dict[str, torch.Tensor]]:
    if example_inputs is None:
        if info is None:
            raise ValueError("export() needs example_inputs for a graph not made by rewriter.trace")
        example_inputs = info.example_inputs
    inputs = tuple(example_inputs)
    if info is None:
        return inputs, inputs, {}
    args, kwargs = info.call_inputs(inputs)
    return inputs, args, kwargs


def _export(
    gm: torch.fx.GraphModule,
    args: tuple[torch.Tensor, ...],
    kwargs: dict[str, torch.Tensor],
    spec: Any,
    opset: int,
    table: dict[Any, Any],
    optimize: bool,
    names: tuple[list[str] | None, list[str]],
) -> Any:
    with _quiet_exporter():
        try:
            return torch.onnx.export(
                gm,
                args,
                kwargs=kwargs or None,
                dynamo=True,
                opset_version=opset,
                dynamic_shapes=spec,
                custom_translation_table=table or None,
                input_names=names[0],
                output_names=names[1],
                optimize=optimize,
                report=False,
                verify=False,
            )
        except Exception as error:
            raise _explain(error, gm) from error


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    loggers = [logging.getLogger(n) for n in ("onnxscript", "torch.onnx", "onnx_ir")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(open(os.devnull, "w")):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _explain(error: Exception, gm: torch.fx.GraphModule) -> Exception:
    text = str(error)
    for node in gm.graph.nodes:
        if node.op == "call_function" and str(node.target) in text:
            return LoweringError(
                f"ONNX export failed on {node.target}: {text.splitlines()[0]}", node
            )
    return OnnxExportError(
        f"ONNX export failed: {text.strip().splitlines()[0] if text.strip() else error!r}"
    )


def _opset_of(proto: onnx.ModelProto) -> int | None:
    for entry in proto.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    return None


def _check_opset(proto: onnx.ModelProto, requested: int) -> None:
    actual = _opset_of(proto)
    if actual != requested:
        raise OnnxExportError(
            f"asked for opset {requested} but the exporter produced opset {actual}: its version "
            "conversion failed and it kept the model it started from. The model is not valid at "
            f"opset {actual} if it uses newer ops; export at opset {actual}, or check which op "
            "has no version adapter."
        )


def _rotary_trap(proto: onnx.ModelProto, spec: Any) -> bool:
    if not any(node.op_type == "RotaryEmbedding" for node in proto.graph.node):
        return False
    return _has_dynamic_batch(spec)


def _has_dynamic_batch(spec: Any) -> bool:
    entries = spec.values() if isinstance(spec, dict) else (spec or ())
    return any(isinstance(entry, dict) and 0 in entry for entry in entries)


def _dynamic_axes(proto: onnx.ModelProto) -> dict[str, dict[int, str]]:
    axes: dict[str, dict[int, str]] = {}
    for value in proto.graph.input:
        for i, dim in enumerate(value.type.tensor_type.shape.dim):
            if dim.dim_param:
                axes.setdefault(value.name, {})[i] = dim.dim_param
    return axes


# --- running --------------------------------------------------------------------------------------


def session(
    path: str | os.PathLike[str],
    *,
    threads: int | None = None,
    accuracy_level: int | None = None,
    optimized_model_path: str | None = None,
    spinning: bool = True,
) -> Any:
    """An ORT CPU ``InferenceSession``; ``accuracy_level=0`` makes fused quantized matmuls exact.

    ``spinning=False`` stops ORT's worker threads from busy-waiting between runs (they would
    otherwise steal the CPU from whatever runs next: benchmarks that interleave runtimes).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads is not None:
        options.intra_op_num_threads = threads
    if accuracy_level is not None:
        options.add_session_config_entry(
            "session.qdq_matmulnbits_accuracy_level", str(accuracy_level)
        )
    if optimized_model_path is not None:
        options.optimized_model_filepath = optimized_model_path
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run(sess: Any, inputs: Sequence[torch.Tensor] | dict[str, torch.Tensor]) -> list[np.ndarray]:
    """Run a session on flat inputs (in the model's input order) or a name -> tensor dict."""
    names = [i.name for i in sess.get_inputs()]
    if isinstance(inputs, dict):
        feeds = {k: _numpy(v) for k, v in inputs.items()}
    else:
        if len(inputs) != len(names):
            raise ValueError(f"the ONNX model takes inputs {names}, got {len(inputs)} tensors")
        feeds = {name: _numpy(t) for name, t in zip(names, inputs)}
    return sess.run(None, feeds)


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    if tensor.dtype == torch.bfloat16:
        raise OnnxExportError("bfloat16 inputs have no numpy type; feed float32 or use IO binding")
    return tensor.detach().cpu().numpy()


def check(
    gm: torch.fx.GraphModule,
    path: str | os.PathLike[str],
    inputs: Sequence[torch.Tensor] | None = None,
    *,
    rtol: float | None = None,
    atol: float | None = None,
    sess: Any = None,
) -> ErrorReport:
    """Run ``gm`` and the ONNX model on the same inputs and report the error (tolerance rule)."""
    inputs, reference = graph_reference(gm, inputs)
    sess = sess or session(path)
    got = [torch.from_numpy(np.asarray(a)) for a in run(sess, inputs)]
    return compare_outputs(reference, got, rtol, atol)


# --- causal LMs with a KV cache (rewriter.deploy) ----------------------------------------------


@dataclasses.dataclass
class OrtCausalLM:
    """ONNX Runtime sessions of a prefill and a decode graph, run by ``rewriter.deploy.generate``.

    The cache stays in ORT-owned memory between steps when ``io_binding`` is on: each step's
    outputs are bound as the next step's inputs without a copy through numpy.
    """

    prefill: Any
    decode: Any
    cache: tuple[tuple[int, int], ...]
    vocab: Any = None
    io_binding: bool = True

    def run_prefill(
        self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor
    ) -> tuple[torch.Tensor, list[Any]]:
        feeds = dict(zip(_names(self.prefill), (ids.numpy(), mask.numpy(), pos.numpy())))
        if not self.io_binding:
            out = self.prefill.run(None, feeds)
            return torch.from_numpy(out[0]), list(out[1:])
        binding = self.prefill.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, value)
        for output in self.prefill.get_outputs():
            binding.bind_output(output.name, "cpu")
        self.prefill.run_with_iobinding(binding)
        values = binding.get_outputs()
        return torch.from_numpy(values[0].numpy()), list(values[1:])

    def run_decode(
        self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache: list[Any]
    ) -> tuple[torch.Tensor, list[Any]]:
        names = _names(self.decode)
        if not self.io_binding:
            feeds = dict(zip(names, (ids.numpy(), mask.numpy(), pos.numpy(), *cache)))
            out = self.decode.run(None, feeds)
            return torch.from_numpy(out[0]), list(out[1:])
        binding = self.decode.io_binding()
        for name, value in zip(names[:3], (ids.numpy(), mask.numpy(), pos.numpy())):
            binding.bind_cpu_input(name, value)
        for name, value in zip(names[3:], cache):
            binding.bind_ortvalue_input(name, value)  # the previous step's output, no copy
        for output in self.decode.get_outputs():
            binding.bind_output(output.name, "cpu")
        self.decode.run_with_iobinding(binding)
        values = binding.get_outputs()
        return torch.from_numpy(values[0].numpy()), list(values[1:])


def _names(session: Any) -> list[str]:
    return [i.name for i in session.get_inputs()]


_check_against_graph = check  # export_causal_lm's ``check`` flag shadows the function


def export_causal_lm(
    graphs: Any,
    directory: str | Path,
    *,
    threads: int | None = None,
    io_binding: bool = True,
    check: bool = True,
    **export_options: Any,
) -> OrtCausalLM:
    """Export the prefill and decode graphs of ``rewriter.deploy.split`` to ``directory``
    (``prefill.onnx``, ``decode.onnx``), check each in ONNX Runtime against its graph (``check``;
    turn it off for approximate lowerings such as ``accuracy_level=4``), and return sessions that
    ``rewriter.deploy.generate`` runs."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    sessions = []
    for name, gm in (("prefill", graphs.prefill), ("decode", graphs.decode)):
        exported = export(gm, None, directory / f"{name}.onnx", **export_options)
        if check:
            report = _check_against_graph(gm, exported.path)
            if not report.ok:
                raise RewriterError(
                    f"the {name} graph in ONNX Runtime differs from torch: {report}"
                )
        sessions.append(session(exported.path, threads=threads))
    return OrtCausalLM(sessions[0], sessions[1], graphs.cache, graphs.vocab, io_binding)


# --- the shared backend interface (rewriter.backends.base) ---------------------------------------


class OnnxBackend(Backend):
    """ONNX Runtime on CPU through the shared interface: ``model.onnx`` in the output folder."""

    name = "onnx"
    summary = "an ONNX file run by ONNX Runtime (CPU)"
    label = "ONNX Runtime"
    options = ("opset", "accuracy_level")
    streams = True

    def available(self) -> tuple[bool, str]:
        import importlib.util

        if importlib.util.find_spec("onnxruntime") is None:
            return False, "onnxruntime is not installed"
        return True, "ONNX Runtime, CPUExecutionProvider"

    def native(self) -> frozenset[str]:
        return frozenset(NATIVE)

    def export(
        self,
        gm: torch.fx.GraphModule,
        inputs: Sequence[torch.Tensor] | None,
        out: str | os.PathLike[str],
        *,
        large: bool = False,
        **options: Any,
    ) -> Exported:
        result = export(
            gm, inputs, Path(out) / "model.onnx", external_data=True if large else None, **options
        )
        info = {"opset": result.opset, "lowering": result.lowering, "notes": result.notes}
        return Exported(self.name, result.path, result, info, example_inputs(gm, inputs))

    def check(
        self,
        gm: torch.fx.GraphModule,
        exported: Exported,
        inputs: Sequence[torch.Tensor] | None = None,
    ) -> ErrorReport:
        return check(gm, exported.path, inputs)

    def measure(
        self,
        exported: Exported,
        inputs: Sequence[torch.Tensor] | None = None,
        *,
        repeats: int = 10,
        threads: int = 1,
    ) -> Measurement:
        sess = session(exported.path, threads=threads, spinning=False)
        feeds = list(exported.inputs if inputs is None else inputs)
        median, low, high = time_calls(lambda: run(sess, feeds), repeats)
        size = artifact_bytes(exported.path) + sum(
            artifact_bytes(p) for p in exported.path.parent.glob(exported.path.name + "*.data")
        )
        return Measurement(self.name, median, low, high, repeats, size, {"threads": threads})
