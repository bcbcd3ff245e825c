"""The cut: a (rewritten) step graph into prefill and decode graphs that share its weights.

The marker ops the step graph carries (:mod:`rewriter.ops.deploy`: ``step_part`` on its inputs,
``cache_point`` on each cache tensor) say where the cut goes. :func:`split` copies the part of
the graph each half needs (decode takes the cache points as inputs), exports both again with
dynamic batch, length and cache length, and binds their weights to the step graph's tensors,
returning a :class:`CausalLMGraphs`. :func:`grows` tells a cache of keys or values (growing
along dim 2) from a linearized layer's fixed-size state.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any

import torch
import torch.fx

from rewriter.deploy.step import STEP_KEY, StepInfo, strip_prefix
from rewriter.errors import RewriterError
from rewriter.ir.graph import get_tensor, positions, set_tensor
from rewriter.ir.trace import TRACE_INFO_KEY, trace, trace_info
from rewriter.ops.contract import arguments
from rewriter.ops.deploy import CACHE_KINDS, FIRST_STATE_KIND

__all__ = ["CausalLMGraphs", "grows", "split"]

aten = torch.ops.aten


@dataclasses.dataclass
class CausalLMGraphs:
    """A prefill graph and a decode graph that share their weights."""

    prefill: torch.fx.GraphModule
    decode: torch.fx.GraphModule
    cache: tuple[tuple[int, int], ...]
    """(layer, kind) of each cache tensor, in input/output order."""

    @property
    def cache_names(self) -> list[str]:
        return [_cache_name(layer, kind) for layer, kind in self.cache]

    @property
    def vocab(self) -> Any:
        from rewriter.analysis.vocab import vocab_map

        return vocab_map(self.prefill)

    def run_prefill(
        self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        with torch.no_grad():
            out = self.prefill(ids, mask, pos)
        return out[0], list(out[1:])

    def run_decode(
        self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache: list[torch.Tensor]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        with torch.no_grad():
            out = self.decode(ids, mask, pos, *cache)
        return out[0], list(out[1:])


def _cache_name(layer: int, kind: int) -> str:
    return f"past_{layer}_{CACHE_KINDS.get(kind, f'kind{kind}')}"


def grows(kind: int) -> bool:
    """Whether a cache tensor of this kind grows with the context (keys and values, along dim
    2) or has a fixed size (a linearized layer's state)."""
    return kind < FIRST_STATE_KIND


def split(step: torch.fx.GraphModule) -> CausalLMGraphs:
    """Cut a (rewritten) step graph into prefill and decode graphs that share weights."""
    info = step.meta.get(STEP_KEY)
    trace = trace_info(step)
    if not isinstance(info, StepInfo) or trace is None:
        raise RewriterError("split() takes a step graph made by rewriter.deploy.trace_causal_lm")
    prefix_logits, last_logits = _logits_halves(step)
    points = _cache_points(step)
    cache = tuple(sorted(points))
    prefill_outputs = [prefix_logits, *(points[key].args[0] for key in cache)]
    prefill = _cut(step, prefill_outputs, part=0, points=points)
    presents = [_present(points[key]) for key in cache]
    decode = _cut(step, [last_logits, *presents], part=1, points=points)
    return _retrace(step, prefill, decode, cache, trace)


def _logits_halves(step: torch.fx.GraphModule) -> tuple[torch.fx.Node, torch.fx.Node]:
    output = step.graph.output_node()
    value = output.args[0]
    while isinstance(value, (list, tuple, dict)):
        value = next(iter(value.values())) if isinstance(value, dict) else value[0]
    node = value
    if not (
        isinstance(node, torch.fx.Node)
        and node.target == aten.cat.default
        and len(node.args[0]) == 2
    ):
        raise RewriterError(
            "the step graph's logits are no longer the concatenation of its prefix and last-token "
            f"logits (found {getattr(node, 'target', node)}): a pass rewrote the step boundary"
        )
    prefix, last = node.args[0]
    return prefix, last


def _cache_points(step: torch.fx.GraphModule) -> dict[tuple[int, int], torch.fx.Node]:
    found = {}
    for node in step.graph.find_nodes(
        op="call_function", target=torch.ops.rewriter.cache_point.default
    ):
        found[(int(node.args[1]), int(node.args[2]))] = node
    return found


def _present(point: torch.fx.Node) -> torch.fx.Node | tuple[torch.fx.Node, int]:
    """The decode half's updated cache tensor: keys and values concatenate the cache point and
    the new entry; a linearized layer's state is output ``index`` of its decode step (returned
    as ``(step, index)``: the step graph itself does not use it)."""
    for user in point.users:
        if user.target == aten.cat.default and user.args[0][0] is point:
            return user
        if user.target == torch.ops.rewriter.linear_attention_decode.default:
            return user, 1 + list(arguments(user)["state"]).index(point)
    raise RewriterError(
        f"cache tensor {point.args[1:]} is not extended by a concatenation or updated by a "
        "linear-attention decode step in the decode half (a cache layout this split does not "
        "know)"
    )


def _cut(
    step: torch.fx.GraphModule,
    outputs: list[torch.fx.Node | tuple[torch.fx.Node, int]],
    *,
    part: int,
    points: dict[tuple[int, int], torch.fx.Node],
) -> torch.fx.GraphModule:
    """A copy of ``step`` computing only ``outputs``; for decode the cache points become inputs
    after the three token inputs. Its inputs still have the step graph's length (see
    :class:`_Prefill` and :class:`_Decode`, which adapt them)."""
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    stops = set(points.values()) if part == 1 else set()
    needed = _ancestors([o[0] if isinstance(o, tuple) else o for o in outputs], stop=stops)
    for node in step.graph.find_nodes(op="placeholder"):
        env[node] = graph.placeholder(str(node.target))
    if part == 1:
        for key in sorted(points):
            if points[key] in needed:
                env[points[key]] = graph.placeholder(_cache_name(*key))
    for node in step.graph.nodes:
        if node.op == "placeholder" or node not in needed or node in env:
            continue
        env[node] = graph.node_copy(node, lambda n: env[n])
    graph.output(
        tuple(
            graph.call_function(operator.getitem, (env[o[0]], o[1]))
            if isinstance(o, tuple)
            else env[o]
            for o in outputs
        )
    )
    gm = torch.fx.GraphModule(step, graph)
    gm.recompile()
    return gm


def _ancestors(outputs: list[torch.fx.Node], stop: set[torch.fx.Node]) -> set[torch.fx.Node]:
    seen: set[torch.fx.Node] = set()
    stack = list(outputs)
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node in stop:
            continue
        stack.extend(node.all_input_nodes)
    return seen


class _Prefill(torch.nn.Module):
    """The prefill cut on a prompt: one throw-away column appended, which its step parts drop
    (the cut's shape arithmetic is the step graph's, where the prefix is ``length - 1``)."""

    def __init__(self, cut: torch.fx.GraphModule) -> None:
        super().__init__()
        self.cut = cut

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> Any:
        return self.cut(
            torch.cat([input_ids, input_ids[:, -1:]], 1),
            torch.cat([attention_mask, attention_mask[:, -1:]], 1),
            torch.cat([position_ids, position_ids[:, -1:]], 1),
        )


class _DecodeBase(torch.nn.Module):
    """The decode cut on one token: ids and positions left-filled to the mask's length (the
    step parts read the last column only)."""

    def __init__(self, cut: torch.fx.GraphModule) -> None:
        super().__init__()
        self.cut = cut

    def _run(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache: tuple[torch.Tensor, ...],
    ) -> Any:
        fill = attention_mask[:, 1:].to(input_ids.dtype) * 0
        return self.cut(
            torch.cat([fill, input_ids], 1),
            attention_mask,
            torch.cat([fill.to(position_ids.dtype), position_ids], 1),
            *cache,
        )


def _decode_module(cut: torch.fx.GraphModule, cache_names: list[str]) -> torch.nn.Module:
    """A :class:`_DecodeBase` whose forward names every cache input (so the export, the graph
    and ONNX name them too)."""
    if not all(name.isidentifier() for name in cache_names):
        raise ValueError(f"cache names must be identifiers: {cache_names}")
    params = ", ".join(cache_names)
    source = (
        f"def forward(self, input_ids, attention_mask, position_ids, {params}):\n"
        f"    return self._run(input_ids, attention_mask, position_ids, ({params},))\n"
    )
    namespace: dict[str, Any] = {}
    exec(source, namespace)  # generated from the validated names above only
    cls = type("Decode", (_DecodeBase,), {"forward": namespace["forward"]})
    return cls(cut)


def _retrace(
    step: torch.fx.GraphModule,
    prefill: torch.fx.GraphModule,
    decode: torch.fx.GraphModule,
    cache: tuple[tuple[int, int], ...],
    trace_: Any,
) -> CausalLMGraphs:
    """Export both cut graphs again (fresh metadata, dynamic dims), weights shared with ``step``."""
    ids, mask, pos = trace_.example_inputs
    prefill_gm = trace(
        _Prefill(prefill),
        (ids, mask, pos),
        dynamic_shapes={
            "input_ids": {0: "batch", 1: "seq"},
            "attention_mask": {0: "batch", 1: "seq"},
            "position_ids": {0: "batch", 1: "seq"},
        },
    )
    with torch.no_grad():
        caches = prefill_gm(ids, mask, pos)[1:]
    next_ids = ids[:, -1:]
    next_mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    next_pos = positions(next_mask)[:, -1:]
    cache_names = [_cache_name(layer, kind) for layer, kind in cache]
    past = torch.export.Dim("past", min=1)
    batch = torch.export.Dim("batch")
    dynamic = {
        "input_ids": {0: batch},
        "attention_mask": {0: batch, 1: past + 1},
        "position_ids": {0: batch},
        **{
            _cache_name(layer, kind): {0: batch, 2: past} if grows(kind) else {0: batch}
            for layer, kind in cache
        },
    }
    decode_gm = trace(
        _decode_module(decode, cache_names),
        (next_ids, next_mask, next_pos, *caches),
        dynamic_shapes=dynamic,
    )
    for gm in (prefill_gm, decode_gm):
        strip_prefix(gm, "cut")
        _share_weights(step, gm)
        gm_info = trace_info(gm)
        assert gm_info is not None
        gm.meta[TRACE_INFO_KEY] = dataclasses.replace(
            gm_info,
            model_class=trace_.model_class,
            model_type=trace_.model_type,
            config=trace_.config,
            max_positions=trace_.max_positions,
        )
        for key, value in step.meta.items():  # what passes recorded (vocabulary maps, ...)
            if key not in (TRACE_INFO_KEY, STEP_KEY, "rewriter.store"):
                gm.meta.setdefault(key, value)
    return CausalLMGraphs(prefill_gm, decode_gm, cache)


def _share_weights(step: torch.fx.GraphModule, gm: torch.fx.GraphModule) -> None:
    """Bind ``gm``'s tensors to ``step``'s by name (a trace clones them)."""
    named = [
        *gm.named_parameters(remove_duplicate=False),
        *gm.named_buffers(remove_duplicate=False),
    ]
    for name, _ in named:
        try:
            source = get_tensor(step, name)
        except AttributeError:
            continue
        set_tensor(gm, name, source)
