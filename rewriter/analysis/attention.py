"""Attention sites: where a graph computes softmax attention, and what each one does.

An attention site is an ``aten.scaled_dot_product_attention`` node (``canonicalize`` turns
written-out ``softmax(q k^T s + mask) v`` into one), described by its heads (query heads and,
with GQA, fewer key/value heads), head dim, scale, causality and the kind of mask it takes
(:func:`describe_attention`). A mask is classified on a real value (:func:`classify_mask`):
causal-and-padding or padding only, and an additive bias that is exactly ALiBi's
``-slope_h (t - i)`` is read off as per-head slopes (:func:`alibi_slopes`); any other pattern
is refused, naming the node.

In a step graph (:mod:`rewriter.deploy`) each layer's attention appears twice: over the prefix,
whose keys and values are marked by ``rewriter::cache_point`` (:func:`cached_layer`), and the
last token's attention over ``cat(cache, new)`` (a :class:`DecodeSite`, :func:`decode_site`).
:func:`find_attention_sites` finds both and pairs them (:func:`pair_decode_sites`).

``linearize`` replaces the sites this finds by linear attention.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Collection
from typing import Any

import torch
import torch.fx

from rewriter.errors import RewriterError, describe_node
from rewriter.ir.provenance import module_path
from rewriter.ops.contract import arguments
from rewriter.rewrite.driver import PROVENANCE_KEY

__all__ = [
    "CACHE_VIEWS",
    "MASKED",
    "SDPA",
    "AttentionSite",
    "DecodeSite",
    "alibi_slopes",
    "attention_label",
    "attention_mask",
    "cache_point_of",
    "cache_walk",
    "cached_layer",
    "classify_mask",
    "decode_site",
    "describe_attention",
    "find_attention_sites",
    "key_mask_of",
    "pair_decode_sites",
]

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default
CACHE_POINT = torch.ops.rewriter.cache_point.default
MASKED = -1e30
"""Additive mask values at or below this mean "not attended"."""


@dataclasses.dataclass
class AttentionSite:
    """One attention node and what is known about it: what :func:`describe_attention` reads
    off the node, what :func:`classify_mask` learns from a real mask, and the fields a rewrite
    of the site fills in (``decay``, ``parts``)."""

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
    decay: torch.Tensor | None = None  # the decay a rewrite gave it
    cache_layer: int | None = None  # step graphs: the layer whose key/value cache it fills
    parts: dict[str, Any] = dataclasses.field(default_factory=dict)  # a rewrite's new op args


@dataclasses.dataclass
class DecodeSite:
    """A step graph's last-token attention over ``cat(cache, new)``."""

    node: torch.fx.Node
    layer: int
    key: torch.fx.Node  # the new token's key and value, [B, kv heads, 1, D]
    value: torch.fx.Node


def attention_label(node: torch.fx.Node) -> str:
    """The attention's source module (``model.layers.0.self_attn``), else the node's name."""
    return module_path(node) or node.name


def attention_mask(node: torch.fx.Node) -> Any:
    """The ``attn_mask`` argument of an SDPA node (None without one)."""
    return arguments(node)["attn_mask"]


def describe_attention(
    node: torch.fx.Node, label: str, index: int, pass_name: str
) -> AttentionSite:
    """An SDPA node as an :class:`AttentionSite` (``index``: its layer, in graph order).

    Refuses attention dropout, mismatched heads without GQA, and a mask with ``is_causal``.
    """
    args = arguments(node)
    q, k, mask = args["query"], args["key"], args["attn_mask"]
    causal = bool(args["is_causal"] or False)
    scale = args["scale"]
    gqa = bool(args["enable_gqa"] or False)
    if args["dropout_p"] or 0.0:
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
    return AttentionSite(
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


def find_attention_sites(
    gm: torch.fx.GraphModule,
    layers: str = ".*",
    *,
    step_graph: bool = False,
    pass_name: str = "linearize",
    ignore_rules: Collection[str] = (),
) -> tuple[list[AttentionSite], dict[int, DecodeSite]]:
    """The attentions whose label (:func:`attention_label`) fully matches ``layers`` and, in a
    step graph, the decode attentions of their layers (by cache layer).

    Raises when the graph computes softmax attention weights in a form that is no SDPA
    (softmaxes a rewrite made by one of ``ignore_rules`` do not count), and when ``layers``
    selects none of the graph's attentions.
    """
    pattern = re.compile(layers)
    found = list(gm.graph.find_nodes(op="call_function", target=SDPA))
    decodes: dict[int, DecodeSite] = {}
    sites = []
    for node in found:
        label = attention_label(node)
        if not pattern.fullmatch(label):
            continue
        decode = decode_site(node) if step_graph else None
        if decode is not None:
            decodes[decode.layer] = decode
            continue
        site = describe_attention(node, label, len(sites), pass_name)
        site.cache_layer = cached_layer(node.args[1]) if step_graph else None
        sites.append(site)
    if step_graph:
        pair_decode_sites(sites, decodes, pass_name)
    leftover = [
        n
        for n in gm.graph.nodes
        if n.op == "call_function"
        and n.target in (aten.softmax.int, aten._softmax.default)
        and getattr(n.meta.get(PROVENANCE_KEY), "rule", "") not in ignore_rules
    ]
    if leftover and len(found) == 0:
        raise RewriterError(
            f"pass '{pass_name}': {describe_node(leftover[0])} computes attention weights in a "
            "form canonicalize does not recognise (an additive bias inside baddbmm, as "
            "BLOOM's ALiBi; or a softmax in a wider dtype): nothing was linearized"
        )
    if not sites and found and layers != ".*":
        names = ", ".join(attention_label(n) for n in found)
        raise RewriterError(
            f"pass '{pass_name}': layers={layers!r} selects no attention (the graph's "
            f"attentions: {names})"
        )
    return sites, decodes


# --- step graphs: caches and decode attentions ---------------------------------------------------


CACHE_VIEWS = frozenset(
    {
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
)
"""Ops between a cache and the attention that reads it (Hugging Face's ``repeat_kv``)."""


def cache_walk(node: Any) -> list[torch.fx.Node]:
    """``node`` and what it views, up to the first op that is not a view."""
    chain = []
    while isinstance(node, torch.fx.Node):
        chain.append(node)
        if node.op != "call_function" or node.target not in CACHE_VIEWS:
            break
        node = node.args[0]
    return chain


def cache_point_of(node: torch.fx.Node, kind: int) -> torch.fx.Node | None:
    """The ``rewriter::cache_point`` of ``kind`` (0: keys, 1: values) that reads ``node``."""
    return next((u for u in node.users if u.target == CACHE_POINT and int(u.args[2]) == kind), None)


def cached_layer(key: torch.fx.Node) -> int | None:
    """The cache layer whose keys are the attention's keys (a step graph's prefix)."""
    for node in cache_walk(key):
        point = cache_point_of(node, 0)
        if point is not None:
            return int(point.args[1])
    return None


def decode_site(node: torch.fx.Node) -> DecodeSite | None:
    """``node`` as a decode attention: its keys and values ``cat(cache_point, new)``."""
    found = []
    for operand, kind in ((node.args[1], 0), (node.args[2], 1)):
        cat = cache_walk(operand)[-1]
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
    return DecodeSite(node, layer, key, value)


def pair_decode_sites(
    sites: list[AttentionSite], decodes: dict[int, DecodeSite], pass_name: str
) -> None:
    """Every selected prefix attention of a step graph needs its decode attention, and back:
    decode attentions of layers not selected are dropped from ``decodes`` (they keep their
    cache)."""
    layers = {s.cache_layer for s in sites}
    for site in sites:
        if site.cache_layer is None or site.cache_layer not in decodes:
            raise RewriterError(
                f"pass '{pass_name}': {describe_node(site.node)} in a step graph has no decode "
                "attention reading its cache (a pass changed the cache layout?)"
            )
    for layer in list(decodes):
        if layer not in layers:
            del decodes[layer]


# --- masks ---------------------------------------------------------------------------------------


def key_mask_of(mask: torch.Tensor, causal: bool) -> torch.Tensor:
    """The per-key mask ``[B, S]`` (True: attend) of a mask value ``[B, 1|H, T, S]``: its last
    query row for causal masks (the one that sees every key), any row otherwise."""
    head = mask[:, 0]
    row = head[:, -1] if causal else head[:, 0]
    return row if row.dtype == torch.bool else row > MASKED


def classify_mask(site: AttentionSite, mask: torch.Tensor, *, alibi: bool, pass_name: str) -> None:
    """Decide from a real mask value what the attention does (``site.causal``, and with
    ``alibi`` the slopes of an ALiBi bias: ``site.slopes``); refuse what linear attention
    cannot represent."""
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
            f"pass '{pass_name}': the mask of {where} is neither causal-and-padding nor padding "
            "only (a sliding window or a custom pattern): linear attention cannot represent it"
        )
    if bias is None or not bias.abs().max().item():
        return
    # A real additive bias: ALiBi, -slope_h (t - i), is the only one a decay represents.
    if not alibi or not site.causal:
        raise RewriterError(
            f"pass '{pass_name}': {where} adds a position bias to the attention scores (ALiBi?); "
            "linear attention drops it unless decay=alibi represents it"
        )
    site.slopes = alibi_slopes(bias, valid, site, pass_name)


def alibi_slopes(
    bias: torch.Tensor, valid: torch.Tensor, site: AttentionSite, pass_name: str
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
                f"-slope (t - i) in head {h}: no decay represents it"
            )
        slopes.append(slope)
    result = torch.tensor(slopes, dtype=torch.float64)
    if (result < 0).any():
        raise RewriterError(
            f"pass '{pass_name}': the bias of {describe_node(site.node)} grows with distance"
        )
    return result
