"""LoRA on the embedded model: inject, train a few steps, save the adapters alone, load them
onto a fresh trace, merge exactly, export to ONNX Runtime.

python examples/09_adapters.py
"""

import tempfile
from pathlib import Path

import rewriter

model, tokenizer = rewriter.zoo.tiny_gpt2()
ids = tokenizer(rewriter.zoo.eval_text()[:3000], return_tensors="pt").input_ids[:, :64].view(2, 32)
gm = rewriter.trace(model, (ids,), dynamic_shapes="auto")

result = rewriter.Pipeline.parse("lora(targets='c_attn,c_fc',r=4,alpha=8,dropout=0.05)").run(gm)
metrics = result.report.records[0].metrics
print(
    f"{metrics['trainable_parameters']:,} trainable parameters "
    f"(PEFT's LoRA at this rank: {metrics['peft_lora_parameters']:,})"
)
adapted = result.graph_module
ctx = rewriter.PassContext(calibration=rewriter.zoo.calibration_text(), tokenizer=tokenizer)
batches = ctx.batches(seq_len=64, batch_size=4)[:8]
report = rewriter.train(adapted, batches, steps=20, lr=3e-3, seed=0, show_progress=False)
print(f"training loss {report.first:.3f} -> {report.last:.3f} (only the adapters changed)")

with tempfile.TemporaryDirectory() as tmp:
    path = str(Path(tmp) / "adapters.safetensors")
    rewriter.adapters.save(adapted, path)
    fresh = rewriter.trace(model, (ids,), dynamic_shapes="auto")
    loaded = rewriter.adapters.load(fresh, path)
    rewriter.verify.assert_equivalent(adapted, loaded, max_examples=2)
    print(f"adapters saved alone ({Path(path).stat().st_size / 1024:.0f} KiB) and reloaded")

    merged = rewriter.Pipeline.parse("merge-adapters").run(loaded).graph_module
    rewriter.verify.assert_equivalent(loaded, merged, max_examples=2)
    exported = rewriter.backends.onnx.export(merged, None, Path(tmp) / "merged.onnx")
    assert rewriter.backends.onnx.check(merged, exported.path, (ids,)).ok
    print("merged exactly and runs in ONNX Runtime")
