"""Export a rewritten graph to an ONNX file: ``torch.onnx.export(..., dynamo=True)`` on the traced
GraphModule (a re-export with the dynamic shapes recorded at trace time) with the translations of
:mod:`rewriter.backends.onnx.translations`. Any ``rewriter::`` op without a translation is
replaced by its ATen decomposition first (the op contract); an op with neither is refused with an
error naming the op and the node.

Two exporter traps are handled, each with a regression test:

* **silent opset fallback**: when the final version conversion fails, the exporter logs a
  warning and leaves the model at opset 18, which is invalid if the graph uses newer ops. The
  exported opset is checked and a mismatch raises :class:`OnnxExportError`.
* **fused RotaryEmbedding with dynamic batch**: at opset 23 the exporter's optimizer fuses
  rotary position embeddings into ``RotaryEmbedding`` nodes whose cos/sin caches keep batch 1,
  and ORT then fails on any other batch size ("cos_cache ... expected same shape as x"). When the
  batch is dynamic and the optimized model has such a node, the unoptimized graph (the model is
  exported once, then optimized) is kept instead (ORT's own graph optimizations still run at
  session start).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import onnx
import torch
import torch.fx
from rewriter.backends.onnx import translations

from rewriter import ops
from rewriter.errors import LoweringError, RewriterError
from rewriter.ir.graph import copy_graph_module, output_names
from rewriter.ir.trace import TraceInfo, trace_info

__all__ = ["DEFAULT_OPSET", "OnnxExport", "OnnxExportError", "export"]

DEFAULT_OPSET = 23


class OnnxExportError(RewriterError):
    """The exporter produced something other than what was asked for."""


@dataclasses.dataclass
class OnnxExport:
    """Where the model went and what the export did."""

    path: Path
    opset: int
    input_names: list[str]
    output_names: list[str]
    dynamic_axes: dict[str, dict[int, str]]
    lowering: dict[str, str]
    """How each ``rewriter::`` op was lowered: ``"native"`` or ``"decomposed"``."""
    optimized: bool
    """Whether the exporter's optimizer ran (off after the RotaryEmbedding trap)."""
    notes: list[str]


def export(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[torch.Tensor] | None = None,
    path: str | os.PathLike[str] = "model.onnx",
    *,
    dynamic_shapes: Any = "trace",
    opset: int = DEFAULT_OPSET,
    optimize: bool = True,
    external_data: bool | None = None,
    accuracy_level: int = 0,
) -> OnnxExport:
    """Export ``gm`` to an ONNX file that ONNX Runtime runs.

    ``dynamic_shapes="trace"`` reuses the dims recorded when the graph was traced (None: static).
    ``accuracy_level`` goes into every ``MatMulNBits`` node (quantized linears): 0 computes in
    the input's float type (exact), 4 lets ORT quantize activations to int8 (fast on CPU, not
    exact).

    Example::

        >>> result = rewriter.backends.onnx.export(gm, (input_ids,), "out/model.onnx")
        >>> rewriter.backends.onnx.check(gm, result.path).ok
        True
    """
    info = trace_info(gm)
    _, args, kwargs = _call_inputs(gm, info, example_inputs)
    spec = (
        info.dynamic_shapes
        if (dynamic_shapes == "trace" and info is not None)
        else (None if dynamic_shapes == "trace" else dynamic_shapes)
    )
    plan = ops.check_lowerable(gm, "onnx", native=set(translations.NATIVE))
    work = gm
    decomposed = [name for name, how in plan.items() if how == "decomposed"]
    if decomposed:
        work = ops.decompose(copy_graph_module(gm), decomposed)
    table = translations.translation_table(work, opset, accuracy_level=accuracy_level)
    names = (list(info.input_names) if info is not None else None, output_names(gm))
    # Exported once without the optimizer, which then runs on the program: when its result has
    # the rotary trap, the unoptimized graph is kept (exporting again cost a second export).
    program = _export(work, args, kwargs, spec, opset, table, False, names)
    notes: list[str] = []
    optimized = False
    if optimize:
        plain = program.model.clone()
        program.optimize()
        optimized = True
        if _rotary_trap(program.model_proto, spec):
            notes.append(
                "kept the exporter's graph unoptimized (its optimizer fuses RotaryEmbedding, "
                "which breaks dynamic batch)"
            )
            program.model = plain
            optimized = False
    _check_opset(program.model_proto, opset)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    program.save(str(path), external_data=external_data)
    proto = program.model_proto
    return OnnxExport(
        path=path,
        opset=opset,
        input_names=[i.name for i in proto.graph.input],
        output_names=[o.name for o in proto.graph.output],
        dynamic_axes=_dynamic_axes(proto),
        lowering=plan,
        optimized=optimized,
        notes=notes,
    )


def _call_inputs(
    gm: torch.fx.GraphModule, info: TraceInfo | None, example_inputs: Sequence[torch.Tensor] | None
) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...], dict[str, torch.Tensor]]:
    if example_inputs is None:
        if info is None:
            raise ValueError("export() needs example_inputs for a graph not made by rewriter.trace")
        example_inputs = info.example_inputs
    inputs = tuple(example_inputs)
    if info is None:
        return inputs, inputs, {}
    args, kwargs = info.call_inputs(inputs)
    return inputs, args, kwargs


def _export(
    gm: torch.fx.GraphModule,
    args: tuple[torch.Tensor, ...],
    kwargs: dict[str, torch.Tensor],
    spec: Any,
    opset: int,
    table: dict[Any, Any],
    optimize: bool,
    names: tuple[list[str] | None, list[str]],
) -> Any:
    with _quiet_exporter():
        try:
            return torch.onnx.export(
                gm,
                args,
                kwargs=kwargs or None,
                dynamo=True,
                opset_version=opset,
                dynamic_shapes=spec,
                custom_translation_table=table or None,
                input_names=names[0],
                output_names=names[1],
                optimize=optimize,
                report=False,
                verify=False,
            )
        except Exception as error:
            raise _explain(error, gm) from error


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    loggers = [logging.getLogger(n) for n in ("onnxscript", "torch.onnx", "onnx_ir")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(open(os.devnull, "w")):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _explain(error: Exception, gm: torch.fx.GraphModule) -> Exception:
    text = str(error)
    for node in gm.graph.nodes:
        if node.op == "call_function" and str(node.target) in text:
            return LoweringError(
                f"ONNX export failed on {node.target}: {text.splitlines()[0]}", node
            )
    return OnnxExportError(
        f"ONNX export failed: {text.strip().splitlines()[0] if text.strip() else error!r}"
    )


def _opset_of(proto: onnx.ModelProto) -> int | None:
    for entry in proto.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    return None


def _check_opset(proto: onnx.ModelProto, requested: int) -> None:
    actual = _opset_of(proto)
    if actual != requested:
        raise OnnxExportError(
            f"asked for opset {requested} but the exporter produced opset {actual}: its version "
            "conversion failed and it kept the model it started from. The model is not valid at "
            f"opset {actual} if it uses newer ops; export at opset {actual}, or check which op "
            "has no version adapter."
        )


def _rotary_trap(proto: onnx.ModelProto, spec: Any) -> bool:
    if not any(node.op_type == "RotaryEmbedding" for node in proto.graph.node):
        return False
    return _has_dynamic_batch(spec)


def _has_dynamic_batch(spec: Any) -> bool:
    entries = spec.values() if isinstance(spec, dict) else (spec or ())
    return any(isinstance(entry, dict) and 0 in entry for entry in entries)


def _dynamic_axes(proto: onnx.ModelProto) -> dict[str, dict[int, str]]:
    axes: dict[str, dict[int, str]] = {}
    for value in proto.graph.input:
        for i, dim in enumerate(value.type.tensor_type.shape.dim):
            if dim.dim_param:
                axes.setdefault(value.name, {})[i] = dim.dim_param
    return axes
