"""Generation with a KV cache from a rewritten graph: trace the embedded model's step graph,
rewrite it once, cut it into prefill and decode graphs, generate greedily in torch and in ONNX
Runtime, and compare with Hugging Face generate; then deploy a linearized version, whose
cache is a fixed-size recurrent state.

python examples/11_generate.py
"""

import tempfile

import torch

import rewriter
from rewriter import deploy

model, tokenizer = rewriter.zoo.tiny_gpt2()
ids = torch.tensor(tokenizer.encode(rewriter.zoo.eval_text()[:2000])[:16]).view(2, 8)

step = deploy.trace_causal_lm(model, ids)  # prefix with a cache, then the last token from it
rewriter.verify.assert_equivalent(model, step, max_examples=2)
step = rewriter.Pipeline.parse("canonicalize,prernorm,fold-ln").run(step).graph_module
graphs = deploy.split(step)  # prefill and decode graphs sharing the weights
print(f"decode graph inputs: {[p.name for p in graphs.decode.graph.find_nodes(op='placeholder')]}")

prompts = ["Return the", 'def split(self, sep=None):\n    """']
result = deploy.generate(graphs, tokenizer, prompts, max_new_tokens=16)
for prompt, text in zip(prompts, result.texts):
    print(f"{prompt!r} -> {text!r}")

tokenizer.padding_side, tokenizer.pad_token = "left", tokenizer.eos_token
batch = tokenizer(prompts, return_tensors="pt", padding=True)
reference = model.generate(
    **batch, max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.eos_token_id
)[:, batch.input_ids.shape[1] :]
assert torch.equal(result.tokens, reference)
print("the rewritten graphs generate Hugging Face generate's tokens")

with tempfile.TemporaryDirectory() as tmp:
    sessions = rewriter.backends.onnx.export_causal_lm(graphs, tmp)
    assert torch.equal(deploy.generate(sessions, tokenizer, prompts, 16).tokens, reference)
    print("and so do the ONNX Runtime sessions (cache kept in ORT memory between steps)")

# Linearized attention deploys with a fixed-size cache: each layer's recurrent state (S, z)
# replaces its keys and values, so decode memory does not grow with the context.
calibration = rewriter.PassContext(
    calibration=rewriter.zoo.calibration_text()[:20000], tokenizer=tokenizer, progress=False
)
linear = rewriter.Pipeline.parse("linearize(fit_steps=40)").run(step, calibration)  # transfer
linear_graphs = deploy.split(linear.graph_module)
print(f"linearized decode cache: {linear_graphs.cache_names[:2]} ...")
report = deploy.agreement(graphs, linear_graphs, tokenizer, prompts, 16)
print(f"linearized: {report['token_agreement']:.0%} of greedy tokens agree with the original")
print(f"  {prompts[0]!r} -> {report['candidate_texts'][0]!r}")
