"""A rewritten GPT-2 (4-bit ShiftQuant, L1 norms) as MLIR in four dialects through torch-mlir,
and the linalg-on-tensors module compiled to LLVM and run on this CPU against the graph.

python examples/14_mlir.py
"""

import tempfile
from pathlib import Path

import torch
from rewriter.backends import mlir

import rewriter
from rewriter.verify.families import ModelSpec

config = ModelSpec("gpt2", vocab=64, layers=2, heads=2, head_dim=8, seed=0)
model = config.build()
example = config.example_inputs(batch=2, seq=8)
gm = rewriter.trace(model, example, dynamic_shapes="auto")
ctx = rewriter.PassContext(calibration=torch.randint(0, 64, (4, 8)), progress=False, batch_size=2)
rewritten = rewriter.Pipeline.parse("canonicalize,l1quant(bits=4)").run(gm, ctx).graph_module

with tempfile.TemporaryDirectory() as tmp:
    for dialect in mlir.DIALECTS:
        exported = mlir.export(rewritten, example, Path(tmp) / f"{dialect}.mlir", dialect=dialect)
        print(f"{dialect:18s} {len(exported.text.splitlines()):5d} lines")
    linalg = mlir.export(rewritten, example)
    print(f"decomposed rewriter ops: {linalg.decomposed}")
    report = mlir.check(rewritten, linalg, example)
    print(f"linalg-on-tensors on this CPU vs the graph: {report}")
    assert report.ok
