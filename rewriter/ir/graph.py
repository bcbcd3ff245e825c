"""The graph as a whole (copies, runs, outputs), and the one import for the IR's graph helpers.

This module holds what concerns a whole graph: copies that share weights, running it to record
node values or feed it calibration batches, probes that return inner values, output names. It
also re-exports the helpers of the IR's other modules (tensors and ties, look-through, linear
maps, provenance, fake-tensor metadata, printing) so that passes and backends import every graph
helper from ``rewriter.ir.graph``, as they did before the IR was split by concern.

These are read-only views and helpers. Mutation of the graph goes through
:class:`rewriter.rewrite.driver.Rewriter`; mutation of weights through
:class:`rewriter.ir.store.WeightStore`.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx
from torch.utils import _pytree as pytree

from rewriter.ir.fake import fake_mode_of, propagate_node, refresh_meta
from rewriter.ir.linear import LinearMap, as_linear, is_lm_head, linear_maps
from rewriter.ir.lookthrough import (
    is_metadata_reader,
    is_transparent,
    look_back,
    transparent_users,
)
from rewriter.ir.printing import format_graph, nodes_described, op_counts
from rewriter.ir.provenance import module_path, weight_name_for
from rewriter.ir.tensors import (
    TieGroup,
    get_tensor,
    is_weightless,
    prune_dead_get_attrs,
    set_tensor,
    tie_groups,
)

__all__ = [
    "LinearMap",
    "TieGroup",
    "as_linear",
    "copy_graph_module",
    "fake_mode_of",
    "feed",
    "format_graph",
    "get_tensor",
    "input_dependent",
    "is_lm_head",
    "is_metadata_reader",
    "is_transparent",
    "is_weightless",
    "linear_maps",
    "look_back",
    "module_path",
    "node_values",
    "nodes_described",
    "op_counts",
    "output_names",
    "positions",
    "propagate_node",
    "prune_dead_get_attrs",
    "refresh_meta",
    "set_tensor",
    "tie_groups",
    "transparent_users",
    "weight_name_for",
    "with_outputs",
]


# --- copies --------------------------------------------------------------------------------------


def copy_graph_module(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy with its own graph and module hierarchy that shares the weight tensors.

    Weights are never edited in place (the store writes new tensors), so sharing them is safe
    and makes a copy cost a graph, not a model.
    """
    with warnings.catch_warnings():
        # Deep-copying pytree specs trips a deprecation warning inside torch; harmless here.
        warnings.simplefilter("ignore", FutureWarning)
        graph = copy.deepcopy(gm.graph)
    new = torch.fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    new.meta = dict(getattr(gm, "meta", {}))
    return new


def input_dependent(gm: torch.fx.GraphModule) -> set[torch.fx.Node]:
    """The nodes whose value depends on the graph's inputs (placeholders and what they reach);
    every other node is a constant of the weights and the graph's structure."""
    dependent: set[torch.fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "output":
            continue
        if node.op == "placeholder" or any(a in dependent for a in node.all_input_nodes):
            dependent.add(node)
    return dependent


def node_values(
    gm: torch.fx.GraphModule,
    args: Sequence[Any],
    keep: Callable[[torch.fx.Node], bool] | None = None,
) -> dict[torch.fx.Node, Any]:
    """Run ``gm`` on positional ``args`` (no grad) and return the value of every node ``keep``
    selects (all by default)."""
    values: dict[torch.fx.Node, Any] = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n: torch.fx.Node) -> Any:
            result = super().run_node(n)
            if keep is None or keep(n):
                values[n] = result
            return result

    with torch.no_grad():
        Recorder(gm).run(*args)
    return values


def feed(gm: torch.fx.GraphModule, batch: Any) -> Any:
    """Call ``gm`` on a calibration batch: a [B, T] id tensor or a dict of named inputs.

    Token-model inputs the batch leaves out are filled the way a full, unpadded sequence has
    them: ``attention_mask`` all ones, ``position_ids`` counted from the mask (the step graphs of
    :mod:`rewriter.deploy` take both). Any other missing input is the caller's error.
    """
    names = [str(n.target) for n in gm.graph.find_nodes(op="placeholder")]
    given = dict(batch) if isinstance(batch, dict) else {names[0]: batch}
    given = {k: v for k, v in given.items() if k in names}
    if "attention_mask" in names and "attention_mask" not in given:
        given["attention_mask"] = torch.ones_like(given[names[0]])
    if "position_ids" in names and "position_ids" not in given:
        given["position_ids"] = positions(given["attention_mask"])
    return gm(**given)


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids from a (left-)padded attention mask, as Hugging Face ``generate`` makes them:
    the count of real tokens before each one; padding gets 1."""
    mask = attention_mask.long()
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)


def with_outputs(gm: torch.fx.GraphModule, nodes: list[torch.fx.Node]) -> torch.fx.GraphModule:
    """A copy of ``gm`` whose call returns the values of ``nodes`` (a tuple), for calibration.

    It takes the same inputs by name; weights are shared with ``gm``. Nodes only needed for the
    original outputs are dropped, so the copy computes no more than it must.
    """
    graph = torch.fx.Graph()
    mapping: dict[torch.fx.Node, torch.fx.Node] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        graph.graph_copy(gm.graph, mapping)  # copies everything but the output node
    graph.output(tuple(mapping[n] for n in nodes))
    graph.eliminate_dead_code(is_impure_node=lambda n: n.op == "call_module" or n.is_impure())
    copy = torch.fx.GraphModule(gm, graph, class_name="Probe")
    copy.meta = dict(getattr(gm, "meta", {}))
    return copy


def output_names(gm: torch.fx.GraphModule) -> list[str]:
    """Names for the graph's flat outputs from its output pytree (``["logits"]`` for HF LMs)."""
    info = getattr(gm.graph._codegen, "pytree_info", None)
    spec = getattr(info, "out_spec", None)
    if spec is None:
        count = len(pytree.tree_leaves(next(iter(gm.graph.find_nodes(op="output"))).args[0]))
        return ["output"] if count == 1 else [f"output_{i}" for i in range(count)]
    dummy = pytree.tree_unflatten(list(range(spec.num_leaves)), spec)
    names = []
    for path, _ in pytree.tree_flatten_with_path(dummy)[0]:
        parts = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
        names.append("_".join(parts) or "output")
    if len(set(names)) != len(names) or any(not n.isidentifier() for n in names):
        return [f"output_{i}" for i in range(len(names))]
    return names
