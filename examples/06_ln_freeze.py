"""Remove LayerNorms from the embedded model within a perplexity budget, then export it LN-free.

python examples/06_ln_freeze.py
"""

import tempfile
from pathlib import Path

import onnx

import rewriter

model, tokenizer = rewriter.zoo.tiny_gpt2()
ids = tokenizer(rewriter.zoo.eval_text()[:3000], return_tensors="pt").input_ids[:, :64].view(2, 32)
gm = rewriter.trace(model, (ids,), dynamic_shapes="auto")
ctx = rewriter.PassContext(
    calibration=rewriter.zoo.calibration_text(),
    evaluation=rewriter.zoo.eval_text(),
    tokenizer=tokenizer,
    eval_tokens=2048,  # a quick estimate; leave None to score all 41k held-out tokens
    progress=False,
)

# Freeze norms least harmful first while perplexity stays within 5%, then fold them away.
result = rewriter.Pipeline.parse("canonicalize,ln-freeze(budget='ppl+5%'),fold-ln").run(gm, ctx)
print(result.report.table())
metrics = result.report.records[1].metrics
print(f"froze {len(metrics['frozen'])} norms: {', '.join(metrics['frozen'])}")
print(f"perplexity {metrics['ppl_before']:.2f} -> {metrics['ppl_frozen']:.2f}")
assert metrics["ppl_frozen"] <= 1.05 * metrics["ppl_before"]

# Freeze everything and recover with a short fine-tune: an LN-free graph for ONNX Runtime.
spec = "canonicalize,ln-freeze(recover_steps=10,recover_lr=1e-3),fold-ln"
free = rewriter.Pipeline.parse(spec).run(gm, ctx)
metrics = free.report.records[1].metrics
print(
    f"all norms frozen: perplexity {metrics['ppl_before']:.2f} -> {metrics['ppl_frozen']:.2f}, "
    f"after 10 recovery steps {metrics['ppl_recovered']:.2f}"
)
with tempfile.TemporaryDirectory() as tmp:
    exported = rewriter.backends.onnx.export(free.graph_module, None, Path(tmp) / "ln_free.onnx")
    kinds = {node.op_type for node in onnx.load(str(exported.path)).graph.node}
    assert "LayerNormalization" not in kinds
    assert rewriter.backends.onnx.check(free.graph_module, exported.path, (ids,)).ok
    print("LN-free graph runs in ONNX Runtime and agrees with torch")
