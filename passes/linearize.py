"""``linearize``: softmax attention -> linear attention, fitted by attention transfer (approximate).

Every attention of the graph, ``aten.scaled_dot_product_attention`` or written-out softmax
attention (``canonicalize`` turns ``softmax(q k^T s + mask) v`` into the former; it runs first),
becomes ``rewriter::linear_attention`` over per-head feature maps (math and the three execution
forms: :mod:`rewriter.ops.attention`).

**Feature maps** (``feature_map``):

* ``hedgehog`` (default): ``phi(x) = [softmax(x W), softmax(-x W)]`` over the feature dim, one
  learned ``W`` (D x f, identity-initialized when f = D) per head and per side (queries, keys).
  This is LoLCATs' variant of Hedgehog (two separate softmaxes), chosen over ``exp(xW) ++
  exp(-xW)`` because the softmax keeps every feature in (0, 1]: no overflow and no per-token
  max-shift inside ``phi_k`` (which would silently reweight keys), while the learned projection
  can still produce the spiky, monotone weights Hedgehog argues softmax attention needs.
* ``elu``: ``phi(x) = elu(x) + 1``, no parameters, no training.

**Options.** ``window=w``: LoLCATs' hybrid, exact softmax over the last ``w`` keys plus linear
attention beyond, one shared normalizer, a learned per-head gate ``sigmoid(g)`` on
the softmax part (causal attention only; the gate starts at the best of a small grid, see
``_start_gate``). ``decay=lightning``: per-head decay ``gamma_h =
exp(-8 h / H (1 - l / L))`` for head h of layer l of L (TransNormerLLM's schedule as
flash-linear-attention implements it: head 0 never decays, deeper layers decay less).
``decay=alibi``: an additive ALiBi bias ``-slope_h (t - i)`` is read off the graph (measured on
the example inputs and checked to be exactly that form) and carried as the decay
``exp(-slope_h)``; without it such a bias is refused, naming the node. Key-padding masks are
kept: a boolean or 0 / -inf mask that is causal-and-padding (or padding only, for encoders) is
reduced to a per-key mask inside the graph and checked on the example inputs; any other mask is
refused.

**Attention transfer** (LoLCATs stage 1): with calibration data, each attention's inputs and
softmax output are recorded from the original graph, and its feature maps (and window gate) are
fitted layer by layer with :func:`rewriter.train` to minimize the MSE between the linear and the
softmax outputs, everything else frozen (seeded, ``fit_steps`` per layer, progress bar). The
report has each layer's MSE before and after fitting (on a held-out calibration batch) and, with
evaluation data, the perplexity of the original, the unfitted and the fitted graph. LoRA recovery
afterwards composes with the adapter passes when they land.

**Step graphs** (:mod:`rewriter.deploy`). Each layer appears twice: attention over the prefix,
whose keys and values are cached, and the last token's attention over ``cat(cache, new)``. The
prefix attention is linearized and fitted as above; its recurrent state
(``rewriter::linear_attention_state``: ``S``, ``z``, plus the window's last keys, values and
features) becomes the cache, and the last token's attention becomes
``rewriter::linear_attention_decode`` from that state, with the same feature maps, decay and gate.
The decode graph :func:`rewriter.deploy.split` cuts then carries a fixed-size state per layer
instead of keys and values that grow with the context. Layers ``layers`` leaves alone keep their
key/value cache.
"""

from __future__ import annotations

import dataclasses
import math
import operator
import re
from typing import Any, ClassVar, Literal

import torch
import torch.fx

from rewriter.context import PassContext, progress
from rewriter.deploy import STEP_KEY
from rewriter.errors import RewriterError, describe_node
from rewriter.ir.graph import copy_graph_module, module_path, weight_name_for, with_outputs
from rewriter.ir.store import weights as weights_of
from rewriter.ir.trace import trace_info
from rewriter.ops.attention import state_size
from rewriter.ops.deploy import FIRST_STATE_KIND
from rewriter.pipeline import Pass, PassResult, option
from rewriter.pipeline.metrics import perplexity_of_ids
from rewriter.pipeline.train import forward, train
from rewriter.rewrite.driver import PROVENANCE_KEY, Rewriter

__all__ = ["LinearizePass"]

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default
LINEAR_ATTENTION = torch.ops.rewriter.linear_attention.default
ATTENTION_STATE = torch.ops.rewriter.linear_attention_state.default
ATTENTION_DECODE = torch.ops.rewriter.linear_attention_decode.default
CACHE_POINT = torch.ops.rewriter.cache_point.default
MASKED = -1e30  # additive mask values at or below this mean "not attended"


@dataclasses.dataclass
class _Site:
    """One attention node and what the pass learned about it."""

    node: torch.fx.Node
    label: str
    layer: int
    heads: int
    kv_heads: int
    head_dim: int
    scale: float
    causal: bool
    mask_kind: str  # "none", "bool", "additive"
    slopes: torch.Tensor | None = None  # ALiBi slopes read off the graph
    decay: torch.Tensor | None = None  # the decay the rewrite gave it
    cache_layer: int | None = None  # step graphs: the layer whose key/value cache it fills
    parts: dict[str, Any] = dataclasses.field(default_factory=dict)  # nodes the rewrite made


@dataclasses.dataclass
class _DecodeSite:
    """A step graph's last-token attention over ``cat(cache, new)``."""

    node: torch.fx.Node
    layer: int
    key: torch.fx.Node  # the new token's key and value, [B, kv heads, 1, D]
    value: torch.fx.Node


@dataclasses.dataclass(frozen=True)
class LinearizePass(Pass):
    """Softmax attention -> linear attention (Hedgehog or elu+1 features), attention transfer."""

    name: ClassVar[str] = "linearize"
    exact: ClassVar[bool] = False

    feature_map: Literal["hedgehog", "elu"] = option(
        "hedgehog", "'hedgehog': learned softmax features (fitted); 'elu': elu(x)+1, no training."
    )
    feature_dim: int = option(0, "Hedgehog features per sign (0: the head dim).")
    window: int = option(0, "Exact softmax over the last w keys plus linear beyond (0: none).")
    decay: Literal["none", "lightning", "alibi"] = option(
        "none", "Per-head decay: none, TransNormer/Lightning schedule, or read from ALiBi biases."
    )
    layers: str = option(".*", "Attentions to replace: regex, full match on the source module.")
    fit_steps: int = option(100, "Attention-transfer steps per layer (0: keep the initial maps).")
    fit_lr: float = option(1e-2, "Attention-transfer learning rate.")
    calibration_batches: int = option(4, "Calibration batches recorded for the transfer.")
    eps: float = option(1e-6, "Added to the normalizer.")

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        from rewriter.passes.canonicalize import CanonicalizePass

        CanonicalizePass().run(gm, ctx)  # written-out attention becomes SDPA
        sites, decodes = self._sites(gm)
        if not sites:
            return PassResult(gm, changed=False, notes=["no softmax attention to linearize"])
        fit = self.feature_map == "hedgehog" and self.fit_steps > 0
        batches = (
            ctx.batches("calibration", limit=self.calibration_batches, pass_name=self.name)
            if fit or self.decay == "alibi" or any(s.mask_kind != "none" for s in sites)
            else None
        )
        self._inspect_masks(gm, sites, batches)
        if decodes and not all(s.causal for s in sites):
            bad = next(s for s in sites if not s.causal)
            raise RewriterError(
                f"pass '{self.name}': {describe_node(bad.node)} in a step graph is not causal"
            )
        if self.window and not all(s.causal for s in sites):
            bad = next(s for s in sites if not s.causal)
            raise RewriterError(
                f"pass '{self.name}': window={self.window} needs causal attention, but "
                f"{describe_node(bad.node)} attends in both directions"
            )
        original = copy_graph_module(gm) if ctx.evaluation is not None else None
        recorded = _record(gm, sites, batches, ctx) if fit else None
        params = _replace(gm, sites, decodes, self)
        metrics: dict[str, Any] = {"attentions": len(sites)}
        eval_ids = ctx.evaluation_ids() if ctx.evaluation is not None else None
        if eval_ids is not None and original is not None:
            metrics["ppl_original"] = perplexity_of_ids(original, eval_ids)
            metrics["ppl_unfitted"] = perplexity_of_ids(gm, eval_ids)
        if recorded is not None:
            metrics["layers"] = _fit(gm, sites, params, recorded, self, ctx)
            if eval_ids is not None:
                metrics["ppl_fitted"] = perplexity_of_ids(gm, eval_ids)
        notes = [
            f"{len(sites)} attentions -> linear ({self.feature_map}"
            + (f", window {self.window}" if self.window else "")
            + (f", decay {self.decay}" if self.decay != "none" else "")
            + ")"
        ]
        if decodes:
            notes.append(
                f"step graph: {len(decodes)} decode attentions run from a fixed-size state cache"
            )
        return PassResult(
            gm, changed=True, stats={"linearize": len(sites)}, notes=notes, metrics=metrics
        )

    # -- finding attention --
    def _sites(self, gm: torch.fx.GraphModule) -> tuple[list[_Site], dict[int, _DecodeSite]]:
        """The attentions to linearize and, in a step graph, the decode attentions of their
        layers (by cache layer)."""
        pattern = re.compile(self.layers)
        found = [n for n in gm.graph.find_nodes(op="call_function", target=SDPA)]
        step_graph = STEP_KEY in getattr(gm, "meta", {})
        decodes: dict[int, _DecodeSite] = {}
        sites = []
        for node in found:
            label = _attention_label(node)
            if not pattern.fullmatch(label):
                continue
            decode = _decode_site(node) if step_graph else None
            if decode is not None:
                decodes[decode.layer] = decode
                continue
            site = _describe(node, label, len(sites), self.name)
            site.cache_layer = _cached_layer(node.args[1]) if step_graph else None
            sites.append(site)
        if step_graph:
            _pair(sites, decodes, self.name)
        leftover = [
            n
            for n in gm.graph.nodes
            if n.op == "call_function"
            and n.target in (aten.softmax.int, aten._softmax.default)
            and getattr(n.meta.get(PROVENANCE_KEY), "rule", "") != "feature-map"
        ]
        if leftover and len(found) == 0:
            raise RewriterError(
                f"pass '{self.name}': {describe_node(leftover[0])} computes attention weights in a "
                "form canonicalize does not recognise (an additive bias inside baddbmm, as "
                "BLOOM's ALiBi; or a softmax in a wider dtype): nothing was linearized"
            )
        if not sites and found and self.layers != ".*":
            names = ", ".join(_attention_label(n) for n in found)
            raise RewriterError(
                f"pass '{self.name}': layers={self.layers!r} selects no attention (the graph's "
                f"attentions: {names})"
            )
        return sites, decodes

    def _inspect_masks(
        self, gm: torch.fx.GraphModule, sites: list[_Site], batches: list[torch.Tensor] | None
    ) -> None:
        """Classify each mask on real inputs: causal-and-padding, padding only, or a bias."""
        masked = [s for s in sites if s.mask_kind != "none"]
        if not masked:
            return
        inputs = [batches[0]] if batches else [None]
        probe = with_outputs(gm, [s.node.args[3] for s in masked])
        with torch.no_grad():
            values = _call(probe, inputs[0], gm)
        for site, mask in zip(masked, values):
            _classify(site, mask, self)


# --- analysis ------------------------------------------------------------------------------------


def _attention_label(node: torch.fx.Node) -> str:
    return module_path(node) or node.name


def _describe(node: torch.fx.Node, label: str, index: int, pass_name: str) -> _Site:
    args = list(node.args) + [None] * (8 - len(node.args))
    q, k, _, mask, dropout = args[:5]
    causal = bool(node.kwargs.get("is_causal", args[5] or False))
    scale = node.kwargs.get("scale", args[6])
    gqa = bool(node.kwargs.get("enable_gqa", args[7] or False))
    dropout = node.kwargs.get("dropout_p", dropout or 0.0)
    if dropout:
        raise RewriterError(f"pass '{pass_name}': {describe_node(node)} has attention dropout")
    qv, kv = q.meta["val"], k.meta["val"]
    heads, head_dim = int(qv.shape[1]), int(qv.shape[-1])
    kv_heads = int(kv.shape[1])
    if kv_heads != heads and not gqa:
        raise RewriterError(f"pass '{pass_name}': {describe_node(node)} has mismatched heads")
    if mask is not None and causal:
        raise RewriterError(
            f"pass '{pass_name}': {describe_node(node)}: mask and is_causal both set"
        )
    kind = "none"
    if mask is not None:
        kind = "bool" if mask.meta["val"].dtype == torch.bool else "additive"
    return _Site(
        node=node,
        label=label,
        layer=index,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        scale=float(scale) if scale is not None else 1.0 / math.sqrt(head_dim),
        causal=causal,
        mask_kind=kind,
    )


_VIEWS = {
    aten.reshape.default,
    aten.view.default,
    aten._unsafe_view.default,
    aten.expand.default,
    aten.unsqueeze.default,
    aten.slice.Tensor,
    aten.clone.default,
    aten.contiguous.default,
    aten.alias.default,
}
"""Ops between a cache and the attention that reads it (Hugging Face's ``repeat_kv``)."""


def _cache_walk(node: Any) -> list[torch.fx.Node]:
    """``node`` and what it views, up to the first op that is not a view."""
    chain = []
    while isinstance(node, torch.fx.Node):
        chain.append(node)
        if node.op != "call_function" or node.target not in _VIEWS:
            break
        node = node.args[0]
    return chain


def _cache_point_of(node: torch.fx.Node, kind: int) -> torch.fx.Node | None:
    return next((u for u in node.users if u.target == CACHE_POINT and int(u.args[2]) == kind), None)


def _cached_layer(key: torch.fx.Node) -> int | None:
    """The cache layer whose keys are the attention's keys (a step graph's prefix)."""
    for node in _cache_walk(key):
        point = _cache_point_of(node, 0)
        if point is not None:
            return int(point.args[1])
    return None


def _decode_site(node: torch.fx.Node) -> _DecodeSite | None:
    """``node`` as a decode attention: its keys and values ``cat(cache_point, new)``."""
    found = []
    for operand, kind in ((node.args[1], 0), (node.args[2], 1)):
        cat = _cache_walk(operand)[-1]
        if cat.target != aten.cat.default or len(cat.args[0]) != 2:
            return None
        cached, new = cat.args[0]
        if cached.target != CACHE_POINT or int(cached.args[2]) != kind:
            return None
        found.append((int(cached.args[1]), new))
    (layer, key), (value_layer, value) = found
    if layer != value_layer:
        raise RewriterError(
            f"{describe_node(node)} reads the keys of cache layer {layer} with the values of "
            f"layer {value_layer}"
        )
    return _DecodeSite(node, layer, key, value)


def _pair(sites: list[_Site], decodes: dict[int, _DecodeSite], pass_name: str) -> None:
    """Every selected prefix attention of a step graph needs its decode attention, and back."""
    layers = {s.cache_layer for s in sites}
    for site in sites:
        if site.cache_layer is None or site.cache_layer not in decodes:
            raise RewriterError(
                f"pass '{pass_name}': {describe_node(site.node)} in a step graph has no decode "
                "attention reading its cache (a pass changed the cache layout?)"
            )
    for layer in list(decodes):
        if layer not in layers:
            del decodes[layer]  # its prefix attention was not selected: it keeps its cache


def _classify(site: _Site, mask: torch.Tensor, step: LinearizePass) -> None:
    """Decide from a real mask value what the attention does; refuse what we cannot represent."""
    where = describe_node(site.node)
    if mask.dtype == torch.bool:
        valid, bias = mask, None
    else:
        valid = mask > MASKED
        bias = torch.where(valid, mask, torch.zeros_like(mask)).double()
    length, keys = valid.shape[-2], valid.shape[-1]
    tril = torch.ones(length, keys, dtype=torch.bool).tril(keys - length)
    last_row = valid[..., -1:, :]
    first_row = valid[..., :1, :]
    if length == keys and torch.equal(valid, tril & last_row) and length > 1:
        site.causal = True
    elif torch.equal(valid, first_row.expand_as(valid)):
        site.causal = False
    else:
        raise RewriterError(
            f"pass '{step.name}': the mask of {where} is neither causal-and-padding nor padding "
            "only (a sliding window or a custom pattern): linear attention cannot represent it"
        )
    if bias is None or not bias.abs().max().item():
        return
    # A real additive bias: ALiBi, -slope_h (t - i), is the only one a decay represents.
    if step.decay != "alibi" or not site.causal:
        raise RewriterError(
            f"pass '{step.name}': {where} adds a position bias to the attention scores (ALiBi?); "
            "linear attention drops it unless decay=alibi represents it"
        )
    site.slopes = _alibi_slopes(bias, valid, site, step.name)


def _alibi_slopes(
    bias: torch.Tensor, valid: torch.Tensor, site: _Site, pass_name: str
) -> torch.Tensor:
    """Per-head slopes of a bias that is ``-slope (t - i) + c_t`` on every visible entry."""
    bias = bias.expand(bias.shape[0], site.heads, *bias.shape[-2:])
    length = bias.shape[-1]
    distance = (torch.arange(length).unsqueeze(1) - torch.arange(length).unsqueeze(0)).double()
    # Softmax ignores a per-row constant: compare each row to its diagonal entry.
    relative = bias - torch.diagonal(bias, dim1=-2, dim2=-1).unsqueeze(-1)
    visible = valid.expand_as(bias) & (distance > 0)
    slopes = []
    for h in range(site.heads):
        d = distance.expand_as(relative[:, h])[visible[:, h]]
        r = relative[:, h][visible[:, h]]
        slope = float(-(r * d).sum() / (d * d).sum()) if d.numel() else 0.0
        if d.numel() and (r + slope * d).abs().max() > 1e-4 * (1 + abs(slope) * length):
            raise RewriterError(
                f"pass '{pass_name}': the bias of {describe_node(site.node)} is not ALiBi's "
                "-slope (t - i) in head {h}: no decay represents it"
            )
        slopes.append(slope)
    result = torch.tensor(slopes, dtype=torch.float64)
    if (result < 0).any():
        raise RewriterError(
            f"pass '{pass_name}': the bias of {describe_node(site.node)} grows with distance"
        )
    return result


# --- the rewrite ---------------------------------------------------------------------------------


def _lightning_decay(site: _Site, layers: int) -> torch.Tensor:
    h = torch.arange(site.heads, dtype=torch.float64)
    return torch.exp(-(8.0 / site.heads) * (1 - site.layer / max(1, layers)) * h)


def _replace(
    gm: torch.fx.GraphModule,
    sites: list[_Site],
    decodes: dict[int, _DecodeSite],
    step: LinearizePass,
) -> dict[str, dict[str, str]]:
    """Swap every site for linear attention (and, in a step graph, its decode attention for a
    step from the recurrent state); returns each site's parameter names."""
    rw = Rewriter(gm, pass_name=step.name)
    params: dict[str, dict[str, str]] = {}
    for site in sites:
        node = site.node
        q, k, v, mask = node.args[0], node.args[1], node.args[2], (list(node.args) + [None] * 4)[3]
        dtype = q.meta["val"].dtype
        k, v = _repeat_heads(rw, k, v, site, before=node)
        names: dict[str, str] = {}
        phi_q = _feature_map(rw, q, site, "q", step, dtype, names, before=node)
        phi_k = _feature_map(rw, k, site, "k", step, dtype, names, before=node)
        key_mask = _key_mask(rw, mask, site) if mask is not None else None
        decay = None
        if step.decay == "lightning":
            decay = _lightning_decay(site, len(sites))
        elif site.slopes is not None:
            decay = torch.exp(-site.slopes)
        decay_node = None
        if decay is not None:
            site.decay = decay.to(dtype)
            decay_node = rw.add_weight(weight_name_for(node, "decay"), site.decay, rule="linearize")
        gate = None
        if step.window:
            factor = torch.full((site.heads,), math.log(0.1 / 0.9), dtype=dtype)
            factor_node = rw.add_weight(
                weight_name_for(node, "window_factor"), factor, rule="linearize"
            )
            names["window_factor"] = str(factor_node.target)
            gate = rw.call(aten.sigmoid.default, (factor_node,), before=node, rule="linearize")
        args = (
            q,
            k,
            v,
            phi_q,
            phi_k,
            key_mask,
            decay_node,
            gate,
            site.causal,
            step.window,
            site.scale,
            step.eps,
        )
        new = rw.call(LINEAR_ATTENTION, args, before=node, rule="linearize", meta_from=node)
        rw.replace(node, new, rule="linearize")
        site.node = new
        site.parts = {"k": k, "v": v, "phi_k": phi_k, "key_mask": key_mask}
        site.parts |= {"decay": decay_node, "gate": gate}
        params[site.label] = names
        if site.cache_layer is not None:
            _replace_decode(rw, site, decodes[site.cache_layer], step, names)
    rw.finish(prune_weights=True)
    return params


def _repeat_heads(
    rw: Rewriter, k: Any, v: Any, site: _Site, *, before: torch.fx.Node
) -> tuple[Any, Any]:
    """GQA: keys and values repeated to the query heads (feature maps act per query head, as in
    LoLCATs); Hugging Face's ``repeat_kv`` order (each key head ``heads / kv_heads`` times)."""
    kv_heads = int(k.meta["val"].shape[1])
    if kv_heads == site.heads:
        return k, v
    repeat = site.heads // kv_heads
    k = rw.call(aten.repeat_interleave.self_int, (k, repeat, 1), before=before, rule="gqa")
    v = rw.call(aten.repeat_interleave.self_int, (v, repeat, 1), before=before, rule="gqa")
    return k, v


def _replace_decode(
    rw: Rewriter, site: _Site, decode: _DecodeSite, step: LinearizePass, names: dict[str, str]
) -> None:
    """The prefix's state becomes the cache; the decode attention runs one step from it."""
    node = decode.node
    parts = site.parts
    state = rw.call(
        ATTENTION_STATE,
        (parts["k"], parts["v"], parts["phi_k"], parts["key_mask"], parts["decay"], step.window),
        before=node,
        rule="linearize-state",
        meta_from=site.node,
    )
    cached = []
    for index in range(state_size(step.window)):
        tensor = rw.call(operator.getitem, (state, index), before=node, rule="linearize-state")
        kind = FIRST_STATE_KIND + index
        cached.append(
            rw.call(CACHE_POINT, (tensor, decode.layer, kind), before=node, rule="linearize-state")
        )
    q = node.args[0]
    dtype = q.meta["val"].dtype
    k, v = _repeat_heads(rw, decode.key, decode.value, site, before=node)
    phi_q = _feature_map(rw, q, site, "q", step, dtype, names, before=node)
    phi_k = _feature_map(rw, k, site, "k", step, dtype, names, before=node)
    mask = (list(node.args) + [None] * 4)[3]
    valid = None
    if mask is not None:  # the new key's column of the decode mask [B, 1|H, 1, P + 1]
        row = rw.call(aten.select.int, (mask, 1, 0), before=node, rule="key-mask")
        row = rw.call(aten.select.int, (row, 1, 0), before=node, rule="key-mask")
        valid = rw.call(aten.select.int, (row, 1, -1), before=node, rule="key-mask")
        if mask.meta["val"].dtype != torch.bool:
            valid = rw.call(aten.gt.Scalar, (valid, MASKED), before=node, rule="key-mask")
    args = (
        q,
        k,
        v,
        phi_q,
        phi_k,
        valid,
        parts["decay"],
        parts["gate"],
        cached,
        step.window,
        site.scale,
        step.eps,
    )
    out = rw.call(ATTENTION_DECODE, args, before=node, rule="linearize", meta_from=node)
    result = rw.call(operator.getitem, (out, 0), before=node, rule="linearize", meta_from=node)
    rw.replace(node, result, rule="linearize")


def _feature_map(
    rw: Rewriter,
    x: torch.fx.Node,
    site: _Site,
    side: str,
    step: LinearizePass,
    dtype: torch.dtype,
    names: dict[str, str],
    *,
    before: torch.fx.Node,
) -> torch.fx.Node:
    """``phi(x)`` for one side of a site; a second application (a step graph's decode) reuses
    the weights the first one created."""
    node = before
    if step.feature_map == "elu":
        elu = rw.call(aten.elu.default, (x,), before=node, rule="feature-map")
        return rw.call(aten.add.Tensor, (elu, 1.0), before=node, rule="feature-map")
    key = f"feature_map_{side}"
    if key in names:
        w = rw.weight(names[key], rule="feature-map")
    else:
        features = step.feature_dim or site.head_dim
        weight = torch.zeros(site.heads, site.head_dim, features, dtype=dtype)
        eye = torch.eye(site.head_dim, features, dtype=dtype)
        weight[:] = eye  # identity where f = D, a truncated identity otherwise
        w = rw.add_weight(weight_name_for(node, key), weight, rule="feature-map")
        names[key] = str(w.target)
    projected = rw.call(aten.matmul.default, (x, w), before=node, rule="feature-map")
    negated = rw.call(aten.neg.default, (projected,), before=node, rule="feature-map")
    plus = rw.call(aten._softmax.default, (projected, -1, False), before=node, rule="feature-map")
    minus = rw.call(aten._softmax.default, (negated, -1, False), before=node, rule="feature-map")
    return rw.call(aten.cat.default, ([plus, minus], -1), before=node, rule="feature-map")


def _key_mask(rw: Rewriter, mask: torch.fx.Node, site: _Site) -> torch.fx.Node:
    """The per-key mask ``[B, S]`` (True: attend) from a mask ``[B, 1|H, T, S]``: its last query
    row for causal masks (the one that sees every key), any row otherwise."""
    node = site.node
    head = rw.call(aten.select.int, (mask, 1, 0), before=node, rule="key-mask")
    row = rw.call(
        aten.select.int, (head, 1, -1 if site.causal else 0), before=node, rule="key-mask"
    )
    if mask.meta["val"].dtype == torch.bool:
        return row
    return rw.call(aten.gt.Scalar, (row, MASKED), before=node, rule="key-mask")


# --- attention transfer --------------------------------------------------------------------------


def _call(gm: torch.fx.GraphModule, batch: Any, source: torch.fx.GraphModule) -> Any:
    info = trace_info(source)
    if batch is None:
        if info is None:
            raise RewriterError(
                "linearize needs calibration data or a graph made by rewriter.trace"
            )
        args, kwargs = info.call_inputs(info.example_inputs)
        return gm(*args, **kwargs)
    return forward(gm, batch, info)


def _record(
    gm: torch.fx.GraphModule,
    sites: list[_Site],
    batches: list[torch.Tensor] | None,
    ctx: PassContext,
) -> list[list[tuple[torch.Tensor, ...]]]:
    """Per site and batch: (q, k, v, key_mask, softmax output) from the original graph."""
    nodes: list[torch.fx.Node] = []
    for site in sites:
        args = list(site.node.args) + [None] * 4
        nodes.extend(
            [args[0], args[1], args[2], site.node] + ([args[3]] if args[3] is not None else [])
        )
    probe = with_outputs(gm, nodes)
    recorded: list[list[tuple[torch.Tensor, ...]]] = [[] for _ in sites]
    with torch.no_grad():
        for batch in progress(
            batches or [None],
            total=len(batches or [None]),
            description="linearize: recording",
            enabled=ctx.progress,
        ):
            values = list(_call(probe, batch, gm))
            for i, site in enumerate(sites):
                q, k, v, out = values[:4]
                values = values[4:]
                key_mask = None
                if site.mask_kind != "none":
                    mask, values = values[0], values[1:]
                    head = mask[:, 0]
                    row = head[:, -1] if site.causal else head[:, 0]
                    key_mask = row if row.dtype == torch.bool else row > MASKED
                if site.kv_heads != site.heads:
                    repeat = site.heads // site.kv_heads
                    k, v = k.repeat_interleave(repeat, 1), v.repeat_interleave(repeat, 1)
                recorded[i].append((q, k, v, key_mask, out))
    return recorded


class _Transfer(torch.nn.Module):
    """One attention's feature maps (and window gate) around the linear attention op."""

    def __init__(self, site: _Site, step: LinearizePass, weights: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.feature_map_q = torch.nn.Parameter(weights["feature_map_q"].detach().clone())
        self.feature_map_k = torch.nn.Parameter(weights["feature_map_k"].detach().clone())
        self.window_factor = (
            torch.nn.Parameter(weights["window_factor"].detach().clone())
            if "window_factor" in weights
            else None
        )
        self.decay = weights.get("decay")
        self.settings = (site.causal, step.window, site.scale, step.eps)

    @staticmethod
    def features(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        projected = x @ weight
        return torch.cat([projected.softmax(-1), (-projected).softmax(-1)], -1)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None
    ) -> torch.Tensor:
        gate = torch.sigmoid(self.window_factor) if self.window_factor is not None else None
        return torch.ops.rewriter.linear_attention(
            q,
            k,
            v,
            self.features(q, self.feature_map_q),
            self.features(k, self.feature_map_k),
            key_mask,
            self.decay,
            gate,
            *self.settings,
        )


def _fit(
    gm: torch.fx.GraphModule,
    sites: list[_Site],
    params: dict[str, dict[str, str]],
    recorded: list[list[tuple[torch.Tensor, ...]]],
    step: LinearizePass,
    ctx: PassContext,
) -> dict[str, dict[str, float]]:
    """Fit each site's maps to its softmax outputs; held-out MSE before and after."""
    report: dict[str, dict[str, float]] = {}
    store = weights_of(gm)
    for site, samples in progress(
        list(zip(sites, recorded)),
        total=len(sites),
        description="linearize: attention transfer",
        enabled=ctx.progress,
    ):
        names = params[site.label]
        weights = {key: store.read(name) for key, name in names.items()}
        if site.decay is not None:
            weights["decay"] = site.decay
        module = _Transfer(site, step, weights)
        train_set = samples[:-1] if len(samples) > 1 else samples
        held_out = samples[-1]
        before = _mse(module, held_out)
        if module.window_factor is not None:
            _start_gate(module, train_set[0])
        traced = torch.fx.symbolic_trace(module)
        batches = [((q, k, v, m), out) for q, k, v, m, out in train_set]
        train(
            traced,
            batches,
            steps=step.fit_steps,
            lr=step.fit_lr,
            params=[n for n, _ in traced.named_parameters()],
            loss=lambda output, batch: torch.nn.functional.mse_loss(
                output.float(), batch[1].float()
            ),
            seed=ctx.seed,
            warmup=max(1, step.fit_steps // 10),
            schedule="cosine",
            show_progress=False,
            description=f"linearize: {site.label}",
        )
        for key, name in names.items():
            fitted = traced.get_parameter(key).detach().clone()
            store.write(name, torch.nn.Parameter(fitted, requires_grad=False), note="fitted")
        after = _mse(traced, held_out)
        report[site.label] = {"mse_before": before, "mse_after": after}
    return report


GATE_GRID = (0.01, 0.03, 0.1, 0.3, 0.6, 0.9)


def _start_gate(module: _Transfer, sample: tuple[torch.Tensor, ...]) -> None:
    """Start the window gate at the grid value with the least transfer MSE on one batch.

    LoLCATs starts every gate at 0.1; how the softmax band and the linear part should be
    balanced depends on the feature maps' scale and the sequence length, and a gate far from its
    best value takes many steps to move through the sigmoid.
    """
    assert module.window_factor is not None
    errors = {}
    for gate in GATE_GRID:
        with torch.no_grad():
            module.window_factor.fill_(math.log(gate / (1 - gate)))
        errors[gate] = _mse(module, sample)
    best = min(errors, key=errors.get)
    with torch.no_grad():
        module.window_factor.fill_(math.log(best / (1 - best)))


def _mse(module: torch.nn.Module, sample: tuple[torch.Tensor, ...]) -> float:
    q, k, v, mask, out = sample
    with torch.no_grad():
        return float(torch.nn.functional.mse_loss(module(q, k, v, mask).float(), out.float()))
