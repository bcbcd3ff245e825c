"""HLS lowerings of the ops a rewritten transformer graph contains (registered into
:data:`rewriter.backends.hls.emit.HANDLERS`)."""

from __future__ import annotations

import math

import torch
import torch.fx
from rewriter.backends.hls.emit import TABLE_POINTS, Lowering, Value, handles

from rewriter import ops
from rewriter.errors import LoweringError

aten = torch.ops.aten
rw = torch.ops.rewriter


def _operands(node: torch.fx.Node, count: int) -> list:
    """The first ``count`` arguments of an op node in schema order, bound by name (kwargs too)."""
    return list(ops.arguments(node).values())[:count]


# --- elementwise ----------------------------------------------------------------------------------


@handles(aten.add.Tensor, aten.add.Scalar)
def _add(lo: Lowering, node: torch.fx.Node) -> None:
    args = ops.arguments(node)
    alpha, pair = args["alpha"], [args["self"], args["other"]]
    operands = [lo.operand(a, node)[0] for a in pair]
    if alpha == 1 and all(v is not None for v in operands):
        a, b = operands
        if a.shape == b.shape == tuple(lo.values[node].shape):  # a residual add
            out = lo._local(node)
            lo.call("add", [a.ctype, b.ctype, out.ctype, out.size], [a.name, b.name, out.name])
            lo.layer(node, "residual_add", size=out.size)
            return
    if alpha != 1:
        lo.elementwise(node, pair, lambda a: f"{a[0]} + acc_t({float(alpha)!r}) * {a[1]}")
    else:
        lo.elementwise(node, pair, lambda a: f"{a[0]} + {a[1]}")
    lo.layer(node, "add")


@handles(aten.sub.Tensor, aten.sub.Scalar)
def _sub(lo: Lowering, node: torch.fx.Node) -> None:
    args = ops.arguments(node)
    pair, alpha = [args["self"], args["other"]], args["alpha"]
    if alpha != 1:
        lo.elementwise(node, pair, lambda a: f"{a[0]} - acc_t({float(alpha)!r}) * {a[1]}")
    else:
        lo.elementwise(node, pair, lambda a: f"{a[0]} - {a[1]}")


@handles(aten.mul.Tensor, aten.mul.Scalar)
def _mul(lo: Lowering, node: torch.fx.Node) -> None:
    lo.elementwise(node, _operands(node, 2), lambda a: f"{a[0]} * {a[1]}")
    lo.layer(node, "mul")


@handles(aten.div.Tensor, aten.div.Scalar)
def _div(lo: Lowering, node: torch.fx.Node) -> None:
    lo.elementwise(node, _operands(node, 2), lambda a: f"{a[0]} / {a[1]}")


@handles(aten.neg.default)
def _neg(lo: Lowering, node: torch.fx.Node) -> None:
    lo.elementwise(node, _operands(node, 1), lambda a: f"-{a[0]}")


@handles(aten.pow.Tensor_Scalar)
def _pow(lo: Lowering, node: torch.fx.Node) -> None:
    base, exponent = _operands(node, 2)
    if float(exponent) != int(exponent) or not 1 <= int(exponent) <= 4:
        raise LoweringError(f"hls export: pow with exponent {exponent} (integers 1..4 only)", node)
    lo.elementwise(node, [base], lambda a: " * ".join([f"({a[0]})"] * int(exponent)))


@handles(aten.relu.default)
def _relu(lo: Lowering, node: torch.fx.Node) -> None:
    lo.elementwise(node, _operands(node, 1), lambda a: f"({a[0]} > 0 ? {a[0]} : acc_t(0))")


def _tabulated(
    lo: Lowering,
    node: torch.fx.Node,
    name: str,
    function,
    lo_x: float,
    hi_x: float,
    below: int,
    above: int,
) -> None:
    table, table_type = lo.table(name, function, lo_x, hi_x)
    lo.elementwise(
        node,
        _operands(node, 1),
        lambda a: (
            f"rw::lookup<acc_t, {table_type}, {TABLE_POINTS}>"
            f"({a[0]}, {table}, {lo_x}f, {hi_x}f, {below}, {above})"
        ),
    )
    lo.layer(node, f"activation:{name}", table_points=TABLE_POINTS + 1, range=[lo_x, hi_x])


@handles(aten.tanh.default)
def _tanh(lo: Lowering, node: torch.fx.Node) -> None:
    _tabulated(lo, node, "tanh", torch.tanh, -8.0, 8.0, -1, 1)


@handles(aten.sigmoid.default)
def _sigmoid(lo: Lowering, node: torch.fx.Node) -> None:
    _tabulated(lo, node, "sigmoid", torch.sigmoid, -16.0, 16.0, 0, 1)


@handles(aten.gelu.default)
def _gelu(lo: Lowering, node: torch.fx.Node) -> None:
    approximate = ops.arguments(node)["approximate"]
    function = lambda x: torch.nn.functional.gelu(x, approximate=approximate)  # noqa: E731
    _tabulated(lo, node, f"gelu_{approximate}", function, -8.0, 8.0, 0, 2)


@handles(aten.silu.default)
def _silu(lo: Lowering, node: torch.fx.Node) -> None:
    _tabulated(lo, node, "silu", torch.nn.functional.silu, -16.0, 16.0, 0, 2)


@handles(aten.elu.default)
def _elu(lo: Lowering, node: torch.fx.Node) -> None:
    args = ops.arguments(node)
    if any(float(args[name]) != 1.0 for name in ("alpha", "scale", "input_scale")):
        raise LoweringError("hls export: elu with alpha/scale other than 1", node)
    _tabulated(lo, node, "elu", torch.nn.functional.elu, -16.0, 0.0, -1, 2)


# --- linear maps ----------------------------------------------------------------------------------


def _dense(
    lo: Lowering, node: torch.fx.Node, x_arg, weight: torch.Tensor, bias: torch.Tensor | None
) -> None:
    """``y = x W^T + b`` with ``W`` constant ``[out, in]``."""
    x, _ = lo.operand(x_arg, node)
    if x is None:
        raise LoweringError("hls export: a linear map of a constant should have been folded", node)
    out = lo._local(node)
    n_out, n_in = weight.shape
    rows = x.size // n_in
    w = lo.constant(f"{node.name}_weight", weight)
    b = (
        lo.constant(f"{node.name}_bias", bias)
        if bias is not None
        else lo.constant("none", torch.zeros(1))
    )
    reuse = _reuse(lo.reuse, n_in)
    lo.call(
        "dense",
        [
            f"{x.ctype}",
            f"{out.ctype}",
            "t_weight",
            "t_weight",
            "acc_t",
            f"{rows}",
            f"{n_in}",
            f"{n_out}",
            f"{reuse}",
            f"{'true' if bias is not None else 'false'}",
        ],
        [f"{x.name}", f"{out.name}", f"{w.name}", f"{b.name}"],
    )
    lo.layer(
        node,
        "dense",
        n_in=n_in,
        n_out=n_out,
        rows=rows,
        reuse_factor=reuse,
        weight_bits=lo.precision.weight.width,
    )


def _reuse(requested: int, n_in: int) -> int:
    """The reuse factor actually used: the largest divisor of ``n_in`` not above the request."""
    return max(d for d in range(1, min(requested, n_in) + 1) if n_in % d == 0)


def _constant(lo: Lowering, arg) -> torch.Tensor | None:
    if isinstance(arg, torch.fx.Node) and arg not in lo.dynamic:
        return lo.values[arg]
    return None


@handles(aten.linear.default)
def _linear(lo: Lowering, node: torch.fx.Node) -> None:
    args = ops.arguments(node)
    weight = _constant(lo, args["weight"])
    bias = _constant(lo, args["bias"]) if args["bias"] is not None else None
    if weight is None:
        raise LoweringError("hls export: linear with a computed weight", node)
    _dense(lo, node, args["input"], weight, bias)


@handles(aten.addmm.default)
def _addmm(lo: Lowering, node: torch.fx.Node) -> None:
    args = ops.arguments(node)
    bias, x, weight = _constant(lo, args["self"]), args["mat1"], _constant(lo, args["mat2"])
    if weight is None or bias is None or args["beta"] != 1 or args["alpha"] != 1:
        raise LoweringError(
            "hls export: addmm needs a constant bias and weight, beta = alpha = 1", node
        )
    _dense(lo, node, x, weight.T, bias.reshape(-1))


@handles(aten.mm.default, aten.matmul.default, aten.bmm.default)
def _matmul(lo: Lowering, node: torch.fx.Node) -> None:
    a_node, b_node = _operands(node, 2)  # self and mat2 (mm, bmm) or other (matmul)
    weight = _constant(lo, b_node)
    if weight is not None and weight.dim() == 2:
        return _dense(lo, node, a_node, weight.T, None)
    a, _ = lo.operand(a_node, node)
    b, _ = lo.operand(b_node, node)
    if a is None or b is None:
        raise LoweringError("hls export: matmul with a constant left operand", node)
    out = lo._local(node)
    m, k = a.shape[-2:]
    n = b.shape[-1]
    batch_a, batch_b = math.prod(a.shape[:-2]), math.prod(b.shape[:-2])
    if batch_a != batch_b:
        raise LoweringError(
            f"hls export: matmul with broadcast batch dims {a.shape} x {b.shape}", node
        )
    lo.call(
        "matmul",
        [f"{a.ctype}", f"{b.ctype}", f"{out.ctype}", "acc_t", f"{batch_a}", f"{m}", f"{k}", f"{n}"],
        [f"{a.name}", f"{b.name}", f"{out.name}"],
    )
    lo.layer(node, "matmul", batch=batch_a, m=m, k=k, n=n)


@handles(rw.shiftquant_linear.default)
def _shiftquant(lo: Lowering, node: torch.fx.Node) -> None:
    args = ops.arguments(node)
    x_node, packed_node, exponents_node, bias_node = (
        args[name] for name in ("x", "packed", "exponents", "bias")
    )
    bits, group, in_features = args["bits"], args["group"], args["in_features"]
    if args["act_bits"]:
        raise LoweringError(
            "hls export: shiftquant_linear with activation quantization (act_bits)", node
        )
    x, _ = lo.operand(x_node, node)
    packed, exponents = lo.values[packed_node], lo.values[exponents_node]
    bias = _constant(lo, bias_node) if bias_node is not None else None
    out = lo._local(node)
    n_out, groups = exponents.shape
    rows = x.size // in_features
    lo.constants[f"c_{node.name}_packed"] = ("uint8_t", packed.reshape(-1).tolist())
    lo.constants[f"c_{node.name}_exponents"] = ("int8_t", exponents.reshape(-1).tolist())
    b = (
        lo.constant(f"{node.name}_bias", bias)
        if bias is not None
        else lo.constant("none", torch.zeros(1))
    )
    reuse = _reuse(lo.reuse, in_features)
    lo.call(
        "shiftquant_dense",
        [
            f"{x.ctype}",
            f"{out.ctype}",
            "t_weight",
            "acc_t",
            f"{rows}",
            f"{in_features}",
            f"{n_out}",
            f"{bits}",
            f"{group}",
            f"{groups}",
            f"{reuse}",
            f"{'true' if bias is not None else 'false'}",
        ],
        [
            f"{x.name}",
            f"{out.name}",
            f"c_{node.name}_packed",
            f"c_{node.name}_exponents",
            f"{b.name}",
        ],
    )
    lo.layer(
        node,
        "shiftquant_dense",
        n_in=in_features,
        n_out=n_out,
        rows=rows,
        bits=bits,
        group=group,
        reuse_factor=reuse,
    )


# --- normalizations -------------------------------------------------------------------------------


def _affine_args(lo: Lowering, node: torch.fx.Node, weight, bias) -> tuple[str, str, str, str]:
    w = (
        lo.constant(f"{node.name}_w", weight)
        if weight is not None
        else lo.constant("none", torch.zeros(1))
    )
    b = (
        lo.constant(f"{node.name}_b", bias)
        if bias is not None
        else lo.constant("none", torch.zeros(1))
    )
    return w.name, b.name, str(weight is not None).lower(), str(bias is not None).lower()


@handles(aten.layer_norm.default)
def _layer_norm(lo: Lowering, node: torch.fx.Node) -> None:
    args = ops.arguments(node)
    x, _ = lo.operand(args["input"], node)
    shape, eps = args["normalized_shape"], args["eps"]
    weight, bias = _constant(lo, args["weight"]), _constant(lo, args["bias"])
    eps = 1e-5 if eps is None else eps
    out = lo._local(node)
    n = math.prod(shape)
    w, b, has_w, has_b = _affine_args(lo, node, weight, bias)
    lo.call(
        "layer_norm",
        [
            f"{x.ctype}",
            f"{out.ctype}",
            "t_weight",
            "acc_t",
            f"{x.size // n}",
            f"{n}",
            f"{has_w}",
            f"{has_b}",
        ],
        [f"{x.name}", f"{out.name}", f"{w}", f"{b}", f"{float(eps)!r}f"],
    )
    lo.layer(node, "layer_norm", n=n, rows=x.size // n)


@handles(aten.rms_norm.default)
def _rms_norm(lo: Lowering, node: torch.fx.Node) -> None:
    args = ops.arguments(node)
    x, _ = lo.operand(args["input"], node)
    shape, weight, eps = args["normalized_shape"], _constant(lo, args["weight"]), args["eps"]
    eps = torch.finfo(torch.float32).eps if eps is None else eps
    out = lo._local(node)
    n = math.prod(shape)
    w, b, has_w, _ = _affine_args(lo, node, weight, None)
    lo.call(
        "rms_norm",
        [
            f"{x.ctype}",
            f"{out.ctype}",
            "t_weight",
            "acc_t",
            f"{x.size // n}",
            f"{n}",
            f"{has_w}",
            "false",
            "false",
        ],
        [f"{x.name}", f"{out.name}", f"{w}", f"{b}", f"{float(eps)!r}f"],
    )
    lo.layer(node, "rms_norm", n=n, rows=x.size // n)


@handles(rw.crms_norm.default)
def _crms_norm(lo: Lowering, node: torch.fx.Node) -> None:
    args = ops.arguments(node)
    x, _ = lo.operand(args["x"], node)
    out = lo._local(node)
    n = x.shape[-1]
    none = lo.constant("none", torch.zeros(1)).name
    lo.call(
        "rms_norm",
        [
            f"{x.ctype}",
            f"{out.ctype}",
            "t_weight",
            "acc_t",
            f"{x.size // n}",
            f"{n}",
            "false",
            "false",
            "true",
        ],
        [f"{x.name}", f"{out.name}", f"{none}", f"{none}", f"{float(args['eps'])!r}f"],
    )
    lo.layer(node, "crms_norm", n=n, rows=x.size // n)


@handles(rw.l1_norm.default)
def _l1_norm(lo: Lowering, node: torch.fx.Node) -> None:
    args = ops.arguments(node)
    x_node, weight_node, bias_node = args["x"], args["weight"], args["bias"]
    eps, centered, factor = args["eps"], args["centered"], args["factor"]
    x, _ = lo.operand(x_node, node)
    out = lo._local(node)
    n = x.shape[-1]
    weight = _constant(lo, weight_node) if weight_node is not None else None
    bias = _constant(lo, bias_node) if bias_node is not None else None
    w, b, has_w, has_b = _affine_args(lo, node, weight, bias)
    lo.call(
        "l1_norm",
        [
            f"{x.ctype}",
            f"{out.ctype}",
            "t_weight",
            "acc_t",
            f"{x.size // n}",
            f"{n}",
            f"{has_w}",
            f"{has_b}",
            f"{str(bool(centered)).lower()}",
        ],
        [f"{x.name}", f"{out.name}", f"{w}", f"{b}", f"{float(eps)!r}f", f"{float(factor)!r}f"],
    )
    lo.layer(node, "l1_norm", n=n, rows=x.size // n)


@handles(aten._softmax.default, aten.softmax.int)
def _softmax(lo: Lowering, node: torch.fx.Node) -> None:
    args = ops.arguments(node)
    x, _ = lo.operand(args["self"], node)
    dim = args["dim"] % len(x.shape)
    if dim != len(x.shape) - 1:
        raise LoweringError("hls export: softmax over a dim other than the last", node)
    out = lo._local(node)
    n = x.shape[-1]
    table, table_type = lo.table("exp", torch.exp, -16.0, 0.0)
    lo.call(
        "softmax",
        [
            f"{x.ctype}",
            f"{out.ctype}",
            "acc_t",
            table_type,
            f"{x.size // n}",
            f"{n}",
            f"{TABLE_POINTS}",
        ],
        [f"{x.name}", f"{out.name}", f"{table}"],
    )
    lo.layer(node, "softmax", n=n, rows=x.size // n)


# --- attention ------------------------------------------------------------------------------------


@handles(aten.scaled_dot_product_attention.default)
def _sdpa(lo: Lowering, node: torch.fx.Node) -> None:
    args = ops.arguments(node)
    q, _ = lo.operand(args["query"], node)
    k, _ = lo.operand(args["key"], node)
    v, _ = lo.operand(args["value"], node)
    if q is None or k is None or v is None:
        raise LoweringError("hls export: attention over constant keys or values", node)
    causal = bool(args["is_causal"])
    mask_node = args["attn_mask"]
    if mask_node is not None:
        mask = _constant(lo, mask_node)
        if mask is None:
            raise LoweringError("hls export: an attention mask computed from the inputs", node)
        causal = _mask_kind(mask, q.shape[-2], k.shape[-2], node) or causal
    if args["dropout_p"]:
        raise LoweringError("hls export: attention dropout", node)
    scale = args["scale"]
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    if q.shape[1] != k.shape[1] or k.shape != v.shape:
        raise LoweringError("hls export: grouped-query attention (repeat the keys first)", node)
    out = lo._local(node)
    heads = math.prod(q.shape[:-2])
    table, table_type = lo.table("exp", torch.exp, -16.0, 0.0)
    lo.call(
        "softmax_attention",
        [
            f"{q.ctype}",
            f"{out.ctype}",
            "acc_t",
            table_type,
            f"{heads}",
            f"{q.shape[-2]}",
            f"{k.shape[-2]}",
            f"{q.shape[-1]}",
            f"{TABLE_POINTS}",
            f"{str(causal).lower()}",
        ],
        [f"{q.name}", f"{k.name}", f"{v.name}", f"{out.name}", f"{table}", f"{float(scale)!r}f"],
    )
    lo.layer(node, "softmax_attention", heads=heads, t=q.shape[-2], s=k.shape[-2], d=q.shape[-1])


def _mask_kind(mask: torch.Tensor, t: int, s: int, node: torch.fx.Node) -> bool:
    """True for a causal mask, False for one that hides nothing; anything else is refused."""
    visible = mask if mask.dtype == torch.bool else mask > -1e30
    visible = visible.reshape(-1, t, s)
    causal = torch.ones(t, s, dtype=torch.bool).tril(s - t)
    if bool(visible.all()):
        return False
    if bool((visible == causal).all()):
        return True
    raise LoweringError(
        "hls export: an attention mask that is neither causal nor empty (padding?)", node
    )


@handles(rw.linear_attention.default)
def _linear_attention(lo: Lowering, node: torch.fx.Node) -> None:
    args = ops.arguments(node)
    v, phi_q, phi_k, key_mask, decay = (
        args[name] for name in ("v", "phi_q", "phi_k", "key_mask", "decay")
    )
    eps = args["eps"]
    if not args["causal"] or args["window"]:
        raise LoweringError(
            "hls export: linear attention must be causal without a softmax window", node
        )
    fq, _ = lo.operand(phi_q, node)
    fk, _ = lo.operand(phi_k, node)
    vv, _ = lo.operand(v, node)
    heads = math.prod(fq.shape[:-2])
    length, features, width = fq.shape[-2], fq.shape[-1], vv.shape[-1]
    gamma = _constant(lo, decay) if decay is not None else torch.ones(fq.shape[1])
    gamma = gamma.reshape(1, -1).expand(fq.shape[0], -1).reshape(-1)
    mask = (
        _constant(lo, key_mask)
        if key_mask is not None
        else torch.ones(fq.shape[0], length, dtype=torch.bool)
    )
    if mask is None or (mask.shape[0] > 1 and not bool((mask == mask[:1]).all())):
        raise LoweringError("hls export: a per-row key mask computed from the inputs", node)
    out = lo._local(node)
    lo.constants[f"c_{node.name}_gamma"] = ("float", gamma.tolist())
    lo.constants[f"c_{node.name}_valid"] = ("bool", mask[0].int().tolist())
    lo.call(
        "linear_attention",
        [
            f"{fq.ctype}",
            f"{out.ctype}",
            "t_state",
            "acc_t",
            f"{heads}",
            f"{length}",
            f"{features}",
            f"{width}",
        ],
        [
            f"{fq.name}",
            f"{fk.name}",
            f"{vv.name}",
            f"{out.name}",
            f"c_{node.name}_gamma",
            f"c_{node.name}_valid",
            f"{float(eps)!r}f",
        ],
    )
    lo.layer(node, "linear_attention", heads=heads, t=length, f=features, d=width)


@handles(aten.embedding.default)
def _embedding(lo: Lowering, node: torch.fx.Node) -> None:
    args = ops.arguments(node)
    table = _constant(lo, args["weight"])
    ids, _ = lo.operand(args["indices"], node)
    if table is None or ids is None:
        raise LoweringError("hls export: embedding needs a constant table and computed ids", node)
    out = lo._local(node)
    table_const = lo.constant(f"{node.name}_table", table)
    lo.call(
        "embedding",
        [
            f"{ids.ctype}",
            f"{out.ctype}",
            "t_weight",
            f"{ids.size}",
            f"{table.shape[0]}",
            f"{table.shape[1]}",
        ],
        [f"{ids.name}", f"{out.name}", f"{table_const.name}"],
    )
    lo.layer(node, "embedding", vocab=table.shape[0], n=table.shape[1], rows=ids.size)


__all__ = ["Value"]  # re-exported for handler authors
