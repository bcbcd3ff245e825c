"""Graph utilities shared by every pass: copies, weights and ties, linear maps, look-through,
fake-tensor metadata and a stable printer.

These are read-only views and helpers. Mutation of the graph goes through
:class:`rewriter.driver.Rewriter`; mutation of weights through :class:`rewriter.store.WeightStore`.
"""

from __future__ import annotations

import copy
import dataclasses
import operator
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import sympy
import torch
import torch.fx
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp
from torch.utils import _pytree as pytree

from rewriter.errors import describe_node, source_module

__all__ = [
    "LinearMap",
    "TieGroup",
    "as_linear",
    "copy_graph_module",
    "fake_mode_of",
    "format_graph",
    "get_tensor",
    "is_lm_head",
    "is_metadata_reader",
    "is_transparent",
    "linear_maps",
    "look_back",
    "module_path",
    "op_counts",
    "output_names",
    "propagate_node",
    "prune_dead_get_attrs",
    "refresh_meta",
    "set_tensor",
    "tie_groups",
    "transparent_users",
    "weight_name_for",
    "with_outputs",
]

aten = torch.ops.aten


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


_DEFAULT_INPUTS = ("attention_mask", "position_ids")


def is_weightless(gm: torch.nn.Module) -> bool:
    """Whether ``gm`` holds its tensors on the meta device (traced without weights): its
    structure can be analysed and rewritten, its outputs cannot be computed."""
    return any(t.device.type == "meta" for t in [*gm.parameters(), *gm.buffers()] if t is not None)


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


# --- weights and ties ----------------------------------------------------------------------------


def get_tensor(gm: torch.nn.Module, target: str) -> torch.Tensor:
    """The tensor stored at attribute path ``target``."""
    owner, field = _owner(gm, target)
    value = getattr(owner, field)
    if not isinstance(value, torch.Tensor):
        raise KeyError(f"'{target}' is a {type(value).__name__}, not a tensor")
    return value


def set_tensor(gm: torch.nn.Module, target: str, value: torch.Tensor) -> None:
    """Store ``value`` at attribute path ``target`` (creating parent modules as needed).

    Keeps the attribute's kind: a parameter stays a parameter (frozen unless it was trainable),
    a buffer a buffer. New names become parameters when ``value`` is one, else buffers.
    """
    *path, field = target.split(".")
    owner: torch.nn.Module = gm
    for part in path:
        child = getattr(owner, part, None)
        if child is None:
            child = torch.nn.Module()
            owner.add_module(part, child)
        owner = child
    old = getattr(owner, field, None)
    was_param = field in owner._parameters
    if isinstance(value, torch.nn.Parameter) or (was_param and old is not None):
        if not isinstance(value, torch.nn.Parameter):
            value = torch.nn.Parameter(value, requires_grad=bool(old.requires_grad))
        owner._buffers.pop(field, None)
        owner._parameters[field] = value
    else:
        owner._parameters.pop(field, None)
        owner._buffers[field] = value


def _owner(gm: torch.nn.Module, target: str) -> tuple[torch.nn.Module, str]:
    *path, field = target.split(".")
    owner = gm
    for part in path:
        owner = getattr(owner, part)
    return owner, field


@dataclasses.dataclass(frozen=True)
class TieGroup:
    """Attribute names that hold one tensor object, and the graph nodes that read it."""

    names: tuple[str, ...]
    nodes: tuple[torch.fx.Node, ...]

    @property
    def uses(self) -> int:
        """How many graph uses the tensor has, over all its names."""
        return sum(len(n.users) for n in self.nodes)


def tie_groups(gm: torch.fx.GraphModule) -> list[TieGroup]:
    """Groups of attribute names bound to the same tensor (by identity), with their get_attrs.

    Identity, not ``data_ptr``, decides: meta tensors all have ``data_ptr() == 0``.
    Only groups with more than one name or more than one graph use are returned.
    """
    by_id: dict[int, list[str]] = {}
    for name, tensor in _named_tensors(gm):
        by_id.setdefault(id(tensor), []).append(name)
    nodes_by_target: dict[str, list[torch.fx.Node]] = {}
    for node in gm.graph.find_nodes(op="get_attr"):
        nodes_by_target.setdefault(node.target, []).append(node)
    groups = []
    for names in by_id.values():
        nodes = tuple(n for name in names for n in nodes_by_target.get(name, ()))
        group = TieGroup(tuple(names), nodes)
        if len(names) > 1 or group.uses > 1:
            groups.append(group)
    return groups


def _named_tensors(gm: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    yield from gm.named_parameters(remove_duplicate=False)
    yield from gm.named_buffers(remove_duplicate=False)


def prune_dead_get_attrs(gm: torch.fx.GraphModule) -> list[str]:
    """Remove get_attr nodes nobody reads, and the attribute names no node refers to any more.

    A tied embedding/head leaves a dead alias ``get_attr`` under the embedding's name; pruning it
    makes the tie visible as one node used twice. Returns the attribute names removed. The caller
    regenerates the code (``gm.recompile()``, or :meth:`rewriter.driver.Rewriter.finish`).
    """
    for node in list(gm.graph.find_nodes(op="get_attr")):
        if not node.users:
            gm.graph.erase_node(node)
    referenced = {n.target for n in gm.graph.find_nodes(op="get_attr")}
    removed = []
    for name, _ in list(_named_tensors(gm)):
        if name not in referenced:
            owner, field = _owner(gm, name)
            owner._parameters.pop(field, None)
            owner._buffers.pop(field, None)
            removed.append(name)
    return removed


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


# --- provenance ----------------------------------------------------------------------------------


def module_path(node: torch.fx.Node) -> str | None:
    """Path of the innermost module that produced ``node`` (``transformer.h.0.attn``)."""
    source = source_module(node)
    return source[0] if source else None


def weight_name_for(node: torch.fx.Node, suffix: str) -> str:
    """A name for a new tensor used by ``node``: its module path plus ``suffix``.

    ``weight_name_for(linear_node, "lora_A") == "transformer.h.0.attn.c_attn.lora_A"``; nodes
    without a source module fall back to the node's own name. The store makes it unique.
    """
    path = module_path(node)
    return f"{path}.{suffix}" if path else f"{node.name}_{suffix}"


# --- linear maps ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LinearMap:
    """One view over every form a linear map ``y = x W^T + b`` takes in an exported graph.

    ``layout`` says how the stored weight is laid out: ``"out_in"`` for ``nn.Linear`` and
    ``aten.linear``, ``"in_out"`` for GPT-2's ``Conv1D`` (``addmm(b, x, W)``) and ``x @ W``.
    """

    node: torch.fx.Node
    """The matmul node (``linear``, ``addmm``, ``mm`` or ``matmul``)."""
    output: torch.fx.Node
    """The node whose value is ``x W^T + b`` (the matmul itself, or the bias ``add``)."""
    input: torch.fx.Node
    weight: torch.fx.Node
    """The ``get_attr`` of the stored weight."""
    layout: str
    bias: torch.fx.Node | None
    in_features: int
    out_features: int

    @property
    def weight_name(self) -> str:
        return str(self.weight.target)

    @property
    def bias_name(self) -> str | None:
        return None if self.bias is None else str(self.bias.target)

    @property
    def module(self) -> str:
        """Module path of the map, from its weight's name (``transformer.h.0.attn.c_attn``)."""
        return self.weight_name.rsplit(".", 1)[0] if "." in self.weight_name else self.weight_name

    @property
    def out_dim(self) -> int:
        """The weight dimension that indexes output features."""
        return 0 if self.layout == "out_in" else 1

    @property
    def in_dim(self) -> int:
        """The weight dimension that indexes input features."""
        return 1 - self.out_dim


_TRANSPOSES = {aten.t.default, aten.transpose.int, aten.permute.default, aten.numpy_T.default}


def _weight_operand(node: Any) -> tuple[torch.fx.Node, bool] | None:
    """(get_attr, transposed) when ``node`` is a 2-D stored weight or its transpose."""
    if not isinstance(node, torch.fx.Node):
        return None
    if node.op == "get_attr":
        return (node, False) if _val_dim(node) == 2 else None
    if node.op == "call_function" and node.target in _TRANSPOSES:
        source = node.args[0]
        if isinstance(source, torch.fx.Node) and source.op == "get_attr" and _val_dim(source) == 2:
            if node.target == aten.permute.default and list(node.args[1]) != [1, 0]:
                return None
            return source, True
    return None


def _bias_operand(node: Any, out_features: int) -> torch.fx.Node | None:
    if isinstance(node, torch.fx.Node) and node.op == "get_attr":
        val = node.meta.get("val")
        if val is not None and tuple(val.shape) == (out_features,):
            return node
    return None


def as_linear(node: torch.fx.Node) -> LinearMap | None:
    """The linear map computed by ``node``, if it is one (any of the forms export produces)."""
    if node.op != "call_function":
        return None
    if node.target == aten.linear.default:
        return _from_linear(node)
    if node.target == aten.addmm.default:
        return _from_addmm(node)
    if node.target in (aten.mm.default, aten.matmul.default):
        return _from_matmul(node)
    return None


def _from_linear(node: torch.fx.Node) -> LinearMap | None:
    weight = _weight_operand(node.args[1])
    if weight is None or weight[1]:
        return None
    out_f, in_f = _shape(weight[0])
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    if bias is not None and _bias_operand(bias, out_f) is None:
        return None
    return LinearMap(node, node, node.args[0], weight[0], "out_in", bias, in_f, out_f)


def _from_addmm(node: torch.fx.Node) -> LinearMap | None:
    # GPT-2's Conv1D: addmm(bias, x, W) with W stored (in, out); a decomposed linear has W^T.
    if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
        return None
    weight = _weight_operand(node.args[2])
    if weight is None:
        return None
    layout, in_f, out_f = _layout(weight)
    bias = _bias_operand(node.args[0], out_f)
    if bias is None:
        return None
    return LinearMap(node, node, node.args[1], weight[0], layout, bias, in_f, out_f)


def _from_matmul(node: torch.fx.Node) -> LinearMap | None:
    # x @ W (+ b): the bias add, when there is one, is part of the map.
    weight = _weight_operand(node.args[1])
    if weight is None:
        return None
    layout, in_f, out_f = _layout(weight)
    output, bias = node, None
    if len(node.users) == 1:
        user = next(iter(node.users))
        if user.target == aten.add.Tensor and user.args[0] is node and not user.kwargs:
            bias = _bias_operand(user.args[1], out_f)
            output = user if bias is not None else node
    return LinearMap(node, output, node.args[0], weight[0], layout, bias, in_f, out_f)


def _layout(weight: tuple[torch.fx.Node, bool]) -> tuple[str, int, int]:
    """(layout, in_features, out_features) of a matmul's right operand."""
    rows, cols = _shape(weight[0])
    if weight[1]:  # transposed (out, in) storage
        return "out_in", cols, rows
    return "in_out", rows, cols


def is_lm_head(lin: LinearMap) -> bool:
    """A map whose output is a graph output (through views) or whose weight an embedding reads."""
    if any(u.target == aten.embedding.default for u in lin.weight.users):
        return True
    return any(user.op == "output" for user in _value_users(lin.output))


def _value_users(node: torch.fx.Node) -> list[torch.fx.Node]:
    found, stack, seen = [], list(node.users), set()
    while stack:
        user = stack.pop()
        if user in seen or is_metadata_reader(user):
            continue
        seen.add(user)
        if is_transparent(user):
            stack.extend(user.users)
        else:
            found.append(user)
    return found


def linear_maps(gm: torch.fx.GraphModule) -> list[LinearMap]:
    """Every linear map of the graph, in graph order."""
    return [lin for node in gm.graph.nodes if (lin := as_linear(node)) is not None]


def _shape(node: torch.fx.Node) -> tuple[int, ...]:
    return tuple(int(s) for s in node.meta["val"].shape)


def _val_dim(node: torch.fx.Node) -> int | None:
    val = node.meta.get("val")
    return val.dim() if isinstance(val, torch.Tensor) else None


# --- look-through --------------------------------------------------------------------------------

_CASTS = {aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, aten.type_as.default}
_IDENTITIES = {aten.alias.default, aten.clone.default, aten.contiguous.default, aten.detach.default}
_RESHAPES = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
_METADATA_READERS = {
    aten._assert_tensor_metadata.default,
    aten.sym_size.int,
    aten.sym_numel.default,
    aten.sym_stride.int,
    aten.sym_storage_offset.default,
}


def _last_dim(node: Any) -> Any:
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return val.shape[-1] if isinstance(val, torch.Tensor) and val.dim() > 0 else None


def is_transparent(node: torch.fx.Node) -> bool:
    """True when ``node`` passes each last-dim vector of its first input through unchanged.

    These are the ops a residual stream flows through: eval dropout, aliases and clones, dtype
    casts, views, reshapes and transposes that keep the last dimension in place, and slices or
    selects of tokens (any dim but the last).
    """
    if node.op != "call_function" or not node.args or not isinstance(node.args[0], torch.fx.Node):
        return False
    target = node.target
    if target == aten.dropout.default:
        return len(node.args) > 2 and node.args[2] is False
    if target in _IDENTITIES or target in _CASTS:
        return True
    source = node.args[0]
    if target in _RESHAPES:
        return _same_last_dim(source, node)
    if target == aten.transpose.int:
        rank = source.meta["val"].dim()
        dims = {d % rank for d in node.args[1:3]}
        return rank - 1 not in dims
    if target == aten.permute.default:
        perm = list(node.args[1])
        return perm[-1] % len(perm) == len(perm) - 1
    if target in (aten.slice.Tensor, aten.select.int):
        # Picking tokens (any dim but the last) passes each last-dim vector through unchanged.
        rank = source.meta["val"].dim()
        dim = node.args[1] if len(node.args) > 1 else 0
        return isinstance(dim, int) and dim % rank != rank - 1
    return False


def _same_last_dim(a: torch.fx.Node, b: torch.fx.Node) -> bool:
    last_a, last_b = _last_dim(a), _last_dim(b)
    return isinstance(last_a, int) and last_a == last_b


def is_metadata_reader(node: torch.fx.Node) -> bool:
    """True for nodes that read only a tensor's metadata (asserts, ``sym_size``), not its values."""
    return node.op == "call_function" and node.target in _METADATA_READERS


def look_back(node: torch.fx.Node) -> torch.fx.Node:
    """The first non-transparent producer of ``node`` (``node`` itself if it is not transparent)."""
    while is_transparent(node):
        node = node.args[0]
    return node


def transparent_users(node: torch.fx.Node) -> Iterator[torch.fx.Node]:
    """Users of ``node``'s value, looking through transparent ops; metadata readers skipped."""
    seen: set[torch.fx.Node] = set()
    stack = [(user, node) for user in node.users]
    while stack:
        user, source = stack.pop()
        if user in seen or is_metadata_reader(user):
            continue
        seen.add(user)
        if is_transparent(user) and user.args[0] is source:
            stack.extend((next_user, user) for next_user in user.users)
        else:
            yield user


# --- fake-tensor metadata ------------------------------------------------------------------------


def fake_mode_of(gm: torch.fx.GraphModule) -> FakeTensorMode | None:
    """The fake mode the export created (shared by every ``meta["val"]``), if there is one."""
    vals = [n.meta.get("val") for n in gm.graph.find_nodes(op="placeholder")]
    vals += [n.meta.get("val") for n in gm.graph.find_nodes(op="get_attr")]
    return detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)])


def refresh_meta(gm: torch.fx.GraphModule) -> None:
    """Recompute every node's ``meta["val"]`` with the export's fake mode (and its shape env)."""
    mode = fake_mode_of(gm)
    if mode is None:
        return
    _fake_get_attrs(gm, mode)
    placeholders = [n.meta["val"] for n in gm.graph.find_nodes(op="placeholder")]
    from torch._dispatch.python import enable_python_dispatcher

    with enable_python_dispatcher():
        FakeTensorProp(gm, mode=mode).propagate_dont_convert_inputs(*placeholders)


def _fake_get_attrs(gm: torch.fx.GraphModule, mode: FakeTensorMode) -> None:
    for node in gm.graph.find_nodes(op="get_attr"):
        tensor = get_tensor(gm, str(node.target))
        val = node.meta.get("val")
        if not _matches(val, tensor):
            node.meta["val"] = mode.from_tensor(tensor, static_shapes=True)


def _matches(val: Any, tensor: torch.Tensor) -> bool:
    return (
        isinstance(val, torch.Tensor)
        and val.shape == tensor.shape
        and val.dtype == tensor.dtype
        and val.device == tensor.device
    )


def propagate_node(
    gm: torch.fx.GraphModule, node: torch.fx.Node, mode: FakeTensorMode | None
) -> None:
    """Set ``node.meta["val"]`` by running its op on its inputs' fake values."""
    if mode is None:
        return
    if node.op == "get_attr":
        node.meta["val"] = mode.from_tensor(get_tensor(gm, str(node.target)), static_shapes=True)
        return
    if node.op != "call_function":
        return

    def fake(arg: Any) -> Any:
        if isinstance(arg, torch.fx.Node):
            if "val" not in arg.meta:
                propagate_node(gm, arg, mode)
            return arg.meta.get("val")
        return arg

    args = torch.fx.node.map_aggregate(node.args, fake)
    kwargs = torch.fx.node.map_aggregate(node.kwargs, fake)
    from torch._dispatch.python import enable_python_dispatcher

    with mode, enable_python_dispatcher():
        node.meta["val"] = node.target(*args, **kwargs)


# --- printing ------------------------------------------------------------------------------------


def op_counts(gm: torch.fx.GraphModule) -> dict[str, int]:
    """How many call_function nodes of each op the graph has (``{"aten.linear.default": 5}``)."""
    counts: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_function":
            key = _op_name(node.target)
            counts[key] = counts.get(key, 0) + 1
    return counts


def _op_name(target: Any) -> str:
    if target is operator.getitem:
        return "getitem"
    text = str(target)
    return text if "." in text and not text.startswith("<") else getattr(target, "__name__", text)


def format_graph(
    gm: torch.fx.GraphModule,
    *,
    dim_names: dict[str, str] | None = None,
    include: Callable[[torch.fx.Node], bool] | None = None,
) -> str:
    """A stable, readable listing of the graph for golden tests and debugging.

    One line per node: ``%name: f32[batch, seq, 32] = aten.layer_norm.default(%x, [32], ...)``.
    Symbolic dims are renamed ``d0, d1, ...`` in order of first appearance (their export names
    change from run to run), or by ``dim_names`` (``{"s43": "batch"}``).
    """
    renames: dict[sympy.Symbol, sympy.Symbol] = {}
    for key, value in (dim_names or {}).items():
        renames[sympy.Symbol(key, integer=True, positive=True)] = sympy.Symbol(value)
    lines = []
    for node in gm.graph.nodes:
        if include is not None and not include(node):
            continue
        lines.append(_format_node(node, renames))
    return "\n".join(lines)


def _format_node(node: torch.fx.Node, renames: dict[sympy.Symbol, sympy.Symbol]) -> str:
    type_text = _format_type(node.meta.get("val"), renames)
    head = f"%{node.name}{': ' + type_text if type_text else ''}"
    if node.op == "placeholder":
        return f"{head} = input"
    if node.op == "get_attr":
        return f"{head} = weight {node.target}"
    if node.op == "output":
        return f"return {_format_arg(node.args[0], renames)}"
    target = _op_name(node.target) if node.op == "call_function" else f"{node.op} {node.target}"
    args = [_format_arg(a, renames) for a in node.args]
    args += [f"{k}={_format_arg(v, renames)}" for k, v in node.kwargs.items()]
    return f"{head} = {target}({', '.join(args)})"


def _format_type(val: Any, renames: dict[sympy.Symbol, sympy.Symbol]) -> str:
    if isinstance(val, torch.Tensor):
        dims = ", ".join(_format_dim(d, renames) for d in val.shape)
        return f"{_DTYPE_SHORT.get(val.dtype, str(val.dtype))}[{dims}]"
    if isinstance(val, (list, tuple)) and val and all(isinstance(v, torch.Tensor) for v in val):
        return "(" + ", ".join(_format_type(v, renames) for v in val) + ")"
    if isinstance(val, torch.SymInt):
        return "sym " + _format_dim(val, renames)
    return ""


def _format_dim(dim: Any, renames: dict[sympy.Symbol, sympy.Symbol]) -> str:
    if isinstance(dim, int):
        return str(dim)
    expr = dim.node.expr if isinstance(dim, torch.SymInt) else dim
    for symbol in sorted(expr.free_symbols, key=str):
        if symbol not in renames:
            renames[symbol] = sympy.Symbol(f"d{len(renames)}")
    return str(expr.xreplace(renames))


def _format_arg(arg: Any, renames: dict[sympy.Symbol, sympy.Symbol]) -> str:
    if isinstance(arg, torch.fx.Node):
        return f"%{arg.name}"
    if isinstance(arg, (list, tuple)):
        inner = ", ".join(_format_arg(a, renames) for a in arg)
        return f"[{inner}]" if isinstance(arg, list) else f"({inner}{',' if len(arg) == 1 else ''})"
    if isinstance(arg, dict):
        return "{" + ", ".join(f"{k}: {_format_arg(v, renames)}" for k, v in arg.items()) + "}"
    if isinstance(arg, torch.SymInt):
        return _format_dim(arg, renames)
    if isinstance(arg, torch.dtype):
        return _DTYPE_SHORT.get(arg, str(arg))
    if isinstance(arg, torch.device):
        return f"'{arg}'"
    return repr(arg)


_DTYPE_SHORT = {
    torch.float32: "f32",
    torch.float64: "f64",
    torch.float16: "f16",
    torch.bfloat16: "bf16",
    torch.int64: "i64",
    torch.int32: "i32",
    torch.int8: "i8",
    torch.uint8: "u8",
    torch.bool: "b8",
}


def nodes_described(nodes: Iterable[torch.fx.Node]) -> str:
    """Comma-separated :func:`describe_node` of each node (for error messages)."""
    return ", ".join(describe_node(n) for n in nodes)
