"""Residual-stream analysis: which tensors form the stream, who writes it, who reads it.

Anchored on the normalizations (never on module names, never on "any add whose last dim is d",
which over-matches when the sequence length equals d): from the input of every norm of width d,
walk backwards through ops that carry the stream unchanged or linearly —

* eval dropout, aliases, clones, casts, views/reshapes/transposes that keep the last dim
  (:func:`rewriter.graph.is_transparent`);
* ``add`` / ``sub`` of two tensors whose last dim is d (broadcast over leading dims only);
* multiplication or division by a Python scalar (embedding scales);

— and everything else that feeds the stream is a **writer**: a linear map (any form, through
:class:`~rewriter.graph.LinearMap`), an embedding lookup, a stored tensor, or another op (BLOOM's
embedding LayerNorm). The analysis then checks closure: every stream node and every writer is read
only by stream nodes, by the norms' inputs, or by metadata readers (shape asserts). A stream
node read by anything else means the stream is observed directly — a Post-LN model (the norm's
output is the residual), or hidden states returned as graph outputs — and the analysis refuses,
naming the node and its source module.

The result drives ``prernorm`` (center every writer, then every reader norm sees a zero-mean
input) and ``crmsnorm`` (drop one coordinate of the zero-mean stream).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import torch
import torch.fx

from rewriter.errors import PreconditionError, describe_node
from rewriter.ir.graph import LinearMap, is_metadata_reader, is_transparent, linear_maps
from rewriter.ir.lookthrough import last_dim

__all__ = ["NORM_OPS", "ResidualStream", "Writer", "find_stream", "norm_width", "norms_of_width"]

aten = torch.ops.aten

NORM_OPS = (aten.layer_norm.default, aten.rms_norm.default)
"""Ops that read the stream as normalizations (anchors of the analysis)."""


@dataclasses.dataclass(frozen=True)
class Writer:
    """A node whose value is added into the residual stream.

    ``kind`` is ``"linear"`` (``linear`` set), ``"embedding"`` (``table`` is the ``get_attr`` of
    the embedding table), ``"tensor"`` (a stored tensor added directly), or ``"other"`` (only an
    explicit centering op can make it zero-mean).
    """

    node: torch.fx.Node
    kind: str
    linear: LinearMap | None = None
    table: torch.fx.Node | None = None


@dataclasses.dataclass
class ResidualStream:
    """The stream of width ``width``: its nodes, writers and reader norms."""

    width: int
    norms: list[torch.fx.Node]
    nodes: set[torch.fx.Node]
    writers: list[Writer]
    regions: dict[torch.fx.Node, tuple[frozenset[torch.fx.Node], frozenset[torch.fx.Node]]] = (
        dataclasses.field(default_factory=dict)
    )
    """Per norm, the stream nodes and writer nodes its input is made of. A norm whose output is
    itself a writer (BLOOM's embedding LayerNorm) reads a region separate from the main one."""

    def writer_norms(self) -> list[torch.fx.Node]:
        """Norms whose output writes the stream (their input is a region of its own)."""
        writer_nodes = {w.node for w in self.writers}
        return [n for n in self.norms if n in writer_nodes]

    def describe(self) -> str:
        kinds: dict[str, int] = {}
        for writer in self.writers:
            kinds[writer.kind] = kinds.get(writer.kind, 0) + 1
        parts = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
        return f"stream of width {self.width}: {len(self.norms)} norms, writers: {parts}"


def norm_width(node: torch.fx.Node) -> int | None:
    """The normalized width of a ``layer_norm`` / ``rms_norm`` over the last dim, else None."""
    if node.op != "call_function" or node.target not in NORM_OPS:
        return None
    shape = node.args[1]
    if not isinstance(shape, (list, tuple)) or len(shape) != 1 or not isinstance(shape[0], int):
        return None
    return int(shape[0])


def norms_of_width(
    gm: torch.fx.GraphModule, targets: Iterable[object] = NORM_OPS
) -> dict[int, list[torch.fx.Node]]:
    """Norm nodes of the given ops, grouped by their normalized width."""
    wanted = set(targets)
    found: dict[int, list[torch.fx.Node]] = {}
    for node in gm.graph.nodes:
        width = norm_width(node)
        if width is not None and node.target in wanted:
            found.setdefault(width, []).append(node)
    return found


def _is_stream_add(node: torch.fx.Node, width: int) -> bool:
    """``add``/``sub`` of two tensors of last dim ``width``, broadcasting over leading dims only."""
    if node.op != "call_function" or node.target not in (aten.add.Tensor, aten.sub.Tensor):
        return False
    if node.kwargs.get("alpha", 1) != 1 or len(node.args) != 2:
        return False
    a, b = node.args
    if not (isinstance(a, torch.fx.Node) and isinstance(b, torch.fx.Node)):
        return False
    return last_dim(a) == width and last_dim(b) == width and last_dim(node) == width


def _is_scalar_scale(node: torch.fx.Node) -> bool:
    return (
        node.op == "call_function"
        and node.target in (aten.mul.Tensor, aten.div.Tensor)
        and len(node.args) == 2
        and isinstance(node.args[0], torch.fx.Node)
        and isinstance(node.args[1], (int, float))
        and not isinstance(node.args[1], bool)
    )


def find_stream(
    gm: torch.fx.GraphModule,
    *,
    width: int | None = None,
    anchors: Iterable[object] = (aten.layer_norm.default,),
) -> ResidualStream | None:
    """Analyse the residual stream read by the ``anchors`` norms (None if there are none).

    With several norm widths in the graph, ``width`` picks one (default: the most common).
    Raises :class:`PreconditionError` naming the node when the stream is observed by anything
    other than norms.
    """
    groups = norms_of_width(gm, anchors)
    if not groups:
        return None
    if width is None:
        width = max(groups, key=lambda w: len(groups[w]))
    norms = groups.get(width, [])
    if not norms:
        return None
    by_output = {lin.output: lin for lin in linear_maps(gm)}
    nodes: set[torch.fx.Node] = set()
    writers: dict[torch.fx.Node, Writer] = {}
    regions = {}
    for norm in norms:
        region_nodes, region_writers = _walk(norm.args[0], width, by_output)
        regions[norm] = (frozenset(region_nodes), frozenset(region_writers))
        nodes |= region_nodes
        writers.update(region_writers)
    stream = ResidualStream(width, norms, nodes, list(writers.values()), regions)
    _check_closure(stream)
    return stream


def _walk(
    start: torch.fx.Node, width: int, by_output: dict[torch.fx.Node, LinearMap]
) -> tuple[set[torch.fx.Node], dict[torch.fx.Node, Writer]]:
    """Stream nodes and writers reached backwards from one norm's input."""
    nodes: set[torch.fx.Node] = set()
    writers: dict[torch.fx.Node, Writer] = {}
    stack = [start]
    while stack:
        node = stack.pop()
        if node in nodes or node in writers:
            continue
        if node in by_output:
            writers[node] = Writer(node, "linear", linear=by_output[node])
        elif is_transparent(node) or _is_scalar_scale(node):
            nodes.add(node)
            stack.append(node.args[0])
        elif _is_stream_add(node, width):
            nodes.add(node)
            stack.extend(node.args)
        else:
            writers[node] = _classify(node)
    return nodes, writers


def _classify(node: torch.fx.Node) -> Writer:
    if node.op == "call_function" and node.target == aten.embedding.default:
        table = node.args[0]
        if isinstance(table, torch.fx.Node) and table.op == "get_attr":
            return Writer(node, "embedding", table=table)
    if node.op == "get_attr":
        return Writer(node, "tensor")
    return Writer(node, "other")


def _check_closure(stream: ResidualStream) -> None:
    norm_inputs = {(norm, norm.args[0]) for norm in stream.norms}
    members = stream.nodes | {w.node for w in stream.writers}
    for node in members:
        for user in node.users:
            if user in stream.nodes or is_metadata_reader(user) or (user, node) in norm_inputs:
                continue
            if user.op == "output":
                raise PreconditionError(
                    f"the residual stream is a graph output ({describe_node(node)} is returned), "
                    "so centering it would change what the graph returns",
                    node,
                )
            role = "writer" if node not in stream.nodes else "stream node"
            raise PreconditionError(
                f"{role} {describe_node(node)} is also read by {describe_node(user)}, which is not "
                "a normalization: the stream is observed directly (a Post-LN model, or a "
                "residual used outside the blocks)",
                user,
            )
