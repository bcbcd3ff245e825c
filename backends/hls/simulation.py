"""C simulation of an exported HLS project with g++ and the ``ap_types`` headers of hls4ml, the
values at its ports when the graph runs, and calibration ranges for
:func:`~rewriter.backends.hls.precision.from_ranges`."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.fx
from rewriter.backends.hls.project import HlsProject, ap_types_dir, lowered

from rewriter.errors import LoweringError
from rewriter.ir.graph import node_values

__all__ = ["calibrate", "csim", "port_values"]


def csim(
    directory: str | os.PathLike[str], inputs: Sequence[torch.Tensor], *, timeout: float = 600
) -> list[torch.Tensor]:
    """Compile the project's testbench with g++ (once per source hash), run it on ``inputs`` and
    return its outputs as float64 tensors with the exported shapes."""
    directory = Path(directory)
    meta = json.loads((directory / "project.json").read_text())
    if len(inputs) != len(meta["inputs"]):
        raise ValueError(f"the project takes {len(meta['inputs'])} inputs, got {len(inputs)}")
    compiler = shutil.which("g++")
    if compiler is None:
        raise LoweringError("C simulation needs g++ on the PATH")
    binary = _compile(directory, meta["top"], compiler, timeout)
    values = []
    for tensor, port in zip(inputs, meta["inputs"]):
        if list(tensor.shape) != port["shape"]:
            raise ValueError(
                f"input {port['name']}: shape {list(tensor.shape)}, expected {port['shape']}"
            )
        values.append(" ".join(repr(float(v)) for v in tensor.detach().reshape(-1).tolist()))
    (directory / "tb_data" / "inputs.txt").write_text("\n".join(values) + "\n")
    out_path = directory / "tb_data" / "outputs.txt"
    done = subprocess.run(
        [str(binary), "tb_data/inputs.txt", "tb_data/outputs.txt"],
        cwd=directory,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if done.returncode != 0:
        raise LoweringError(f"C simulation failed ({done.returncode}): {done.stderr[-2000:]}")
    lines = out_path.read_text().splitlines()
    outputs = []
    for line, port in zip(lines, meta["outputs"]):
        data = torch.tensor([float(v) for v in line.split()], dtype=torch.float64)
        outputs.append(data.reshape(port["shape"]))
    return outputs


def _compile(directory: Path, top: str, compiler: str, timeout: float) -> Path:
    sources = [directory / f"{top}_test.cpp", *sorted((directory / "firmware").glob("*"))]
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sources)).hexdigest()[:16]
    binary = directory / "build" / f"csim_{digest}"
    if binary.exists():
        return binary
    binary.parent.mkdir(exist_ok=True)
    command = [
        compiler,
        "-std=c++14",
        "-O1",
        "-w",
        f"-I{directory / 'firmware'}",
        f"-I{ap_types_dir()}",
        str(directory / f"{top}_test.cpp"),
        str(directory / "firmware" / f"{top}.cpp"),
        "-o",
        str(binary),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise LoweringError(f"g++ failed on the HLS project:\n{done.stderr[-4000:]}")
    return binary


def port_values(
    gm: torch.fx.GraphModule, example_inputs: Sequence[Any], project: HlsProject
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The values at an exported project's ports when ``gm`` runs on ``example_inputs``: what to
    feed :func:`csim` (for a block: the values flowing into it) and what it should return."""
    graph = lowered(gm)
    values = {node.name: value for node, value in node_values(graph, tuple(example_inputs)).items()}
    inputs = [values[port["name"].removeprefix("in_")] for port in project.inputs]
    expected = [values[port["name"].removeprefix("out_v_")] for port in project.outputs]
    return inputs, expected


# --- calibration ----------------------------------------------------------------------------------


def calibrate(gm: torch.fx.GraphModule, batches: Sequence[Sequence[Any]]) -> dict[str, float]:
    """Largest magnitude of every floating-point node over ``batches`` (argument tuples), for
    :func:`from_ranges`."""
    ranges: dict[str, float] = {}
    for batch in batches:
        for node, value in node_values(gm, tuple(batch)).items():
            if isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel():
                ranges[node.name] = max(ranges.get(node.name, 0.0), float(value.abs().max()))
    return ranges
