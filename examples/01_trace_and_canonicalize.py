"""Trace a Hugging Face model once, canonicalize it, verify it, and print what changed.

python examples/01_trace_and_canonicalize.py
"""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import rewriter
from rewriter.ir.graph import op_counts

config = LlamaConfig(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=128,
    vocab_size=500,
    max_position_embeddings=128,
)
model = LlamaForCausalLM(config).eval()
input_ids = torch.randint(0, 500, (2, 16))

# One trace: ATen ops, weights as get_attr nodes, dynamic batch and sequence.
gm = rewriter.trace(model, (input_ids,), dynamic_shapes="auto")
result = rewriter.Pipeline.parse("canonicalize").run(gm)
print(result.report.table())

before, after = op_counts(gm), op_counts(result.graph_module)
for op in sorted(set(before) | set(after)):
    if before.get(op, 0) != after.get(op, 0):
        print(f"{op:40s} {before.get(op, 0):3d} -> {after.get(op, 0):3d}")

# Equivalent to the model on the example and on hypothesis-drawn inputs of other shapes.
report = rewriter.verify.assert_equivalent(model, result.graph_module, max_examples=5)
print("verified:", report)
print(rewriter.format_graph(result.graph_module).splitlines()[30])
