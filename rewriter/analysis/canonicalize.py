"""Canonical form: no-op nodes removed, composite normalizations and softmax attention
recognised as single ops (what the ``canonicalize`` pass does, documented there).

The rule tables (:data:`RULES_NOOPS`, :data:`RULES_NORMS`, :data:`RULES_ATTENTION`) and
:func:`canonicalize`, which applies them to a fixpoint. Passes that want written-out norms or
attention as single ops before they look at a graph (``ln-freeze``, ``l1quant``,
``linearize``) call :func:`canonicalize` themselves; every rule preserves the graph's outputs.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

import torch
import torch.fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from rewriter.rewrite.driver import ERASE, Rewriter, RuleSet, apply_rules, emit, rule
from rewriter.rewrite.pattern import Match, P

__all__ = [
    "RULES_ATTENTION",
    "RULES_NOOPS",
    "RULES_NORMS",
    "Canonicalized",
    "canonical_rules",
    "canonicalize",
]

aten = torch.ops.aten


# --- predicates ---------------------------------------------------------------------------------


def _val(value: Any) -> Any:
    return value.meta.get("val") if isinstance(value, torch.fx.Node) else None


def _same_shape(a: Any, b: Any) -> bool:
    va, vb = _val(a), _val(b)
    if not isinstance(va, torch.Tensor) or not isinstance(vb, torch.Tensor) or va.dim() != vb.dim():
        return False
    return all(statically_known_true(x == y) for x, y in zip(va.shape, vb.shape))


def _same_type(a: Any, b: Any) -> bool:
    va, vb = _val(a), _val(b)
    return (
        isinstance(va, torch.Tensor)
        and isinstance(vb, torch.Tensor)
        and va.dtype == vb.dtype
        and va.device == vb.device
    )


def same_value_type(match: Match) -> bool:
    """The matched node has the same shape, dtype and device as ``x`` (it is a no-op on x)."""
    return _same_shape(match.root, match["x"]) and _same_type(match.root, match["x"])


def full_slice(match: Match) -> bool:
    """``slice(x, dim, start, end)`` covers all of dim (start 0, end at or past its size)."""
    node = match.root
    x = _val(match["x"])
    dim, start, end, step = (list(node.args[1:]) + [0, None, None, 1][len(node.args) - 1 :])[:4]
    if step != 1 or start not in (0, None) or not isinstance(x, torch.Tensor):
        return False
    size = x.shape[dim]
    if isinstance(end, torch.fx.Node):
        end = _val(end)
    if end is None or (isinstance(end, int) and end >= sys.maxsize):
        return True
    return isinstance(end, (int, torch.SymInt)) and statically_known_true(end >= size)


def assert_is_proven(match: Match) -> bool:
    """``_assert_tensor_metadata(x, dtype=..., device=..., layout=...)`` holds for x's own meta."""
    node, x = match.root, _val(match["x"])
    if node.users or not isinstance(x, torch.Tensor):
        return False
    checks = {"dtype": x.dtype, "device": x.device, "layout": x.layout}
    return all(node.kwargs.get(k) in (None, v) for k, v in checks.items()) and len(node.args) == 1


def _last_dim_reduction(match: Match) -> bool:
    dims, x = match["dims"], _val(match["x"])
    return isinstance(x, torch.Tensor) and len(dims) == 1 and dims[0] % x.dim() == x.dim() - 1


def _norm_width(x: Any) -> int | None:
    val = _val(x)
    width = val.shape[-1] if isinstance(val, torch.Tensor) else None
    return width if isinstance(width, int) else None


def _is_vector_of(width: int | None, value: Any, dtype: torch.dtype) -> bool:
    val = _val(value)
    return (
        width is not None
        and isinstance(val, torch.Tensor)
        and tuple(val.shape) == (width,)
        and val.dtype == dtype
    )


def norm_is_last_dim(match: Match) -> bool:
    """The reductions run over the last dim and it has a static width."""
    return _last_dim_reduction(match) and _norm_width(match["x"]) is not None


def weight_fits_norm(match: Match) -> bool:
    """``w`` is a [d] vector of the norm input's dtype and the norm has no other reader."""
    norm = match["norm"]
    x = norm.args[0]
    return len(norm.users) == 1 and _is_vector_of(_norm_width(x), match["w"], _val(x).dtype)


def weight_fits_rms_norm(match: Match) -> bool:
    """As :func:`weight_fits_norm`, and absorbing keeps the rounding: no half precision.

    In float16/bfloat16, ``aten.rms_norm`` multiplies by the weight in float32 before its one cast
    back, while ``rms_norm(x) * w`` rounds twice; absorbing would not be exact.
    """
    x = match["norm"].args[0]
    return weight_fits_norm(match) and _val(x).dtype in (torch.float32, torch.float64)


def bias_fits_norm(match: Match) -> bool:
    """``b`` is a [d] vector of the norm input's dtype and the norm has no other reader."""
    norm = match["norm"]
    x = norm.args[0]
    return len(norm.users) == 1 and _is_vector_of(_norm_width(x), match["b"], _val(x).dtype)


def not_train_dropout(match: Match) -> bool:
    """An adapter's dropout is off in the graph but switched on by ``rewriter.train``: keep it."""
    return not match.root.meta.get("rewriter.train_dropout")


def casts_round_trip(match: Match) -> bool:
    """``to(rms_norm(to(y, f32)), y.dtype)`` with y half precision: rms_norm upcasts itself."""
    y, norm, outer = _val(match["y"]), match["norm"], match.root
    inner = norm.args[0]
    return (
        isinstance(y, torch.Tensor)
        and y.dtype in (torch.float16, torch.bfloat16)
        and _val(inner).dtype == torch.float32
        and _val(outer).dtype == y.dtype
        and len(norm.users) == 1
        and len(inner.users) == 1
    )


# --- rule tables --------------------------------------------------------------------------------

x, w, b, y = P.var("x"), P.var("w"), P.var("b"), P.var("y")
eps, dims = P.const("eps"), P.var("dims")
_CASTS = {aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default}
_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.expand.default}


def _zero(value: Any) -> bool:
    return value == 0 and not isinstance(value, bool)


def _one(value: Any) -> bool:
    return value == 1 and not isinstance(value, bool)


# fmt: off
RULES_NOOPS = RuleSet([
    rule(P.call(aten.dropout.default, x, P.const(), False), lambda x: x, name="drop-eval-dropout", where=not_train_dropout),  # dropout(x, p, train=False) -> x  # noqa: E501
    rule(P.call(aten.dropout.default, x, P.const(where=_zero), P.var("train")), lambda x: x, name="drop-zero-dropout"),  # dropout(x, 0, train) -> x  # noqa: E501
    rule(P.call(aten.alias.default, x), lambda x: x, name="drop-alias"),  # alias(x) -> x
    rule(P.call(aten.clone.default, x), lambda x: x, name="drop-clone"),  # clone(x) -> x (graphs are functional)  # noqa: E501
    rule(P.call(_CASTS, x), lambda x: x, name="drop-noop-cast", where=same_value_type),  # to(x, x.dtype) -> x  # noqa: E501
    rule(P.call(aten.type_as.default, x, P.var("other")), lambda x: x, name="drop-noop-type-as", where=same_value_type),  # type_as(x, same dtype) -> x  # noqa: E501
    rule(P.call(_VIEWS, x), lambda x: x, name="drop-noop-view", where=same_value_type),  # view(x, x.shape) -> x  # noqa: E501
    rule(P.call(aten.slice.Tensor, x), lambda x: x, name="drop-full-slice", where=full_slice),  # x[:, 0:end] -> x  # noqa: E501
    rule(P.call(aten.add.Tensor, x, P.const(where=_zero)), lambda x: x, name="drop-add-zero", where=same_value_type),  # x + 0 -> x  # noqa: E501
    rule(P.call(aten.sub.Tensor, x, P.const(where=_zero)), lambda x: x, name="drop-sub-zero", where=same_value_type),  # x - 0 -> x  # noqa: E501
    rule(P.call(aten.mul.Tensor, x, P.const(where=_one), commutative=True), lambda x: x, name="drop-mul-one", where=same_value_type),  # x * 1 -> x  # noqa: E501
    rule(P.call(aten.div.Tensor, x, P.const(where=_one)), lambda x: x, name="drop-div-one", where=same_value_type),  # x / 1 -> x  # noqa: E501
    rule(P.call(aten._assert_tensor_metadata.default, x), lambda: ERASE, name="drop-proven-assert", where=assert_is_proven),  # assert(x has x's dtype) -> nothing  # noqa: E501
])
# fmt: on


def normalize_rms(x: torch.fx.Node, eps: float) -> Any:
    return emit(aten.rms_norm.default, x, [_norm_width(x)], None, float(eps))


def normalize_layer(x: torch.fx.Node, eps: float) -> Any:
    return emit(aten.layer_norm.default, x, [_norm_width(x)], None, None, float(eps))


def fold_rms_casts(y: torch.fx.Node, norm: torch.fx.Node) -> Any:
    return emit(aten.rms_norm.default, y, norm.args[1], None, norm.args[3])


def absorb_rms_weight(norm: torch.fx.Node, w: torch.fx.Node) -> Any:
    return emit(aten.rms_norm.default, norm.args[0], norm.args[1], w, norm.args[3])


def absorb_layer_weight(norm: torch.fx.Node, w: torch.fx.Node) -> Any:
    return emit(aten.layer_norm.default, norm.args[0], norm.args[1], w, None, norm.args[4])


def absorb_layer_bias(norm: torch.fx.Node, b: torch.fx.Node) -> Any:
    return emit(aten.layer_norm.default, norm.args[0], norm.args[1], norm.args[2], b, norm.args[4])


_square = P.call(aten.pow.Tensor_Scalar, x, 2) | P.call(aten.mul.Tensor, x, x)
_mean_square = P.call(aten.mean.dim, _square, dims, True)
_mean = P.call(aten.mean.dim, x, dims, True, name="u")
_centered = P.call(aten.sub.Tensor, x, _mean)
_variance = P.any_of(
    P.call(aten.mean.dim, P.call(aten.pow.Tensor_Scalar, _centered, 2), dims, True),
    P.call(aten.mean.dim, P.call(aten.mul.Tensor, _centered, _centered), dims, True),
    P.call(aten.var.correction, x, dims, correction=0, keepdim=True),
)
_rms_no_affine = P.call(aten.rms_norm.default, P.var("inner"), P.var("shape"), None, name="norm")
_ln_no_affine = P.call(aten.layer_norm.default, x, P.var("shape"), None, None, name="norm")
_ln_no_bias = P.call(aten.layer_norm.default, x, P.var("shape"), P.var("gamma"), None, name="norm")

# fmt: off
RULES_NORMS = RuleSet([
    rule(P.call(aten.mul.Tensor, x, P.call(aten.rsqrt.default, P.call(aten.add.Tensor, _mean_square, eps)), commutative=True), normalize_rms, name="recognize-rms-norm", where=norm_is_last_dim),  # x * rsqrt(mean(x^2) + eps) -> rms_norm(x)  # noqa: E501
    rule(P.call(aten.div.Tensor, x, P.call(aten.sqrt.default, P.call(aten.add.Tensor, _mean_square, eps))), normalize_rms, name="recognize-rms-norm-div", where=norm_is_last_dim),  # x / sqrt(mean(x^2) + eps) -> rms_norm(x)  # noqa: E501
    rule(P.call(_CASTS, P.call(aten.rms_norm.default, P.call(_CASTS, y), P.var("shape"), None, name="norm")), fold_rms_casts, name="fold-rms-norm-casts", where=casts_round_trip),  # to(rms_norm(to(y, f32)), y.dtype) -> rms_norm(y)  # noqa: E501
    rule(P.call(aten.mul.Tensor, _rms_no_affine, w, commutative=True), absorb_rms_weight, name="absorb-rms-norm-weight", where=weight_fits_rms_norm),  # rms_norm(x) * w -> rms_norm(x, w)  # noqa: E501
    rule(P.call(aten.div.Tensor, _centered, P.call(aten.sqrt.default, P.call(aten.add.Tensor, _variance, eps))), normalize_layer, name="recognize-layer-norm", where=norm_is_last_dim),  # (x - mean) / sqrt(var + eps) -> layer_norm(x)  # noqa: E501
    rule(P.call(aten.mul.Tensor, _centered, P.call(aten.rsqrt.default, P.call(aten.add.Tensor, _variance, eps)), commutative=True), normalize_layer, name="recognize-layer-norm-rsqrt", where=norm_is_last_dim),  # (x - mean) * rsqrt(var + eps) -> layer_norm(x)  # noqa: E501
    rule(P.call(aten.mul.Tensor, _ln_no_affine, w, commutative=True), absorb_layer_weight, name="absorb-layer-norm-weight", where=weight_fits_norm),  # layer_norm(x) * w -> layer_norm(x, w)  # noqa: E501
    rule(P.call(aten.add.Tensor, _ln_no_bias, b, commutative=True), absorb_layer_bias, name="absorb-layer-norm-bias", where=bias_fits_norm),  # layer_norm(x, w) + b -> layer_norm(x, w, b)  # noqa: E501
])
# fmt: on


# --- composite softmax attention -> scaled_dot_product_attention ----------------------------------


def _swaps_last_two(node: torch.fx.Node) -> bool:
    rank = _val(node.args[0]).dim() if _val(node.args[0]) is not None else 0
    return rank == 4 and {d % rank for d in node.args[1:3]} == {2, 3}


def _softmax_last(node: torch.fx.Node) -> bool:
    val = _val(node)
    return isinstance(val, torch.Tensor) and val.dim() == 4 and node.args[1] in (-1, 3)


def attention_fits(match: Match) -> bool:
    """4-D q, k, v of one dtype; the scores, scaling and softmax feed nothing else; the mask (if
    any) is boolean or of the scores' dtype and broadcasts to them."""
    q, k, v = (_val(match[n]) for n in ("q", "k", "v"))
    if not all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in (q, k, v)):
        return False
    if len({q.dtype, k.dtype, v.dtype}) != 1 or not q.dtype.is_floating_point:
        return False
    for node in match.nodes:
        if node is not match.root and len(node.users) != 1:
            return False
    softmax = match.root.args[0]
    if len(softmax.args) > 2 and softmax.args[2] not in (None, q.dtype):
        return False  # a softmax in a wider type (BLOOM's float32 for half models) changes values
    mask = match.bindings.get("mask")
    if mask is not None:
        m = _val(mask)
        if not isinstance(m, torch.Tensor) or m.dim() != 4 or m.dtype not in (torch.bool, q.dtype):
            return False
    return True


def _to_sdpa(
    q: Any, k: Any, v: Any, mask: Any = None, scale: Any = 1.0, divisor: Any = None
) -> Any:
    factor = 1.0 / float(divisor) if divisor is not None else float(scale)
    return emit(aten.scaled_dot_product_attention.default, q, k, v, mask, scale=factor)


_q, _k, _v, _mask = P.var("q"), P.var("k"), P.var("v"), P.var("mask")
_scores = P.call(aten.matmul.default, _q, P.call(aten.transpose.int, _k, where=_swaps_last_two))
_scaled = P.any_of(
    P.call(aten.mul.Tensor, _scores, P.const("scale")),
    P.call(aten.div.Tensor, _scores, P.const("divisor")),
    _scores,
)
_logits = P.any_of(P.call(aten.add.Tensor, _scaled, _mask), _scaled)
_SOFTMAX = {aten.softmax.int, aten._softmax.default}
_FLAT = {aten.reshape.default, aten.view.default, aten._unsafe_view.default}


def _merges_batch_and_heads(node: torch.fx.Node) -> bool:
    """``[B, H, T, D] -> [B*H, T, D]``."""
    src, out = _val(node.args[0]), _val(node)
    return (
        isinstance(src, torch.Tensor)
        and isinstance(out, torch.Tensor)
        and src.dim() == 4
        and out.dim() == 3
        and statically_known_true(out.shape[0] == src.shape[0] * src.shape[1])
        and statically_known_true(out.shape[1] == src.shape[2])
    )


def _splits_batch_and_heads(node: torch.fx.Node) -> bool:
    """``[B*H, T, S] -> [B, H, T, S]`` (and the reverse view after the softmax)."""
    src, out = _val(node.args[0]), _val(node)
    return (
        isinstance(src, torch.Tensor)
        and isinstance(out, torch.Tensor)
        and {src.dim(), out.dim()} == {3, 4}
    )


def _swaps_last_two_3d(node: torch.fx.Node) -> bool:
    rank = _val(node.args[0]).dim() if _val(node.args[0]) is not None else 0
    return rank == 3 and {d % rank for d in node.args[1:3]} == {1, 2}


def baddbmm_attention_fits(match: Match) -> bool:
    """BLOOM's form: the bias is ``[B*H, 1, S]`` (one row per head), ``beta`` is 1, and the
    4-D tensors before flattening are q, k, v of one float dtype."""
    scores = match["scores"]
    if scores.kwargs.get("beta", 1) != 1:
        return False
    bias = _val(match["bias"])
    if not isinstance(bias, torch.Tensor) or bias.dim() != 3 or bias.shape[1] != 1:
        return False
    return attention_fits(match)


def _bias_to_sdpa(
    q: Any, k: Any, v: Any, bias: Any, mask: Any, scores: torch.fx.Node, split: Any
) -> Any:
    # bias [B*H, 1, S] -> [B, H, 1, S], added to the mask: scale * q k^T + bias + mask, as before.
    batch, heads = split[0], split[1]
    bias4 = emit(aten.view.default, bias, [batch, heads, 1, -1])
    combined = emit(aten.add.Tensor, bias4, mask)
    alpha = float(scores.kwargs.get("alpha", 1.0))
    return emit(aten.scaled_dot_product_attention.default, q, k, v, combined, scale=alpha)


_flat_q = P.call(_FLAT, _q, P.var("q_shape"), where=_merges_batch_and_heads)
_flat_k_t = P.call(
    aten.transpose.int,
    P.call(_FLAT, _k, P.var("k_shape"), where=_merges_batch_and_heads),
    where=_swaps_last_two_3d,
)
_flat_v = P.call(_FLAT, _v, P.var("v_shape"), where=_merges_batch_and_heads)
_biased_scores = P.call(aten.baddbmm.default, P.var("bias"), _flat_q, _flat_k_t, name="scores")
_split_scores = P.call(_FLAT, _biased_scores, P.var("split"), where=_splits_batch_and_heads)
_bloom_probs = P.call(_SOFTMAX, P.call(aten.add.Tensor, _split_scores, _mask), where=_softmax_last)
_bloom_out = P.call(
    aten.bmm.default,
    P.call(_FLAT, _bloom_probs, P.var("p_shape"), where=_splits_batch_and_heads),
    _flat_v,
)

# fmt: off
RULES_ATTENTION = RuleSet([
    rule(P.call(aten.matmul.default, P.call(_SOFTMAX, _logits, where=_softmax_last), _v), _to_sdpa, name="recognize-attention", where=attention_fits),  # softmax(q k^T s + mask) v -> sdpa(q, k, v, mask, s)  # noqa: E501
    rule(P.call(_FLAT, _bloom_out, P.var("o_shape"), where=_splits_batch_and_heads), _bias_to_sdpa, name="recognize-biased-attention", where=baddbmm_attention_fits),  # view(bmm(softmax(view(baddbmm(bias, q, k^T, alpha)) + mask), v)) -> sdpa(q, k, v, bias + mask, alpha)  # noqa: E501
])
# fmt: on


def canonical_rules(*, norms: bool = True, attention: bool = True) -> RuleSet:
    """The rule table :func:`canonicalize` applies: the no-ops, then (by default) the norms and
    the attention forms."""
    rules = RULES_NOOPS + RULES_NORMS if norms else RULES_NOOPS
    if attention:
        rules = rules + RULES_ATTENTION
    return rules


@dataclasses.dataclass
class Canonicalized:
    """What :func:`canonicalize` did to a graph."""

    changed: bool
    stats: dict[str, int]
    """Rewrites per rule name, and ``prune-dead-weight`` for the dead weights removed."""
    notes: list[str]
    rules: dict[str, dict[str, Any]]
    """Per-rule statistics of the table (``RuleStats.per_rule``)."""


def canonicalize(
    gm: torch.fx.GraphModule,
    *,
    norms: bool = True,
    attention: bool = True,
    max_iterations: int = 10,
    pass_name: str = "canonicalize",
) -> Canonicalized:
    """Bring ``gm`` to canonical form in place: apply :func:`canonical_rules` until nothing
    fires (at most ``max_iterations`` sweeps), then prune the weights nothing reads. Rewrites
    are recorded under ``pass_name``."""
    rw = Rewriter(gm, pass_name=pass_name)
    rules = canonical_rules(norms=norms, attention=attention)
    stats = apply_rules(rw, rules, max_iterations=max_iterations)
    pruned = rw.finish()
    counts = dict(stats.fired)
    notes = []
    if pruned:
        counts["prune-dead-weight"] = len(pruned)
    if not stats.converged:
        notes.append(f"no fixpoint after {stats.iterations} sweeps (raise max_iterations)")
    return Canonicalized(bool(counts), counts, notes, stats.per_rule(rules))
