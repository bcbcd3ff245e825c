"""``linearize``: softmax attention -> linear attention, fitted by attention transfer (approximate).

Every attention of the graph, ``aten.scaled_dot_product_attention`` or written-out softmax
attention (``canonicalize`` turns ``softmax(q k^T s + mask) v`` into the former; it runs first),
becomes ``rewriter::linear_attention`` over per-head feature maps (the op:
:mod:`rewriter.ops.attention`; its math and execution forms: :mod:`rewriter.ops.attention_forms`;
finding the attentions and reading their masks: :mod:`rewriter.analysis.attention`).

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
from typing import Any, ClassVar, Literal

import torch
import torch.fx

from rewriter.analysis.attention import (
    MASKED,
    AttentionSite,
    DecodeSite,
    attention_mask,
    classify_mask,
    find_attention_sites,
    key_mask_of,
)
from rewriter.analysis.canonicalize import canonicalize
from rewriter.context import PassContext, progress
from rewriter.deploy import STEP_KEY
from rewriter.errors import RewriterError, describe_node
from rewriter.ir.graph import copy_graph_module, weight_name_for, with_outputs
from rewriter.ir.store import weights as weights_of
from rewriter.ir.trace import trace_info
from rewriter.ops import OPS, arguments
from rewriter.ops.attention_decode import state_size
from rewriter.ops.deploy import FIRST_STATE_KIND
from rewriter.pipeline import Pass, PassResult, option
from rewriter.pipeline.metrics import perplexity_of_ids
from rewriter.pipeline.train import forward, train
from rewriter.rewrite.driver import Rewriter

__all__ = ["LinearizePass"]

aten = torch.ops.aten
LINEAR_ATTENTION = OPS["linear_attention"]
ATTENTION_STATE = OPS["linear_attention_state"]
ATTENTION_DECODE = OPS["linear_attention_decode"]
CACHE_POINT = torch.ops.rewriter.cache_point.default


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
        canonicalize(gm)  # written-out attention becomes SDPA
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
    def _sites(self, gm: torch.fx.GraphModule) -> tuple[list[AttentionSite], dict[int, DecodeSite]]:
        """The attentions to linearize and, in a step graph, the decode attentions of their
        layers (by cache layer)."""
        return find_attention_sites(
            gm,
            self.layers,
            step_graph=STEP_KEY in getattr(gm, "meta", {}),
            pass_name=self.name,
            ignore_rules=("feature-map",),  # the softmaxes of Hedgehog feature maps
        )

    def _inspect_masks(
        self,
        gm: torch.fx.GraphModule,
        sites: list[AttentionSite],
        batches: list[torch.Tensor] | None,
    ) -> None:
        """Classify each mask on real inputs: causal-and-padding, padding only, or a bias."""
        masked = [s for s in sites if s.mask_kind != "none"]
        if not masked:
            return
        inputs = [batches[0]] if batches else [None]
        probe = with_outputs(gm, [attention_mask(s.node) for s in masked])
        with torch.no_grad():
            values = _call(probe, inputs[0], gm)
        for site, mask in zip(masked, values):
            classify_mask(site, mask, alibi=self.decay == "alibi", pass_name=self.name)


# --- the rewrite ---------------------------------------------------------------------------------


def _lightning_decay(site: AttentionSite, layers: int) -> torch.Tensor:
    h = torch.arange(site.heads, dtype=torch.float64)
    return torch.exp(-(8.0 / site.heads) * (1 - site.layer / max(1, layers)) * h)


def _replace(
    gm: torch.fx.GraphModule,
    sites: list[AttentionSite],
    decodes: dict[int, DecodeSite],
    step: LinearizePass,
) -> dict[str, dict[str, str]]:
    """Swap every site for linear attention (and, in a step graph, its decode attention for a
    step from the recurrent state); returns each site's parameter names."""
    rw = Rewriter(gm, pass_name=step.name)
    params: dict[str, dict[str, str]] = {}
    for site in sites:
        node = site.node
        sdpa = arguments(node)
        q, k, v, mask = sdpa["query"], sdpa["key"], sdpa["value"], sdpa["attn_mask"]
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
        site.parts = {"q": q, "k": k, "v": v, "phi_q": phi_q, "phi_k": phi_k}
        site.parts |= {"key_mask": key_mask, "decay": decay_node, "window_gate": gate}
        site.parts |= {"causal": site.causal, "window": step.window}
        site.parts |= {"scale": site.scale, "eps": step.eps}
        args = LINEAR_ATTENTION.positional(**site.parts)
        new = rw.call(
            LINEAR_ATTENTION.overload, args, before=node, rule="linearize", meta_from=node
        )
        rw.replace(node, new, rule="linearize")
        site.node = new
        params[site.label] = names
        if site.cache_layer is not None:
            _replace_decode(rw, site, decodes[site.cache_layer], step, names)
    rw.finish(prune_weights=True)
    return params


def _repeat_heads(
    rw: Rewriter, k: Any, v: Any, site: AttentionSite, *, before: torch.fx.Node
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
    rw: Rewriter,
    site: AttentionSite,
    decode: DecodeSite,
    step: LinearizePass,
    names: dict[str, str],
) -> None:
    """The prefix's state becomes the cache; the decode attention runs one step from it."""
    node = decode.node
    parts = site.parts
    state = rw.call(  # the state op's arguments are the prefix attention's, by name
        ATTENTION_STATE.overload,
        ATTENTION_STATE.positional(**{name: parts[name] for name in ATTENTION_STATE.parameters}),
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
    sdpa = arguments(node)
    q, mask = sdpa["query"], sdpa["attn_mask"]
    dtype = q.meta["val"].dtype
    k, v = _repeat_heads(rw, decode.key, decode.value, site, before=node)
    phi_q = _feature_map(rw, q, site, "q", step, dtype, names, before=node)
    phi_k = _feature_map(rw, k, site, "k", step, dtype, names, before=node)
    valid = None
    if mask is not None:  # the new key's column of the decode mask [B, 1|H, 1, P + 1]
        row = rw.call(aten.select.int, (mask, 1, 0), before=node, rule="key-mask")
        row = rw.call(aten.select.int, (row, 1, 0), before=node, rule="key-mask")
        valid = rw.call(aten.select.int, (row, 1, -1), before=node, rule="key-mask")
        if mask.meta["val"].dtype != torch.bool:
            valid = rw.call(aten.gt.Scalar, (valid, MASKED), before=node, rule="key-mask")
    settings = {name: parts[name] for name in ("decay", "window_gate", "window", "scale", "eps")}
    token = {"q": q, "k": k, "v": v, "phi_q": phi_q, "phi_k": phi_k, "key_valid": valid}
    args = ATTENTION_DECODE.positional(**token, **settings, state=cached)
    out = rw.call(ATTENTION_DECODE.overload, args, before=node, rule="linearize", meta_from=node)
    result = rw.call(operator.getitem, (out, 0), before=node, rule="linearize", meta_from=node)
    rw.replace(node, result, rule="linearize")


def _feature_map(
    rw: Rewriter,
    x: torch.fx.Node,
    site: AttentionSite,
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


def _key_mask(rw: Rewriter, mask: torch.fx.Node, site: AttentionSite) -> torch.fx.Node:
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
    sites: list[AttentionSite],
    batches: list[torch.Tensor] | None,
    ctx: PassContext,
) -> list[list[tuple[torch.Tensor, ...]]]:
    """Per site and batch: (q, k, v, key_mask, softmax output) from the original graph."""
    nodes: list[torch.fx.Node] = []
    for site in sites:
        sdpa = arguments(site.node)
        mask = [sdpa["attn_mask"]] if sdpa["attn_mask"] is not None else []
        nodes.extend([sdpa["query"], sdpa["key"], sdpa["value"], site.node, *mask])
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
                    key_mask, values = key_mask_of(values[0], site.causal), values[1:]
                if site.kv_heads != site.heads:
                    repeat = site.heads // site.kv_heads
                    k, v = k.repeat_interleave(repeat, 1), v.repeat_interleave(repeat, 1)
                recorded[i].append((q, k, v, key_mask, out))
    return recorded


class _Transfer(torch.nn.Module):
    """One attention's feature maps (and window gate) around the linear attention op."""

    def __init__(
        self, site: AttentionSite, step: LinearizePass, weights: dict[str, torch.Tensor]
    ) -> None:
        super().__init__()
        self.feature_map_q = torch.nn.Parameter(weights["feature_map_q"].detach().clone())
        self.feature_map_k = torch.nn.Parameter(weights["feature_map_k"].detach().clone())
        self.window_factor = (
            torch.nn.Parameter(weights["window_factor"].detach().clone())
            if "window_factor" in weights
            else None
        )
        self.decay = weights.get("decay")
        self.settings = {"causal": site.causal, "window": step.window}
        self.settings |= {"scale": site.scale, "eps": step.eps}

    @staticmethod
    def features(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        projected = x @ weight
        return torch.cat([projected.softmax(-1), (-projected).softmax(-1)], -1)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None
    ) -> torch.Tensor:
        gate = torch.sigmoid(self.window_factor) if self.window_factor is not None else None
        phi_q, phi_k = self.features(q, self.feature_map_q), self.features(k, self.feature_map_k)
        args = LINEAR_ATTENTION.positional(
            q=q,
            k=k,
            v=v,
            phi_q=phi_q,
            phi_k=phi_k,
            key_mask=key_mask,
            decay=self.decay,
            window_gate=gate,
            **self.settings,
        )
        return LINEAR_ATTENTION.overload(*args)


def _fit(
    gm: torch.fx.GraphModule,
    sites: list[AttentionSite],
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
