"""Exporting a graph (or one block of it) as an HLS project: the lowering of
:mod:`rewriter.backends.hls.emit` (with the op handlers of :mod:`rewriter.backends.hls.ops`), the
files of :mod:`rewriter.backends.hls.files`, and ``project.json`` (ports, shapes, precisions, the
per-layer resource model of :mod:`rewriter.backends.hls.resources`)::

    project = rewriter.backends.hls.export(gm, (ids,), "out/hls", subgraph="transformer.h.0")
    outputs = rewriter.backends.hls.csim(project.directory, inputs)

``export`` writes ``firmware/`` (the top function with ``INTERFACE`` / ``PIPELINE`` /
``ARRAY_PARTITION`` or ``DATAFLOW`` pragmas for the io mode, typedefs per node, constants as raw
integer bit patterns so g++ compiles them fast, the ``rw_*.h`` templates), a testbench reading and
writing text, ``build_prj.tcl`` (csim / csynth / cosim / export with part and clock), a README,
and ``project.json`` (ports, shapes, precisions, the per-layer resource model).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.fx
from rewriter.backends.hls import ops as _ops  # noqa: F401 - registers the lowerings
from rewriter.backends.hls.emit import HANDLERS, Lowering, Value
from rewriter.backends.hls.files import readme, write_sources
from rewriter.backends.hls.precision import Precision
from rewriter.backends.hls.resources import estimate

from rewriter import ops
from rewriter.errors import LoweringError
from rewriter.ir.graph import copy_graph_module

__all__ = ["HlsProject", "ap_types_dir", "export", "lowered", "native"]


@dataclasses.dataclass
class HlsProject:
    """An exported project: where it is and what its top function takes and returns."""

    directory: Path
    top: str
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    precision: Precision
    resources: dict[str, Any]
    io: str


def native() -> frozenset[str]:
    """The ``rewriter::`` ops with an HLS template of their own (the others are decomposed)."""
    return frozenset(
        target._opname
        for target in HANDLERS
        if isinstance(target, torch._ops.OpOverload) and target.namespace == "rewriter"
    )


def lowered(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """``gm``, or a copy with every ``rewriter::`` op that has no HLS template replaced by its
    ATen decomposition (the op contract); the same graph :func:`export` lowers node by node."""
    plan = ops.check_lowerable(gm, "hls", native())
    decomposed = sorted(name for name, how in plan.items() if how == "decomposed")
    if not decomposed:
        return gm
    return ops.decompose(copy_graph_module(gm), decomposed)


def ap_types_dir() -> Path:
    """The ``ap_types`` headers shipped in the installed hls4ml wheel."""
    spec = importlib.util.find_spec("hls4ml")
    if spec is None or spec.origin is None:
        raise LoweringError(
            "C simulation needs the ap_types headers from the hls4ml wheel: pip install hls4ml "
            "(or 'rewriter[hls]')"
        )
    path = Path(spec.origin).parent / "templates" / "vivado" / "ap_types"
    if not (path / "ap_fixed.h").exists():
        raise LoweringError(f"hls4ml is installed but {path} has no ap_fixed.h")
    return path


def export(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any],
    out_dir: str | os.PathLike[str],
    *,
    precision: Precision | None = None,
    reuse_factor: int = 1,
    io: Literal["parallel", "stream"] = "parallel",
    subgraph: str | None = None,
    project: str = "rewriter_top",
    part: str = "xcu250-figd2104-2L-e",
    clock_ns: float = 5.0,
) -> HlsProject:
    """Write the HLS project of ``gm`` (or of the nodes of source module ``subgraph``) for the
    shapes of ``example_inputs``; see the module docstring."""
    if io not in ("parallel", "stream"):
        raise ValueError(f"io must be 'parallel' or 'stream', got {io!r}")
    precision = precision or Precision()
    program = Lowering(lowered(gm), tuple(example_inputs), precision, reuse_factor, subgraph).run()
    directory = Path(out_dir)
    directory = Path(out_dir)
    write_sources(directory, program, precision, project, io, part, clock_ns)
    resources = estimate(program.layers, precision, reuse_factor)
    ports = {
        "inputs": [_port(v) for v in program.inputs],
        "outputs": [_port(v) for v in program.outputs],
    }
    meta = {
        "top": project,
        "io": io,
        **ports,
        "precision": precision.as_dict(),
        "reuse_factor": reuse_factor,
        "part": part,
        "clock_ns": clock_ns,
        "layers": program.layers,
        "resources": resources,
    }
    (directory / "project.json").write_text(json.dumps(meta, indent=2))
    (directory / "README.md").write_text(readme(project, meta))
    return HlsProject(
        directory, project, ports["inputs"], ports["outputs"], precision, resources, io
    )


def _port(value: Value) -> dict[str, Any]:
    return {
        "name": value.name,
        "shape": list(value.shape),
        "type": str(value.fixed) if value.fixed else "int",
    }
