"""Quantize the embedded model to 4-bit power-of-two groups with L1 norms; run it in ORT.

python examples/07_l1quant.py
"""

import tempfile
from pathlib import Path

import rewriter

model, tokenizer = rewriter.zoo.tiny_gpt2()
ids = tokenizer(rewriter.zoo.eval_text()[:3000], return_tensors="pt").input_ids[:, :64].view(2, 32)
gm = rewriter.trace(model, (ids,), dynamic_shapes="auto")
ctx = rewriter.PassContext(
    calibration=rewriter.zoo.calibration_text(),
    evaluation=rewriter.zoo.eval_text(),
    tokenizer=tokenizer,
    eval_tokens=4096,  # a quick estimate; None scores all 41k held-out tokens
    progress=False,
)
result = rewriter.Pipeline.parse("canonicalize,l1quant(bits=4,group=64,factor=calibrated)").run(
    gm, ctx
)
metrics = result.report.records[1].metrics
print(
    f"perplexity {metrics['ppl_before']:.2f} -> L1 norms {metrics['ppl_l1_norm']:.2f} "
    f"-> + 4-bit weights {metrics['ppl_after']:.2f}"
)
print(f"linear weights: {metrics['weight_bytes_ratio']:.3f}x their float32 bytes")
for name, layer in list(metrics["layers"].items())[:3]:
    errors = f"weight error {layer['weight_rel_err']:.3f}, output {layer['output_rel_err']:.3f}"
    print(f"  {name}: {errors}")

with tempfile.TemporaryDirectory() as tmp:
    exported = rewriter.backends.onnx.export(result.graph_module, None, Path(tmp) / "q4.onnx")
    session = rewriter.backends.onnx.session(exported.path, accuracy_level=0)
    report = rewriter.backends.onnx.check(result.graph_module, exported.path, (ids,), sess=session)
    assert report.ok, report
    print(f"ONNX Runtime (MatMulNBits) agrees with torch: max error {report.max_abs:.2e}")
