"""Export one transformer block of a rewritten GPT-2 (L1 norms, 4-bit ShiftQuant linears) as an
FPGA HLS project, run its C simulation with g++ here, and compare with the graph.

Needs g++ and the hls4ml wheel (for its ap_types headers): make setup installs it.

python examples/13_hls.py
"""

import tempfile
from pathlib import Path

import torch
from rewriter.backends import hls

import rewriter
from rewriter.verify.families import ModelSpec

config = ModelSpec("gpt2", vocab=64, layers=1, heads=2, head_dim=16, seed=0)
model = config.build()
example = config.example_inputs(batch=1, seq=8)
gm = rewriter.trace(model, example)
ctx = rewriter.PassContext(calibration=torch.randint(0, 64, (4, 8)), progress=False, batch_size=1)
rewritten = rewriter.Pipeline.parse("canonicalize,l1quant(bits=4)").run(gm, ctx).graph_module

with tempfile.TemporaryDirectory() as tmp:
    out = Path(tmp) / "block0"
    project = hls.export(rewritten, example, out, subgraph="transformer.h.0", reuse_factor=4)
    print(sorted(p.name for p in (out / "firmware").iterdir())[:6], "...")
    print(f"top: {project.top}({project.inputs[0]['shape']}) -> {project.outputs[0]['shape']}")
    total = project.resources["total"]
    print(f"modelled: {total['dsp']} DSPs, {total['bram18']} BRAM18 (4-bit linears use no DSP)")

    # the block's input is the residual stream entering it, taken from the graph
    (block_input,), (want,) = hls.port_values(rewritten, example, project)
    (got,) = hls.csim(out, [block_input])
    error = (got - want.double()).abs().max().item()
    print(f"C simulation vs graph at ap_fixed<18,8>: max abs error {error:.2e}")
    assert error < 2e-2
