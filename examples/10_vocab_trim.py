"""Vocabulary trimming on the embedded model: keep the tokens a corpus uses, rebuild the
tokenizer, check the logits, save a Hugging Face directory, run the trimmed graph in ONNX Runtime.

python examples/10_vocab_trim.py
"""

import tempfile
from pathlib import Path

import torch

import rewriter
from rewriter.pipeline.metrics import perplexity_of_ids

model, tokenizer = rewriter.zoo.tiny_gpt2()
corpus = rewriter.zoo.calibration_text()[:20_000]
ids = tokenizer(corpus[:3000], return_tensors="pt").input_ids[:, :64].view(2, 32)
gm = rewriter.trace(model, (ids,), dynamic_shapes="auto")

ctx = rewriter.PassContext(calibration=corpus, tokenizer=tokenizer)
result = rewriter.Pipeline.parse("canonicalize,vocab-trim").run(gm, ctx)
trimmed = result.graph_module
print("\n".join(result.report.records[-1].notes))

vmap = rewriter.vocab.vocab_map(trimmed)  # new id i is original id vmap.kept[i]
new_tokenizer = vmap.tokenizer
old_ids = torch.tensor([tokenizer.encode(corpus[:400])])
new_ids = torch.tensor([new_tokenizer.encode(corpus[:400])])
assert torch.equal(vmap.graph_ids(old_ids), new_ids)  # same segmentation, renumbered
with torch.no_grad():
    want = model(old_ids).logits[..., vmap.kept]
    error = (trimmed(new_ids).logits - want).abs().max()
print(f"logits vs the original's at the kept ids: max abs error {float(error):.1e}")
assert error <= rewriter.verify.tolerance(want)  # exact: the kept rows, renumbered

whole = torch.tensor(tokenizer.encode(corpus))
print(
    f"perplexity on the corpus: trimmed {perplexity_of_ids(trimmed, vmap.graph_ids(whole)):.3f}, "
    f"original renormalized over the kept ids "
    f"{perplexity_of_ids(model, whole, over=vmap.kept):.3f}, "
    f"original {perplexity_of_ids(model, whole):.3f}"
)

with tempfile.TemporaryDirectory() as tmp:
    rewriter.save_pretrained(trimmed, Path(tmp) / "hf")  # model + rebuilt tokenizer, reloaded
    print(f"Hugging Face directory: {sorted(p.name for p in (Path(tmp) / 'hf').iterdir())}")
    exported = rewriter.backends.onnx.export(trimmed, None, Path(tmp) / "trimmed.onnx")
    assert rewriter.backends.onnx.check(trimmed, exported.path).ok
    print("the trimmed graph runs in ONNX Runtime")
