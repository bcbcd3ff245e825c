"""Rewrite a sharded safetensors checkpoint without loading it: the architecture is traced from
its config on the meta device, the passes' edits are recorded against the memory-mapped shards,
and each tensor is computed block by block as the output shards are written. The result binds
to the weightless graph it came with and equals the in-memory rewrite bit for bit.

python examples/15_stream_checkpoint.py
(the same from the command line: rewriter run --model DIR --passes SPEC --out OUT --stream)
"""

import tempfile
from pathlib import Path

import torch
import transformers

import rewriter

config = transformers.LlamaConfig(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    tie_word_embeddings=False,
)
torch.manual_seed(0)
model = transformers.LlamaForCausalLM(config).eval()
corpus = torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(1))
spec = "canonicalize,fold-ln,l1quant(bits=4),vocab-trim"

with tempfile.TemporaryDirectory() as tmp:
    checkpoint = Path(tmp) / "checkpoint"
    model.save_pretrained(checkpoint, max_shard_size="100KB")  # several shards
    print(f"checkpoint: {len(list(checkpoint.glob('*.safetensors')))} shards")

    out = Path(tmp) / "rewritten"
    ctx = rewriter.PassContext(seed=0, calibration=corpus, progress=False)
    run = rewriter.rewrite_checkpoint(checkpoint, spec, out, ctx=ctx, progress=False)
    print(run.result.report.table())
    print(run.summary())

    # Bind the written weights to the weightless graph and compare with the in-memory rewrite.
    streamed = rewriter.load(out / "model.pt2", out)
    ids = corpus[:2]
    loaded = rewriter.trace(model, (ids,), dynamic_shapes="auto")
    in_memory = rewriter.Pipeline.parse(spec).run(loaded, ctx).graph_module
    ids = rewriter.vocab.vocab_map(in_memory).graph_ids(ids)  # the trimmed vocabulary's ids
    same = torch.equal(streamed(ids).logits, in_memory(ids).logits)
    print(f"streamed and in-memory rewrites give the same logits: {same}")
    assert same
