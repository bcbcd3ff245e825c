"""ONNX translations of the ``rewriter::`` ops this backend lowers natively (:data:`NATIVE`), and
of ``aten.rms_norm`` as one fused ORT kernel, gathered by :func:`translation_table` for the
exporter.

``aten.rms_norm`` becomes ``RMSNormalization`` (opset 23, CPU kernel since ORT 1.23); below opset
23 it becomes ORT's ``SimplifiedLayerNormalization`` instead of a chain of ReduceMean / Pow / Sqrt
nodes. ``shiftquant_linear`` becomes ``com.microsoft::MatMulNBits`` where ORT runs its bit width.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import onnx
import torch
import torch.fx
from rewriter.backends.onnx.attention import linear_attention

from rewriter import ops

__all__ = ["NATIVE", "nbits_native", "translation_table"]


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
    "linear_attention": linear_attention,
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
