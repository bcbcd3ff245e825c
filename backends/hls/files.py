"""The text files of an HLS project: the top function with ``INTERFACE`` / ``PIPELINE`` /
``ARRAY_PARTITION`` or ``DATAFLOW`` pragmas for the io mode, typedefs per node, constants as raw
integer bit patterns (fast to compile), the ``rw_*.h`` templates of ``kernels/hls``, a testbench
reading and writing text, ``build_prj.tcl`` and a README."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path
from typing import Any

from rewriter.backends.hls.emit import Program
from rewriter.backends.hls.precision import Precision

__all__ = ["KERNELS", "readme", "write_sources"]

KERNELS = Path(importlib.util.find_spec("rewriter.kernels").origin).parent / "hls"  # type: ignore[arg-type, union-attr]
"""The C++ templates (``kernels/hls``, installed as ``rewriter/kernels/hls``)."""


def write_sources(
    directory: Path,
    program: Program,
    precision: Precision,
    project: str,
    io: str,
    part: str,
    clock_ns: float,
) -> None:
    """``firmware/`` (templates, typedefs, constants, the top function), the testbench, an empty
    ``tb_data/`` and ``build_prj.tcl`` in ``directory``."""
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


def readme(project: str, meta: dict[str, Any]) -> str:
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
