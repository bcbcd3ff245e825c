"""Run a rewritten graph on the Triton kernels: prernorm + 4-bit l1quant + linearized attention,
lowered with rewriter.backends.triton.compile, with the plan of which node runs which kernel.

On a GPU the kernels run on CUDA. Without one this example turns on Triton's CPU interpreter
(slow, fine for a tiny model) so the same kernels run here; a plain CPU run would fall back to
the ops' reference implementations and say so.

python examples/12_triton.py
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel is imported

from rewriter.backends import triton as triton_backend

import rewriter
from rewriter.verify.families import ModelSpec

spec = ModelSpec("llama", vocab=96, layers=2, heads=2, head_dim=16, seed=0)
model = spec.build()
ids = spec.example_inputs(batch=2, seq=12)[0]
gm = rewriter.trace(model, (ids,), dynamic_shapes="auto")
ctx = rewriter.PassContext(calibration=torch.randint(0, 96, (4, 16)), progress=False, batch_size=2)
pipeline = "canonicalize,l1quant(bits=4,group=32),linearize(feature_map=elu,decay=lightning)"
rewritten = rewriter.Pipeline.parse(pipeline).run(gm, ctx).graph_module

compiled = triton_backend.compile(rewritten)
print(compiled.summary())
with torch.no_grad():
    want = rewritten(ids).logits
    got = compiled(ids).logits
print(f"max |kernels - graph| = {(got - want).abs().max():.2e}")
assert torch.allclose(got, want, rtol=1e-4, atol=1e-4)
