"""Linearize the embedded model's attention (Hedgehog features + a softmax window), fit it by
attention transfer, and run it in ONNX Runtime at a length the trace never saw.

python examples/08_linearize.py
"""

import tempfile
from pathlib import Path

import torch

import rewriter

model, tokenizer = rewriter.zoo.tiny_gpt2()
ids = tokenizer(rewriter.zoo.eval_text()[:3000], return_tensors="pt").input_ids[:, :64].view(2, 32)
gm = rewriter.trace(model, (ids,), dynamic_shapes="auto")
ctx = rewriter.PassContext(
    calibration=rewriter.zoo.calibration_text(),
    evaluation=rewriter.zoo.eval_text(),
    tokenizer=tokenizer,
    eval_tokens=4096,  # a quick estimate; None scores all 41k held-out tokens
    seq_len=128,
    batch_size=4,
    progress=False,
)
result = rewriter.Pipeline.parse("linearize(window=16,fit_steps=40)").run(gm, ctx)
metrics = result.report.records[0].metrics
print(
    f"perplexity: softmax {metrics['ppl_original']:.1f}, linear unfitted "
    f"{metrics['ppl_unfitted']:.1f}, after attention transfer {metrics['ppl_fitted']:.1f}"
)
for layer, mse in metrics["layers"].items():
    print(f"  {layer}: transfer MSE {mse['mse_before']:.2e} -> {mse['mse_after']:.2e}")

with tempfile.TemporaryDirectory() as tmp:
    exported = rewriter.backends.onnx.export(result.graph_module, None, Path(tmp) / "linear.onnx")
    longer = torch.randint(0, 4096, (1, 200))  # traced at 32 tokens; chunks of 64 inside
    report = rewriter.backends.onnx.check(result.graph_module, exported.path, (longer,))
    assert report.ok, report
    print(f"ONNX Runtime at T=200 agrees with torch: max error {report.max_abs:.1e}")
