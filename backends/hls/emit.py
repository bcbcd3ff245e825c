"""Lowering a graph to HLS C++: every node that depends on the inputs becomes a call to a
``kernels/hls`` template or a generated loop nest; everything else is a constant.

Shapes are the example inputs' (an FPGA design has static shapes). Nodes whose value does not
depend on the inputs (weights, masks, positions, rotary tables) are evaluated once in torch and
written as constants. Index-only ops (views, permutes, slices, expands, splits, ``cat``) are found
by running the op on a tensor of indices: an affine result becomes a loop nest, anything else an
index table. Elementwise ops broadcast the same way. Anything else is refused naming the node.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.fx
from rewriter.backends.hls.precision import FixedType, Precision

from rewriter.errors import LoweringError
from rewriter.ir.graph import input_dependent, module_path, node_values

aten = torch.ops.aten
TABLE_POINTS = 1024

INDEX_OPS = {
    aten.view.default,
    aten.reshape.default,
    aten._unsafe_view.default,
    aten.permute.default,
    aten.transpose.int,
    aten.t.default,
    aten.expand.default,
    aten.slice.Tensor,
    aten.select.int,
    aten.unsqueeze.default,
    aten.squeeze.dim,
    aten.squeeze.dims,
    aten.squeeze.default,
    aten.clone.default,
    aten.contiguous.default,
    aten.alias.default,
    aten.flatten.using_ints,
    aten.split.Tensor,
    aten.split_with_sizes.default,
    aten.chunk.default,
    aten.unbind.int,
    aten.detach.default,
    aten.lift_fresh_copy.default,
}
"""Ops that only move elements: lowered through their effect on an index tensor."""


@dataclasses.dataclass
class Value:
    """A tensor of the generated C++: a local array (or a top-level port), or a constant."""

    name: str
    shape: tuple[int, ...]
    ctype: str
    fixed: FixedType | None  # None: an integer array

    @property
    def size(self) -> int:
        return math.prod(self.shape) if self.shape else 1


@dataclasses.dataclass
class Program:
    """The lowered graph: declarations, statements, constants, and what each layer is."""

    inputs: list[Value]
    outputs: list[Value]
    typedefs: dict[str, str]
    locals: list[Value]
    body: list[str]
    constants: dict[str, tuple[str, list[int]]]  # name -> (C type, values)
    layers: list[dict[str, Any]]
    sources: list[Value] = dataclasses.field(default_factory=list)
    """The local each output port returns (the top function copies or streams it out)."""


def _affine(index: torch.Tensor) -> tuple[int, list[int]] | None:
    """``index`` as ``offset + sum(i_d * stride_d)`` over its shape, or None."""
    if index.numel() == 0:
        return 0, [0] * index.dim()
    flat = index.reshape(-1)
    offset = int(flat[0])
    strides = []
    for d, size in enumerate(index.shape):
        if size == 1:
            strides.append(0)
            continue
        step = [0] * index.dim()
        step[d] = 1
        strides.append(int(index[tuple(step)]) - offset)
    grids = torch.meshgrid(*[torch.arange(s) for s in index.shape], indexing="ij")
    built = offset + sum(g * s for g, s in zip(grids, strides)) if grids else torch.tensor(offset)
    return (offset, strides) if torch.equal(built.reshape(index.shape), index) else None


def _expr(variables: list[str], offset: int, strides: list[int]) -> str:
    terms = [f"{v} * {s}" if s != 1 else v for v, s in zip(variables, strides) if s]
    if offset or not terms:
        terms.insert(0, str(offset))
    return " + ".join(terms)


def loop_nest(shape: tuple[int, ...], body: Callable[[list[str]], str], label: str) -> list[str]:
    """Nested loops over ``shape`` around ``body(index variable names)``."""
    if not shape:
        return [body([])]
    names = [f"i{d}" for d in range(len(shape))]
    lines = []
    for d, (name, size) in enumerate(zip(names, shape)):
        pad = "    " * d
        lines.append(f"{pad}{label}_{d}: for (int {name} = 0; {name} < {size}; {name}++) {{")
    lines.append("    " * len(shape) + body(names))
    for d in reversed(range(len(shape))):
        lines.append("    " * d + "}")
    return lines


class Lowering:
    """One export's lowering state (see the module docstring)."""

    def __init__(
        self,
        gm: torch.fx.GraphModule,
        example_inputs: tuple[Any, ...],
        precision: Precision,
        reuse_factor: int,
        subgraph: str | None,
    ) -> None:
        self.gm = gm
        self.precision = precision
        self.reuse = max(1, int(reuse_factor))
        self.values = node_values(gm, example_inputs)
        self.dynamic = input_dependent(gm)
        self.typedefs: dict[str, str] = {}
        self.locals: list[Value] = []
        self.body: list[str] = []
        self.constants: dict[str, tuple[str, list[int]]] = {}
        self.layers: list[dict[str, Any]] = []
        self.env: dict[torch.fx.Node, Value] = {}
        self.tables: dict[str, tuple[str, str]] = {}
        self.selected = self._select(subgraph)

    # -- which nodes are computed -----------------------------------------------------------------
    def _select(self, subgraph: str | None) -> list[torch.fx.Node]:
        nodes = [n for n in self.gm.graph.nodes if n.op == "call_function" and n in self.dynamic]
        if subgraph is None:
            return nodes
        chosen = [n for n in nodes if (module_path(n) or "").startswith(subgraph)]
        if not chosen:
            known = sorted({(module_path(n) or "").split(".")[0] for n in nodes} - {""})
            raise LoweringError(
                f"hls export: subgraph '{subgraph}' selects no computed node (source modules: "
                f"{', '.join(known)}...)"
            )
        # getitems of a chosen multi-output node belong to it
        chosen_set = set(chosen)
        for n in nodes:
            if n.target is operator.getitem and n.args[0] in chosen_set:
                chosen_set.add(n)
        return [n for n in nodes if n in chosen_set]

    def run(self) -> Program:
        chosen = set(self.selected)
        inputs: list[Value] = []
        for node in self.gm.graph.nodes:
            if (
                node.op == "placeholder"
                and node in self.dynamic
                and any(u in chosen for u in node.users)
            ):
                inputs.append(self._port(node, "in"))
        for node in self.selected:  # values flowing in from outside a subgraph are inputs too
            for source in node.all_input_nodes:
                if source in self.dynamic and source not in chosen and source not in self.env:
                    if source.op == "placeholder":
                        continue
                    inputs.append(self._port(source, "in"))
        for node in self.selected:
            self._lower(node)
        outputs, sources = self._outputs(chosen)
        return Program(
            inputs,
            outputs,
            self.typedefs,
            self.locals,
            self.body,
            self.constants,
            self.layers,
            sources,
        )

    def _outputs(self, chosen: set[torch.fx.Node]) -> tuple[list[Value], list[Value]]:
        ends = []
        graph_outputs = set(self.gm.graph.output_node().all_input_nodes)
        for node in self.selected:
            if node.target is operator.getitem and isinstance(self.values[node], tuple):
                continue
            outside = [u for u in node.users if u not in chosen]
            if outside or node in graph_outputs:
                if isinstance(self.values[node], torch.Tensor):
                    ends.append(node)
        if not ends:
            ends = [self.selected[-1]]
        sources = [self.env[node] for node in ends]
        ports = [Value(f"out_{v.name}", v.shape, v.ctype, v.fixed) for v in sources]
        return ports, sources

    # -- values -----------------------------------------------------------------------------------
    def _type_for(self, node: torch.fx.Node, value: torch.Tensor) -> tuple[str, FixedType | None]:
        if not value.is_floating_point():
            return "int", None
        fixed = self.precision.for_node(node.name, module_path(node))
        name = f"t_{node.name}"
        self.typedefs[name] = fixed.cpp()
        return name, fixed

    def _port(self, node: torch.fx.Node, kind: str) -> Value:
        value = self.values[node]
        ctype, fixed = self._type_for(node, value)
        port = Value(f"{kind}_{node.name}", tuple(value.shape), ctype, fixed)
        self.env[node] = port
        return port

    def _local(self, node: torch.fx.Node, value: torch.Tensor | None = None) -> Value:
        value = self.values[node] if value is None else value
        ctype, fixed = self._type_for(node, value)
        local = Value(f"v_{node.name}", tuple(value.shape), ctype, fixed)
        self.locals.append(local)
        self.env[node] = local
        return local

    def constant(self, key: str, tensor: torch.Tensor, kind: FixedType | None = None) -> Value:
        """A constant array (raw bits of ``kind``, or integers); reused by name."""
        name = f"c_{key}"
        tensor = tensor.detach()
        if name not in self.constants:
            if tensor.is_floating_point():
                kind = kind or self.precision.weight  # type: ignore[assignment]
                quantum = kind.quantum()  # type: ignore[union-attr]
                top = 2 ** (kind.width - 1)  # type: ignore[union-attr]
                codes = torch.clamp(torch.round(tensor.double() / quantum), -top, top - 1)
                ctype = "int32_t" if kind.width <= 32 else "int64_t"  # type: ignore[union-attr]
                self.constants[name] = (ctype, codes.long().reshape(-1).tolist())
            else:
                self.constants[name] = ("int32_t", tensor.long().reshape(-1).tolist())
        fixed = kind if tensor.is_floating_point() else None
        return Value(name, tuple(tensor.shape), "int32_t", fixed)

    def operand(self, arg: Any, like: torch.fx.Node) -> tuple[Value | None, torch.Tensor | float]:
        """A node argument as a computed value (None plus the constant when it is constant)."""
        if isinstance(arg, torch.fx.Node):
            if arg in self.env:
                return self.env[arg], self.values[arg]
            value = self.values[arg]
            if arg in self.dynamic:
                raise LoweringError(f"hls export: '{arg.name}' is used before it is computed", like)
            return None, value
        return None, arg

    # -- lowering one node ------------------------------------------------------------------------
    def _lower(self, node: torch.fx.Node) -> None:
        value = self.values[node]
        target = node.target
        if target is operator.getitem:
            return self._getitem(node)
        if target in INDEX_OPS:
            return self._index_op(node)
        handler = HANDLERS.get(target)
        if handler is None:
            raise LoweringError(
                f"hls export: no HLS lowering for {target} (node '{node.name}', module "
                f"'{module_path(node) or '?'}')",
                node,
            )
        if not isinstance(value, torch.Tensor):
            raise LoweringError(f"hls export: {target} returns {type(value).__name__}", node)
        handler(self, node)

    def call(self, template: str, parameters: list[Any], arguments: list[Any]) -> None:
        """Emit ``rw::template<parameters>(arguments);``."""
        params = ", ".join(str(p) for p in parameters)
        self.body.append(f"rw::{template}<{params}>({', '.join(str(a) for a in arguments)});")

    def layer(self, node: torch.fx.Node, kind: str, **info: Any) -> None:
        self.layers.append({"node": node.name, "module": module_path(node), "kind": kind, **info})

    # index-only ops ---------------------------------------------------------------------------
    def _index_map(self, node: torch.fx.Node) -> tuple[torch.fx.Node, Any]:
        source = node.args[0]
        shape = tuple(self.values[source].shape)
        index = torch.arange(math.prod(shape), dtype=torch.long).reshape(shape)
        args = [index, *node.args[1:]]
        return source, node.target(*args, **node.kwargs)

    def _index_op(self, node: torch.fx.Node) -> None:
        source, mapped = self._index_map(node)
        if isinstance(mapped, (tuple, list)):  # split/chunk/unbind: lowered at each getitem
            return
        self._gather(node, source, mapped)

    def _getitem(self, node: torch.fx.Node) -> None:
        parent, position = node.args
        if parent.target in INDEX_OPS:
            source, mapped = self._index_map(parent)
            return self._gather(node, source, mapped[position])
        raise LoweringError(f"hls export: getitem of {parent.target} is not supported", node)

    def _gather(self, node: torch.fx.Node, source: Any, index: torch.Tensor) -> None:
        src, _ = self.operand(source, node)
        if src is None:
            raise LoweringError(
                "hls export: an index op on a constant should have been folded", node
            )
        out = self._local(node)
        affine = _affine(index)
        if affine is not None:
            offset, strides = affine
            flat = _flat_strides(out.shape)
            self.body += loop_nest(
                out.shape,
                lambda v: (
                    f"{out.name}[{_expr(v, 0, flat)}] = {src.name}[{_expr(v, offset, strides)}];"
                ),
                f"MOVE_{node.name}",
            )
        else:
            table = self.constant(f"{node.name}_index", index)
            self.body += loop_nest(
                (out.size,),
                lambda v: f"{out.name}[{v[0]}] = {src.name}[{table.name}[{v[0]}]];",
                f"GATHER_{node.name}",
            )

    # elementwise ----------------------------------------------------------------------------------
    def elementwise(
        self, node: torch.fx.Node, args: list[Any], formula: Callable[[list[str]], str]
    ) -> Value:
        """``out = formula(operand expressions)``, broadcasting; constants inline or as arrays."""
        out = self._local(node)
        flat = _flat_strides(out.shape)
        pieces: list[Callable[[list[str]], str]] = []
        for arg in args:
            src, constant = self.operand(arg, node)
            if src is not None:
                source_shape = src.shape
                index = torch.arange(src.size).reshape(source_shape).broadcast_to(out.shape)
                offset, strides = _affine(index)  # broadcasting is always affine
                pieces.append(
                    lambda v, s=src, o=offset, st=strides: f"acc_t({s.name}[{_expr(v, o, st)}])"
                )
            elif isinstance(constant, torch.Tensor) and constant.numel() > 1:
                const = self.constant(f"{node.name}_{len(pieces)}", constant.to(torch.float64))
                index = (
                    torch.arange(constant.numel()).reshape(constant.shape).broadcast_to(out.shape)
                )
                offset, strides = _affine(index)
                pieces.append(
                    lambda v, c=const, o=offset, st=strides: (
                        f"acc_t(rw::from_bits<t_weight>({c.name}[{_expr(v, o, st)}]))"
                    )
                )
            else:
                scalar = float(constant.item() if isinstance(constant, torch.Tensor) else constant)
                pieces.append(lambda v, x=scalar: f"acc_t({x!r})")
        self.body += loop_nest(
            out.shape,
            lambda v: (
                f"{out.name}[{_expr(v, 0, flat)}] = {out.ctype}({formula([p(v) for p in pieces])});"
            ),
            f"EW_{node.name}",
        )
        return out

    def table(
        self, name: str, function: Callable[[torch.Tensor], torch.Tensor], lo: float, hi: float
    ) -> tuple[str, str]:
        """A tabulated function (``TABLE_POINTS + 1`` points on [lo, hi]): its constant's name
        and its entry type, the table precision's width with the integer bits its values need."""
        if name not in self.tables:
            points = torch.linspace(lo, hi, TABLE_POINTS + 1, dtype=torch.float64)
            values = function(points)
            base: FixedType = self.precision.table  # type: ignore[assignment]
            integer = max(2, math.ceil(math.log2(float(values.abs().max()) + 1)) + 1)
            kind = FixedType(base.width, max(base.integer, integer))
            type_name = f"t_table_{name}"
            self.typedefs[type_name] = kind.cpp()
            const = self.constant(f"table_{name}", values, kind)
            self.tables[name] = (const.name, type_name)  # type: ignore[assignment]
        return self.tables[name]  # type: ignore[return-value]


def _flat_strides(shape: tuple[int, ...]) -> list[int]:
    strides, running = [], 1
    for size in reversed(shape):
        strides.append(running)
        running *= size
    return list(reversed(strides))


HANDLERS: dict[Any, Callable[[Lowering, torch.fx.Node], None]] = {}


def handles(*targets: Any) -> Callable:
    def register(function: Callable[[Lowering, torch.fx.Node], None]) -> Callable:
        for target in targets:
            HANDLERS[target] = function
        return function

    return register
