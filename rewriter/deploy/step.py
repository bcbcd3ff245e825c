"""The step graph: a causal LM run on a sequence's prefix with a cache, then on its last token.

Why one graph first. Prefill (a prompt -> logits and cache) and decode (one token and the cache ->
logits and the new cache) are two computations over the same weights; a pass that ran on each
separately could decide differently (calibration, budgets, fitted maps) or store a weight twice.
So :func:`trace_causal_lm` traces a **step graph**: the model run on a sequence's prefix with a
cache, then on its last token from that cache, in one graph whose interface is a full-sequence
forward (``input_ids, attention_mask, position_ids -> logits``). Every pass, calibration,
verification and training works on it unchanged, and sees both computations. Marker ops
(:mod:`rewriter.ops.deploy`) record where the cut goes: :func:`rewriter.deploy.cut.split` then makes

* a **prefill graph**: ``(input_ids [B, T], attention_mask [B, T], position_ids [B, T]) ->
  (logits [B, T, V], cache...)``, each cache tensor ``[B, heads, T, head_dim]``;
* a **decode graph**: ``(input_ids [B, 1], attention_mask [B, P + 1], position_ids [B, 1],
  cache... [B, heads, P, head_dim]) -> (logits [B, 1, V], cache... [.., P + 1, ..])``,

re-exported with dynamic batch, length and cache length, their weights bound to the same tensors.
The cut is :mod:`rewriter.deploy.cut`; :func:`rewriter.deploy.generation.generate` runs the
graphs (greedy or sampled, left-padded batches) in torch, and
``rewriter.backends.onnx.export_causal_lm`` gives ONNX Runtime sessions the same loop runs on.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.fx

from rewriter.errors import TraceError
from rewriter.ir.graph import positions, set_tensor
from rewriter.ir.trace import TRACE_INFO_KEY, trace, trace_info
from rewriter.ops.deploy import cache_point, step_part

__all__ = ["STEP_KEY", "StepInfo", "strip_prefix", "trace_causal_lm"]

STEP_KEY = "rewriter.step"
"""Meta key of a step graph: the :class:`StepInfo` it was traced with."""


@dataclasses.dataclass(frozen=True)
class StepInfo:
    """Marks a step graph (the cache it carries is read off its ``cache_point`` nodes, which
    passes may change: ``linearize`` turns a layer's keys and values into its state)."""

    model_class: str


class _Step(torch.nn.Module):
    """The model on a sequence's prefix (building a cache), then on its last token from it."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.config = getattr(model, "config", None)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
    ) -> Any:
        first = self.model(
            step_part(input_ids, 0),
            attention_mask=step_part(attention_mask, 0),
            position_ids=step_part(position_ids, 0),
            use_cache=True,
        )
        cache = first.past_key_values
        for index, layer in enumerate(cache.layers):
            layer.keys = cache_point(layer.keys, index, 0)
            layer.values = cache_point(layer.values, index, 1)
        second = self.model(
            step_part(input_ids, 1),
            attention_mask=attention_mask,
            position_ids=step_part(position_ids, 1),
            past_key_values=cache,
            use_cache=True,
        )
        from transformers.modeling_outputs import CausalLMOutput

        return CausalLMOutput(logits=torch.cat([first.logits, second.logits], 1))


def trace_causal_lm(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
) -> torch.fx.GraphModule:
    """The step graph of a Hugging Face causal LM (see the module docstring).

    ``input_ids`` is an example of at least 2 rows and 3 tokens (batch and length stay dynamic).
    The graph's inputs are ``input_ids, attention_mask, position_ids``; it compares with
    ``model(input_ids, attention_mask=..., position_ids=..., use_cache=False)``.

    Example::

        >>> step = rewriter.deploy.trace_causal_lm(model, ids)
        >>> step = rewriter.Pipeline.parse("canonicalize,prernorm,fold-ln").run(step).graph_module
        >>> graphs = rewriter.deploy.split(step)
        >>> rewriter.deploy.generate(graphs, tokenizer, ["def f("], max_new_tokens=20).texts
    """
    if input_ids.dim() != 2 or input_ids.shape[0] < 2 or input_ids.shape[1] < 3:
        raise TraceError(
            "trace_causal_lm needs example input_ids of shape [batch >= 2, length >= 3] "
            f"(sizes 0 and 1 would be specialized), got {tuple(input_ids.shape)}"
        )
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    step = _Step(model)
    gm = trace(
        step,
        (input_ids, attention_mask, positions(attention_mask)),
        dynamic_shapes={
            "input_ids": {0: "batch", 1: "seq"},
            "attention_mask": {0: "batch", 1: "seq"},
            "position_ids": {0: "batch", 1: "seq"},
        },
    )
    strip_prefix(gm, "model")  # the model's own weight names, not the wrapper's
    info = trace_info(gm)
    assert info is not None
    gm.meta[TRACE_INFO_KEY] = dataclasses.replace(
        info,
        bound_kwargs={"use_cache": False},  # how the original model is compared with it
        num_positional=1,  # the model takes the mask and positions by keyword
        model_class=f"{type(model).__module__}.{type(model).__qualname__}",
    )
    if not gm.graph.find_nodes(op="call_function", target=torch.ops.rewriter.cache_point.default):
        raise TraceError(
            f"{type(model).__name__} returned no key/value cache with use_cache=True: "
            "only models with a Hugging Face Cache can be deployed with a cache"
        )
    gm.meta[STEP_KEY] = StepInfo(info.model_class)
    return gm


def strip_prefix(gm: torch.fx.GraphModule, prefix: str) -> None:
    """Move every tensor under ``prefix.`` (a tracing wrapper's attribute) to the root, so the
    graph's weights have the model's own names (what ``save_pretrained`` and checkpoints use)."""
    lead = prefix + "."
    tensors = {
        name: tensor
        for name, tensor in [
            *gm.named_parameters(remove_duplicate=False),
            *gm.named_buffers(remove_duplicate=False),
        ]
        if name.startswith(lead)
    }
    for node in gm.graph.find_nodes(op="get_attr"):
        if str(node.target).startswith(lead):
            node.target = str(node.target)[len(lead) :]
    wrapper = getattr(gm, prefix, None)
    if isinstance(wrapper, torch.nn.Module):
        delattr(gm, prefix)
    for name, tensor in tensors.items():
        set_tensor(gm, name[len(lead) :], tensor)
    for node in gm.graph.nodes:  # module paths too: weights passes add are named after them
        stack = node.meta.get("nn_module_stack")
        if stack:
            node.meta["nn_module_stack"] = {
                key: (_unprefixed(path, prefix), cls) for key, (path, cls) in stack.items()
            }
    gm.recompile()


def _unprefixed(path: str, prefix: str) -> str:
    if path == prefix:
        return ""
    return path[len(prefix) + 1 :] if path.startswith(prefix + ".") else path
