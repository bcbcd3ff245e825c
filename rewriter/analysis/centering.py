"""Centering the residual stream: make every writer zero-mean over the last dim.

Used by ``prernorm`` and ``crmsnorm``. A writer is centered by editing its weights when it is a
linear map (the axis depends on the layout: ``(out, in)`` weights lose their mean over rows,
GPT-2's ``(in, out)`` ``Conv1D`` weights over columns), an embedding table (each row) or a stored
tensor; otherwise (a normalization's output, such as BLOOM's embedding LayerNorm) one explicit
``x - mean(x)`` op follows it. Weights shared with something that is not a writer (a tied LM
head) are untied first, and the other user keeps the original tensor.
"""

from __future__ import annotations

import torch
import torch.fx

from rewriter.analysis.folding import reader_key, untie_for
from rewriter.analysis.residual import NORM_OPS, ResidualStream, Writer
from rewriter.errors import PreconditionError, describe_node
from rewriter.ir.graph import is_metadata_reader
from rewriter.ir.store import Edit
from rewriter.rewrite.driver import Rewriter

__all__ = ["center_writers", "check_writers", "layer_to_rms"]

aten = torch.ops.aten


def check_writers(stream: ResidualStream, *, allow_unknown: bool = False) -> None:
    """Refuse writers nothing can center safely (unknown ops) unless explicitly allowed."""
    for writer in stream.writers:
        if writer.kind == "other" and not allow_unknown and writer.node.target not in _NORMS:
            raise PreconditionError(
                f"writer {describe_node(writer.node)} of the residual stream cannot be centered by "
                "editing weights and is not a normalization; pass center_unknown_writers=true to "
                "subtract its mean explicitly",
                writer.node,
            )


_NORMS = set(NORM_OPS) | {torch.ops.rewriter.crms_norm.default}


def center_writers(rw: Rewriter, stream: ResidualStream) -> dict[torch.fx.Node, torch.fx.Node]:
    """Make every writer of ``stream`` zero-mean over the last dim (weights, or an explicit op).

    Writers that read the same stored tensor (one module applied twice: a shared layer, or the
    prefix and last-token halves of a step graph) are centered together, once: they keep
    sharing one tensor, and only readers that are not writers get an untied copy.
    Returns, for writers centered by an explicit op, the node that now feeds the stream.
    """
    explicit: dict[torch.fx.Node, torch.fx.Node] = {}
    linear: dict[tuple[str, str | None, str], list[Writer]] = {}
    tables: dict[str, list[Writer]] = {}
    for writer in stream.writers:
        if writer.kind == "linear":
            lin = writer.linear
            assert lin is not None
            linear.setdefault(reader_key(lin), []).append(writer)
        elif writer.kind in ("embedding", "tensor"):
            node = writer.table if writer.kind == "embedding" else writer.node
            assert node is not None
            tables.setdefault(str(node.target), []).append(writer)
        else:
            explicit[writer.node] = _center_explicitly(rw, writer)
    for group in linear.values():
        _center_linear(rw, group)
    for group in tables.values():
        _center_table(rw, group)
    return explicit


def _center_linear(rw: Rewriter, writers: list[Writer]) -> None:
    lins = [w.linear for w in writers if w.linear is not None]
    lin = lins[0]
    weight_node = untie_for(rw, lin.weight, [x.node for x in lins])
    weight = str(weight_node.target)
    if lin.layout == "out_in":  # rows are outputs: subtract the mean over rows (per column)
        out = lin.out_features
        edit = Edit(
            weight,
            (weight,),
            lambda b: b.rows(weight) - b.column_sum(weight) / out,
            note="center output rows",
        )
    else:  # (in, out): each row is one input's outputs: subtract its mean
        edit = Edit(
            weight,
            (weight,),
            lambda b: (r := b.rows(weight)) - r.mean(-1, keepdim=True),
            note="center output columns",
        )
    rw.apply(edit)
    if lin.bias is not None:
        readers = [x.node if x.output is x.node else x.output for x in lins]
        bias_node = untie_for(rw, lin.bias, readers)
        bias = str(bias_node.target)
        rw.apply(Edit(bias, (bias,), lambda b: (v := b.whole(bias)) - v.mean(), note="center bias"))
    rw.counters[f"center-{lin.layout}-linear"] += len(lins)


def _center_table(rw: Rewriter, writers: list[Writer]) -> None:
    first = writers[0]
    node = first.table if first.kind == "embedding" else first.node
    assert node is not None
    users: list[torch.fx.Node] = []
    for writer in writers:
        users += [writer.node] if writer.kind == "embedding" else list(writer.node.users)
    owned = untie_for(rw, node, users)
    name = str(owned.target)
    rw.apply(
        Edit(
            name,
            (name,),
            lambda b: (r := b.rows(name)) - r.mean(-1, keepdim=True),
            note="center rows",
        )
    )
    rw.counters[f"center-{first.kind}"] += len(writers)


def _center_explicitly(rw: Rewriter, writer: Writer) -> torch.fx.Node:
    node = writer.node
    users = [u for u in node.users if not is_metadata_reader(u)]
    anchor = node.next
    mean = rw.call(
        aten.mean.dim, (node, [-1], True), before=anchor, rule="explicit-centering", meta_from=node
    )
    centered = rw.call(
        aten.sub.Tensor, (node, mean), before=anchor, rule="explicit-centering", meta_from=node
    )
    for user in users:
        user.replace_input_with(node, centered)
    rw.counters["explicit-centering"] += 1
    return centered


def layer_to_rms(rw: Rewriter, norm: torch.fx.Node) -> None:
    """Replace a LayerNorm whose input is zero-mean by ``rms_norm`` (same eps, explicit) + beta."""
    args = list(norm.args) + [None] * (5 - len(norm.args))
    x, shape, gamma, beta, eps = args[:5]
    eps = 1e-5 if eps is None else eps  # aten.layer_norm's default, now explicit
    rms = rw.call(
        aten.rms_norm.default,
        (x, shape, gamma, eps),
        before=norm,
        rule="layer-to-rms",
        meta_from=norm,
    )
    result = rms
    if beta is not None:
        result = rw.call(
            aten.add.Tensor, (rms, beta), before=norm, rule="layer-to-rms", meta_from=norm
        )
    rw.replace(norm, result, rule="layer-to-rms")
