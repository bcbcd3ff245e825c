"""The embedded model through canonicalize, to ONNX Runtime and to a .pt2 archive and back.

python examples/05_export_onnx.py
"""

import tempfile
from pathlib import Path

import torch

import rewriter

model, tokenizer = rewriter.zoo.tiny_gpt2()
ids = tokenizer(rewriter.zoo.eval_text()[:3000], return_tensors="pt").input_ids[:, :64].view(2, 32)
gm = rewriter.trace(model, (ids,), dynamic_shapes="auto")
result = rewriter.Pipeline.parse("canonicalize").run(gm)

with tempfile.TemporaryDirectory() as tmp:
    exported = rewriter.backends.onnx.export(result.graph_module, None, Path(tmp) / "tiny.onnx")
    print(f"ONNX opset {exported.opset}, inputs {exported.input_names} {exported.dynamic_axes}")
    longer = tokenizer(rewriter.zoo.eval_text()[3000:9000], return_tensors="pt").input_ids[:, :200]
    report = rewriter.backends.onnx.check(result.graph_module, exported.path, (longer,))
    print("ORT vs graph on a longer batch:", report)
    assert report.ok, report

    path = rewriter.save(result.graph_module, Path(tmp) / "tiny.pt2")
    loaded = rewriter.load(path)
    size = path.stat().st_size / 2**20
    print(f"saved {size:.1f} MiB; the reloaded graph returns {type(loaded(ids)).__name__}")
    assert torch.equal(loaded(ids).logits, result.graph_module(ids).logits)  # bit for bit
    ppl = rewriter.metrics.perplexity(loaded, tokenizer, rewriter.zoo.eval_text())
    print(f"perplexity of the reloaded graph on the held-out text: {ppl:.2f}")
