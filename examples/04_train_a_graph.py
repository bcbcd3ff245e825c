"""Fine-tune parameters of a traced graph (exported graphs refuse .train()).

python examples/04_train_a_graph.py
"""

import torch

import rewriter
from rewriter.verify.families import ModelSpec

spec = ModelSpec("gpt2", layers=2, vocab=64)
model = spec.build()
gm = rewriter.trace(model, spec.example_inputs(seq=16), dynamic_shapes="auto")

# A learnable sequence pattern: every row counts upwards modulo the vocabulary.
batches = [
    (torch.arange(16) + torch.arange(start, start + 4).unsqueeze(1)) % 64
    for start in range(0, 32, 4)
]
report = rewriter.train(gm, batches, steps=60, lr=1e-2, params=r".*", seed=0, show_progress=False)
print(f"trained {len(report.params)} tensors: loss {report.first:.3f} -> {report.last:.3f}")
assert report.last < report.first
