"""FPGA-oriented HLS export: a rewritten graph (or one block of it) as a Vitis-HLS-style C++
project built from the templates in ``kernels/hls``, and its C simulation with g++ here.

    project = rewriter.backends.hls.export(gm, (ids,), "out/hls", subgraph="transformer.h.0")
    outputs = rewriter.backends.hls.csim(project.directory, inputs)

``export`` writes ``firmware/`` (the top function with ``INTERFACE`` / ``PIPELINE`` /
``ARRAY_PARTITION`` or ``DATAFLOW`` pragmas for the io mode, typedefs per node, constants as raw
integer bit patterns so g++ compiles them fast, the ``rw_*.h`` templates), a testbench reading and
writing text, ``build_prj.tcl`` (csim / csynth / cosim / export with part and clock), a README,
and ``project.json`` (ports, shapes, precisions, the per-layer resource model). ``csim`` compiles
it against the ``ap_types`` headers of the installed ``hls4ml`` wheel and runs it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.fx
from rewriter.backends.base import Backend, Exported, Measurement, artifact_bytes, example_inputs
from rewriter.backends.hls import ops as _ops  # noqa: F401 - registers the lowerings
from rewriter.backends.hls.emit import HANDLERS, Lowering, Program, Value
from rewriter.backends.hls.precision import FixedType, Precision, from_ranges, parse_type
from rewriter.backends.hls.resources import estimate

from rewriter import ops
from rewriter.errors import LoweringError
from rewriter.ir.graph import copy_graph_module, node_values

__all__ = [
    "FixedType",
    "HlsBackend",
    "HlsProject",
    "Precision",
    "ap_types_dir",
    "calibrate",
    "csim",
    "export",
    "from_ranges",
    "lowered",
    "native",
    "parse_type",
    "port_values",
]

KERNELS = Path(importlib.util.find_spec("rewriter.kernels").origin).parent / "hls"  # type: ignore[arg-type, union-attr]
"""The C++ templates (``kernels/hls``, installed as ``rewriter/kernels/hls``)."""


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
    firmware = directory / "firmware"
    firmware.mkdir(parents=True, exist_ok=True)
    (directory / "tb_data").mkdir(exist_ok=True)
    for header in KERNELS.glob("rw_*.h"):
        shutil.copy(header, firmware / header.name)
    (firmware / "defines.h").write_text(_defines(program, precision))
    (firmware / "weights.h").write_text(_weights(program))
    (firmware / f"{project}.h").write_text(_header(program, project, io))
    (firmware / f"{project}.cpp").write_text(_top(program, project, io))
    (directory / f"{project}_test.cpp").write_text(_testbench(program, project, io))
    (directory / "build_prj.tcl").write_text(_tcl(project, part, clock_ns))
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
    (directory / "README.md").write_text(_readme(project, meta))
    return HlsProject(
        directory, project, ports["inputs"], ports["outputs"], precision, resources, io
    )


def _port(value: Value) -> dict[str, Any]:
    return {
        "name": value.name,
        "shape": list(value.shape),
        "type": str(value.fixed) if value.fixed else "int",
    }


# --- files ----------------------------------------------------------------------------------------


def _defines(program: Program, precision: Precision) -> str:
    lines = [
        "#ifndef RW_DEFINES_H",
        "#define RW_DEFINES_H",
        '#include "ap_fixed.h"',
        '#include "ap_int.h"',
        "#include <stdint.h>",
        f"typedef {precision.accum.cpp()} acc_t;",  # type: ignore[union-attr]
        f"typedef {precision.weight.cpp()} t_weight;",  # type: ignore[union-attr]
        f"typedef {precision.table.cpp()} t_table;",  # type: ignore[union-attr]
        f"typedef {precision.state.cpp()} t_state;",  # type: ignore[union-attr]
    ]
    lines += [f"typedef {cpp} {name};" for name, cpp in program.typedefs.items()]
    lines.append("#endif")
    return "\n".join(lines) + "\n"


def _weights(program: Program) -> str:
    lines = ["#ifndef RW_WEIGHTS_H", "#define RW_WEIGHTS_H", "#include <stdint.h>"]
    lines.append(
        "// Constants as raw integer bit patterns of their fixed-point types (fast to compile)."
    )
    for name, (ctype, values) in program.constants.items():
        body = ",".join(str(v) for v in values)
        lines.append(f"static const {ctype} {name}[{len(values)}] = {{{body}}};")
    lines.append("#endif")
    return "\n".join(lines) + "\n"


def _signature(program: Program, project: str, io: str) -> str:
    params = []
    for value in program.inputs:
        if io == "stream":  # the stream is read into a buffer with the port's name
            params.append(f"hls::stream<{value.ctype}> &{value.name}_stream")
        else:
            params.append(f"const {value.ctype} {value.name}[{value.size}]")
    for value in program.outputs:
        if io == "stream":
            params.append(f"hls::stream<{value.ctype}> &{value.name}_stream")
        else:
            params.append(f"{value.ctype} {value.name}[{value.size}]")
    return f"void {project}({', '.join(params)})"


def _header(program: Program, project: str, io: str) -> str:
    guard = project.upper() + "_H"
    return "\n".join(
        [
            f"#ifndef {guard}",
            f"#define {guard}",
            '#include "defines.h"',
            '#include "hls_stream.h"',
            _signature(program, project, io) + ";",
            "#endif",
            "",
        ]
    )


def _top(program: Program, project: str, io: str) -> str:
    lines = [
        f'#include "{project}.h"',
        '#include "weights.h"',
        '#include "rw_common.h"',
        '#include "rw_dense.h"',
        '#include "rw_norm.h"',
        '#include "rw_activation.h"',
        '#include "rw_attention.h"',
        "",
        _signature(program, project, io) + " {",
    ]
    ports = [v.name for v in program.inputs + program.outputs]
    if io == "stream":
        lines += [f"    #pragma HLS INTERFACE axis port = {name}_stream" for name in ports]
        lines.append("    #pragma HLS DATAFLOW")
    else:
        lines += [f"    #pragma HLS INTERFACE ap_memory port = {name}" for name in ports]
        lines += [
            f"    #pragma HLS ARRAY_PARTITION variable = {v.name} cyclic factor = {min(v.size, 16)}"
            for v in program.inputs
        ]
    body: list[str] = []
    if io == "stream":  # each input stream fills a buffer the computation reads by the port name
        for value in program.inputs:
            body.append(f"static {value.ctype} {value.name}[{value.size}];")
            body.append(
                f"READ_{value.name}: for (int i = 0; i < {value.size}; i++) "
                f"{value.name}[i] = {value.name}_stream.read();"
            )
    for local in program.locals:
        body.append(f"static {local.ctype} {local.name}[{local.size}];")
    body += program.body
    for port, source in zip(program.outputs, program.sources):
        loop = f"WRITE_{port.name}: for (int i = 0; i < {port.size}; i++) "
        if io == "stream":
            body.append(loop + f"{port.name}_stream.write({source.name}[i]);")
        else:
            body.append(loop + f"{port.name}[i] = {source.name}[i];")
    lines += ["    " + line for line in body]
    lines += ["}", ""]
    return "\n".join(lines)


def _testbench(program: Program, project: str, io: str) -> str:
    lines = [
        "// Reads tb_data/inputs.txt (every input's values in order, as numbers), runs the top",
        "// function and writes tb_data/outputs.txt (one output per line).",
        "#include <cstdio>",
        "#include <fstream>",
        "#include <iostream>",
        f'#include "firmware/{project}.h"',
        "",
        "int main(int argc, char **argv) {",
        '    const char *in_path = argc > 1 ? argv[1] : "tb_data/inputs.txt";',
        '    const char *out_path = argc > 2 ? argv[2] : "tb_data/outputs.txt";',
        "    std::ifstream in(in_path);",
        '    if (!in) { std::cerr << "cannot read " << in_path << std::endl; return 2; }',
    ]
    for value in program.inputs:
        lines.append(f"    static {value.ctype} {value.name}_data[{value.size}];")
        lines.append(
            f"    for (int i = 0; i < {value.size}; i++) {{ double x; in >> x; "
            f"{value.name}_data[i] = {value.ctype}(x); }}"
        )
    for value in program.outputs:
        lines.append(f"    static {value.ctype} {value.name}_data[{value.size}];")
    if io == "stream":
        for value in program.inputs + program.outputs:
            lines.append(f"    hls::stream<{value.ctype}> {value.name};")
        for value in program.inputs:
            loop = f"    for (int i = 0; i < {value.size}; i++) "
            lines.append(loop + f"{value.name}.write({value.name}_data[i]);")
        ports = ", ".join(v.name for v in program.inputs + program.outputs)
        lines.append(f"    {project}({ports});")
        for value in program.outputs:
            loop = f"    for (int i = 0; i < {value.size}; i++) "
            lines.append(loop + f"{value.name}_data[i] = {value.name}.read();")
    else:
        args = [f"{v.name}_data" for v in program.inputs + program.outputs]
        lines.append(f"    {project}({', '.join(args)});")
    lines.append("    std::ofstream out(out_path);")
    lines.append("    out.precision(17);")
    for value in program.outputs:
        cast = "double" if value.fixed else "long"
        lines.append(
            f"    for (int i = 0; i < {value.size}; i++) out << ({cast})({value.name}_data[i]"
            f"{'.to_double()' if value.fixed else ''}) << (i + 1 < {value.size} ? ' ' : '\\n');"
        )
    lines += ["    return 0;", "}", ""]
    return "\n".join(lines)


def _tcl(project: str, part: str, clock_ns: float) -> str:
    return f"""# Vitis HLS: vitis_hls -f build_prj.tcl -tclargs csim=1 synth=1 cosim=0 export=0
array set opt {{csim 1 synth 1 cosim 0 export 0}}
foreach arg $::argv {{
    foreach {{key value}} [split $arg =] {{ set opt($key) $value }}
}}
open_project -reset {project}_prj
set_top {project}
add_files firmware/{project}.cpp -cflags "-std=c++14 -Ifirmware"
add_files -tb {project}_test.cpp -cflags "-std=c++14 -Ifirmware"
add_files -tb tb_data
open_solution -reset solution1
set_part {{{part}}}
create_clock -period {clock_ns} -name default
if {{$opt(csim)}} {{ csim_design -argv "tb_data/inputs.txt tb_data/csim_outputs.txt" }}
if {{$opt(synth)}} {{ csynth_design }}
if {{$opt(cosim)}} {{ cosim_design -trace_level all }}
if {{$opt(export)}} {{ export_design -format ip_catalog }}
exit
"""


def _readme(project: str, meta: dict[str, Any]) -> str:
    ports = "\n".join(
        f"- {kind} `{p['name']}`: shape {p['shape']}, {p['type']}"
        for kind in ("inputs", "outputs")
        for p in meta[kind]
    )
    return f"""# {project}: HLS project written by rewriter

Top function `{project}` in `firmware/{project}.cpp` (io: {meta["io"]}), templates
`firmware/rw_*.h`, constants in `firmware/weights.h` (raw bit patterns), typedefs in
`firmware/defines.h`.

{ports}

- C simulation without vendor tools: `rewriter.backends.hls.csim(directory, inputs)` (g++ and
  the ap_types headers of hls4ml), or by hand: `g++ -std=c++14 -Ifirmware -I<ap_types>
  {project}_test.cpp firmware/{project}.cpp -o csim && ./csim tb_data/inputs.txt out.txt`.
- Vitis HLS: `vitis_hls -f build_prj.tcl -tclargs csim=1 synth=1 cosim=0 export=0`
  (part {meta["part"]}, clock {meta["clock_ns"]} ns).
- `project.json`: ports, precisions, layers and the modelled resources (estimates from the reuse
  factor, not synthesis results).
"""


# --- C simulation ---------------------------------------------------------------------------------


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


# --- the shared backend interface (rewriter.backends.base) ---------------------------------------

CHECK_LSBS = 20
""":meth:`HlsBackend.check`'s default bound, in units of the data type's last bit: 2e-2 at
ap_fixed<18,8>, what a GPT-2 block's csim is held to in tests/test_hls.py."""


class HlsBackend(Backend):
    """The HLS project through the shared interface: the project folder ``out/hls``, static
    shapes of the inputs; checked by the g++ C simulation; measured as its modelled resources
    (a latency needs the vendor's synthesis, which does not run here)."""

    name = "hls"
    summary = "an FPGA HLS project (ap_fixed), C-simulated with g++"
    label = "HLS C simulation"
    options = ("precision", "reuse_factor", "io", "subgraph")

    def available(self) -> tuple[bool, str]:
        if shutil.which("g++") is None:
            return False, "C simulation needs g++ on the PATH"
        try:
            ap_types_dir()
        except LoweringError as error:
            return False, str(error)
        return True, "g++ C simulation with hls4ml's ap_types"

    def native(self) -> frozenset[str]:
        return native()

    def export(
        self,
        gm: torch.fx.GraphModule,
        inputs: Sequence[torch.Tensor] | None,
        out: str | os.PathLike[str],
        **options: Any,
    ) -> Exported:
        args = example_inputs(gm, inputs)
        project = export(gm, args, Path(out) / "hls", **options)
        info = {
            "directory": str(project.directory),
            "precision": project.precision.as_dict(),
            "resources": project.resources.get("total"),
        }
        return Exported(self.name, project.directory, project, info, args)

    def check(
        self,
        gm: torch.fx.GraphModule,
        exported: Exported,
        inputs: Sequence[torch.Tensor] | None = None,
        *,
        atol: float | None = None,
    ) -> Any:
        """The C simulation against ``gm`` at the project's ports; held to ``atol`` (default
        :data:`CHECK_LSBS` last bits of the data type), not the float tolerance rule."""
        from rewriter.verify import compare_outputs

        project = exported.result
        args = exported.inputs if inputs is None else tuple(inputs)
        feeds, wants = port_values(gm, args, project)
        gots = csim(project.directory, feeds)
        if atol is None:
            atol = CHECK_LSBS * 2.0**-project.precision.data.fraction
        return compare_outputs([w.double() for w in wants], gots, 0.0, atol)

    def measure(
        self,
        exported: Exported,
        inputs: Sequence[torch.Tensor] | None = None,
        *,
        repeats: int = 10,
    ) -> Measurement:
        project = exported.result
        total = dict(project.resources.get("total") or {})
        return Measurement(self.name, None, None, None, 0, artifact_bytes(project.directory), total)
