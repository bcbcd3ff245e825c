"""Deployment of causal LMs: the step graph, its cut into prefill and decode graphs, and greedy
generation that reproduces Hugging Face ``generate`` token for token, in torch and ORT."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import rewriter
from rewriter import deploy, verify, zoo
from rewriter.analysis import vocab
from rewriter.verify.families import ModelSpec


def _hf_greedy(model, ids, mask, new: int, eos: int | None = None) -> torch.Tensor:
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=new,
            do_sample=False,
            pad_token_id=0 if eos is None else eos,
            eos_token_id=eos,
        )
    return out[:, ids.shape[1] :]


def _prompts(vocab_size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab_size, (3, 6), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding
    mask[2, :4] = 0
    return ids, mask


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("spec", ["", "canonicalize,prernorm,fold-ln"])
def test_greedy_generation_equals_hugging_face(family: str, spec: str, tmp_path) -> None:
    config = ModelSpec(family, vocab=64, layers=2, seed=3)
    model = config.build()
    step = deploy.trace_causal_lm(model, config.example_inputs(batch=2, seq=5)[0])
    verify.assert_equivalent(model, step, max_examples=3)
    if spec:
        step = rewriter.Pipeline.parse(spec).run(step).graph_module
    graphs = deploy.split(step)
    ids, mask = _prompts(64)
    got = deploy.generate(graphs, None, ids, 8, attention_mask=mask).tokens
    want = _hf_greedy(model, ids, mask, 8)
    assert torch.equal(got, want)
    if family == "llama" and spec and importlib.util.find_spec("onnxruntime"):
        # rotary positions and RMSNorm through ONNX Runtime (GPT-2: the embedded model's test)
        sessions = rewriter.backends.onnx.export_causal_lm(graphs, tmp_path)
        assert torch.equal(
            deploy.generate(sessions, None, ids, 8, attention_mask=mask).tokens, want
        )


def test_the_cut_graphs_agree_with_the_model_step_by_step() -> None:
    config = ModelSpec("llama", vocab=48, layers=2)
    model = config.build()
    graphs = deploy.split(deploy.trace_causal_lm(model, config.example_inputs(batch=2, seq=4)[0]))
    ids, mask = _prompts(48, seed=1)
    pos = deploy.positions(mask)
    logits, cache = graphs.run_prefill(ids, mask, pos)
    with torch.no_grad():
        ref = model(ids, attention_mask=mask, position_ids=pos, use_cache=True)
    assert (logits - ref.logits).abs().max() <= verify.tolerance(ref.logits)  # exact claim
    assert len(cache) == 2 * 2 and cache[0].shape[2] == ids.shape[1]
    token = ref.logits[:, -1].argmax(-1, keepdim=True)
    mask2 = torch.cat([mask, torch.ones_like(token)], 1)
    step_logits, cache2 = graphs.run_decode(token, mask2, deploy.positions(mask2)[:, -1:], cache)
    with torch.no_grad():
        ref2 = model(
            token,
            attention_mask=mask2,
            position_ids=deploy.positions(mask2)[:, -1:],
            past_key_values=ref.past_key_values,
            use_cache=True,
        )
    assert (step_logits - ref2.logits).abs().max() <= verify.tolerance(ref2.logits)
    assert cache2[0].shape[2] == ids.shape[1] + 1


def test_prefill_and_decode_share_weights() -> None:
    config = ModelSpec("gpt2", vocab=48)
    model = config.build()
    step = deploy.trace_causal_lm(model, config.example_inputs(batch=2, seq=4)[0])
    step = rewriter.Pipeline.parse("canonicalize,prernorm,fold-ln").run(step).graph_module
    graphs = deploy.split(step)
    prefill = {id(t) for t in graphs.prefill.parameters()}
    decode = {id(t) for t in graphs.decode.parameters()}
    assert decode <= prefill | {id(t) for t in graphs.decode.buffers()}
    # fold-ln folded each norm module once, for both halves: no weight is stored twice
    sizes = sum(t.numel() for t in step.parameters())
    original = sum(t.numel() for t in model.parameters())
    assert sizes <= original + config.vocab * config.hidden  # + the untied head, nothing else


def test_trace_causal_lm_errors() -> None:
    model = ModelSpec("gpt2", vocab=48).build()
    with pytest.raises(rewriter.TraceError, match="batch >= 2"):
        deploy.trace_causal_lm(model, torch.tensor([[1, 2, 3]]))
    with pytest.raises(rewriter.RewriterError, match="step graph"):
        deploy.split(rewriter.trace(model, (torch.tensor([[1, 2, 3], [4, 5, 6]]),)))


@pytest.fixture(scope="module")
def embedded():
    model, tokenizer = zoo.tiny_gpt2()
    text = zoo.calibration_text()[:20_000]
    ids = torch.tensor(tokenizer.encode(text[:2000])[:16]).view(2, 8)
    step = deploy.trace_causal_lm(model, ids)
    return model, tokenizer, step, text


def _reference_texts(model, tokenizer, prompts: list[str], new: int) -> list[list[int]]:
    rows = [tokenizer.encode(p) for p in prompts]
    width = max(map(len, rows))
    eot = tokenizer.eos_token_id
    ids = torch.tensor([[eot] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return _hf_greedy(model, ids, mask, new, eos=eot).tolist()


def test_embedded_model_rewritten_generates_the_original_tokens(embedded, tmp_path) -> None:
    pytest.importorskip("onnxruntime")
    model, tokenizer, step, _text = embedded
    prompts = ["def read(self, path):", "Return the", "class Parser:\n    "]
    want = _reference_texts(model, tokenizer, prompts, 16)
    out = rewriter.Pipeline.parse("canonicalize,prernorm,fold-ln").run(step).graph_module
    graphs = deploy.split(out)
    result = deploy.generate(graphs, tokenizer, prompts, 16)
    assert result.tokens.tolist() == want
    assert result.texts[0] == tokenizer.decode(want[0], skip_special_tokens=True)
    ort_graphs = rewriter.backends.onnx.export_causal_lm(graphs, tmp_path)
    for binding in (True, False):
        ort_graphs.io_binding = binding
        assert deploy.generate(ort_graphs, tokenizer, prompts, 16).tokens.tolist() == want


def test_embedded_model_after_vocab_trim_generates_the_original_tokens(embedded) -> None:
    model, tokenizer, step, text = embedded
    ctx = rewriter.PassContext(calibration=text, tokenizer=tokenizer)
    out = rewriter.Pipeline.parse("canonicalize,vocab-trim").run(step, ctx).graph_module
    graphs = deploy.split(out)
    vmap = vocab.vocab_map(graphs.prefill)
    assert vmap is not None and vmap.tokenizer is not None
    prompts = [text[100:140], text[900:930]]  # text the trim kept every token of
    want = _reference_texts(model, tokenizer, prompts, 12)
    result = deploy.generate(graphs, None, prompts, 12)  # the rebuilt tokenizer is used
    got = vmap.to_original(result.tokens).tolist()
    # the original's greedy tokens are kept ones whenever the argmax is a kept token; compare
    # where the original stayed inside the kept vocabulary
    kept = set(vmap.kept.tolist())
    for row_got, row_want in zip(got, want):
        prefix = next((i for i, t in enumerate(row_want) if t not in kept), len(row_want))
        assert row_got[:prefix] == row_want[:prefix]
        assert prefix > 0


def test_sampling_is_seeded_and_respects_top_k(embedded) -> None:
    _, tokenizer, step, _ = embedded
    graphs = deploy.split(step)
    a = deploy.generate(graphs, tokenizer, ["import "], 10, do_sample=True, seed=5, top_k=5)
    b = deploy.generate(graphs, tokenizer, ["import "], 10, do_sample=True, seed=5, top_k=5)
    c = deploy.generate(graphs, tokenizer, ["import "], 10, do_sample=True, seed=6, top_k=5)
    assert torch.equal(a.tokens, b.tokens) and not torch.equal(a.tokens, c.tokens)
    greedy = deploy.generate(graphs, tokenizer, ["import "], 10, do_sample=True, top_k=1)
    assert torch.equal(greedy.tokens, deploy.generate(graphs, tokenizer, ["import "], 10).tokens)
    assert rewriter.generate is deploy.generate  # the facade's name for it


@pytest.mark.parametrize("method", ["lora(r=2)", "nola(r=2,k=4,l=4)"])
def test_adapters_on_a_step_graph_are_shared_by_both_halves(method) -> None:
    # one adapter per module, its branch at both applications: trained on the step graph,
    # split, it generates exactly what the merged step graph generates
    config = ModelSpec("gpt2", vocab=48, seed=2)
    model = config.build()
    example = config.example_inputs(batch=2, seq=5)[0]
    step = deploy.trace_causal_lm(model, example)
    full = rewriter.trace(model, (example,), dynamic_shapes="auto")
    adapted = rewriter.Pipeline.parse(method).run(step).graph_module
    found = rewriter.adapters.records(adapted)
    on_full = rewriter.adapters.records(rewriter.Pipeline.parse(method).run(full).graph_module)
    assert len(found) == len(on_full) and all(len(r.outputs) == 2 for r in found)
    batches = [
        torch.randint(0, 48, (2, 10), generator=torch.Generator().manual_seed(i)) for i in range(3)
    ]
    rewriter.train(adapted, batches, steps=8, lr=5e-2, seed=0, show_progress=False)
    ids, mask = _prompts(48, seed=3)
    got = deploy.generate(deploy.split(adapted), None, ids, 8, attention_mask=mask).tokens
    merged = rewriter.Pipeline.parse("merge-adapters").run(adapted).graph_module
    assert not rewriter.adapters.records(merged)
    want = deploy.generate(deploy.split(merged), None, ids, 8, attention_mask=mask).tokens
    assert torch.equal(got, want)
    pos = deploy.positions(mask)
    with torch.no_grad():  # training moved the adapters: the merged model is not the original
        assert not torch.allclose(merged(ids, mask, pos).logits, step(ids, mask, pos).logits)


def test_calibrated_passes_calibrate_a_module_once_on_the_step_graph(embedded) -> None:
    # ln-freeze pools each norm module's inputs over both halves of the step graph: the result
    # equals freezing the full-sequence trace, and no weight is stored twice
    model, tokenizer, step, text = embedded
    ids = step.meta["rewriter.trace"].example_inputs[0]
    full = rewriter.trace(model, (ids,), dynamic_shapes="auto")
    ctx = rewriter.PassContext(calibration=text, tokenizer=tokenizer, progress=False)
    spec = "ln-freeze(norms='.*ln_1',calibration_batches=2),fold-ln"
    a = rewriter.Pipeline.parse(spec).run(full, ctx).graph_module
    b = rewriter.Pipeline.parse(spec).run(step, ctx).graph_module
    mask = torch.ones_like(ids)
    with torch.no_grad():
        want = a(ids).logits
        got = b(ids, attention_mask=mask, position_ids=deploy.positions(mask)).logits
    # Not bit-exact by design: the frozen scales are means over the same calibration tokens
    # gathered from two halves instead of one graph, summed in another float32 order.
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert sum(p.numel() for p in b.parameters()) == sum(p.numel() for p in a.parameters())
    result = deploy.generate(deploy.split(b), tokenizer, ["Return the"], 4)
    assert result.tokens.shape == (1, 4)


def test_approximate_rewrites_report_their_token_agreement(embedded) -> None:
    _, tokenizer, step, _ = embedded
    text = zoo.eval_text()
    prompts = [text[i : i + 60] for i in range(0, 3000, 1000)]
    base = deploy.split(step)
    ctx = rewriter.PassContext(
        calibration=zoo.calibration_text()[:20_000], tokenizer=tokenizer, progress=False
    )
    found = {}
    for bits in (8, 3):
        out = rewriter.Pipeline.parse(f"l1quant(norm=keep,bits={bits})").run(step, ctx)
        found[bits] = deploy.agreement(base, deploy.split(out.graph_module), tokenizer, prompts, 12)
    # measured: 8 bits agree on every token of these prompts, 3 bits on about a quarter
    assert found[8]["token_agreement"] >= 0.9
    assert found[3]["common_prefix"] < found[8]["common_prefix"]
    assert len(found[3]["candidate_texts"]) == len(prompts)


def _greedy_without_cache(gm, ids, mask, new: int) -> torch.Tensor:
    """Greedy tokens from a full-sequence graph, recomputing the whole sequence each step."""
    tokens = []
    for _ in range(new):
        with torch.no_grad():
            logits = gm(ids, attention_mask=mask, position_ids=deploy.positions(mask)).logits
        token = logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(token)
        ids, mask = torch.cat([ids, token], 1), torch.cat([mask, torch.ones_like(token)], 1)
    return torch.cat(tokens, 1)


@pytest.mark.parametrize(
    ("family", "options", "spec"),
    [
        ("llama", {"kv_heads": 2}, "linearize(feature_map=elu)"),
        ("gpt2", {}, "linearize(fit_steps=0,window=2,decay=lightning)"),
        ("llama", {}, "linearize(feature_map=elu,window=3,layers='.*layers.0.*')"),
    ],
)
def test_linearized_step_graph_decodes_from_a_fixed_size_state(family, options, spec) -> None:
    # linearize on the step graph: the prefix's recurrent state becomes the cache, and the
    # result equals linearizing the full-sequence trace, logits and greedy tokens alike
    config = ModelSpec(family, vocab=64, layers=2, heads=4, seed=3).with_options(**options)
    model = config.build()
    example = config.example_inputs(batch=2, seq=6)[0]
    ones = torch.ones_like(example)
    full = rewriter.trace(
        model,
        (example,),
        kwargs={"attention_mask": ones, "position_ids": deploy.positions(ones)},
        dynamic_shapes="auto",
    )
    calibration = torch.randint(1, 64, (4, 8), generator=torch.Generator().manual_seed(0))

    def linearized(gm):
        ctx = rewriter.PassContext(calibration=calibration, progress=False, batch_size=2)
        return rewriter.Pipeline.parse(spec).run(gm, ctx).graph_module

    step = linearized(deploy.trace_causal_lm(model, example))
    reference = linearized(full)
    ids, mask = _prompts(64, seed=4)
    pos = deploy.positions(mask)
    with torch.no_grad():
        # The same fitted linearization traced two ways: the step graph runs the recurrent
        # form over a state, the full trace the chunked form; float32 sums in other orders.
        torch.testing.assert_close(
            step(ids, attention_mask=mask, position_ids=pos).logits,
            reference(ids, attention_mask=mask, position_ids=pos).logits,
            rtol=1e-4,
            atol=1e-5,
        )
    graphs = deploy.split(step)
    partial = "layers" in spec  # only layer 0 linearized: layer 1 keeps keys and values
    kinds = {kind for _, kind in graphs.cache}
    assert kinds >= {2, 3} and (kinds >= {0, 1}) == partial
    got = deploy.generate(graphs, None, ids, 8, attention_mask=mask).tokens
    assert torch.equal(got, _greedy_without_cache(reference, ids, mask, 8))
    # the decode graph's state does not grow with the context
    logits, cache = graphs.run_prefill(ids, mask, pos)
    before = {name: c.shape for name, c in zip(graphs.cache_names, cache)}
    for _ in range(3):
        token = logits[:, -1].argmax(-1, keepdim=True)
        mask = torch.cat([mask, torch.ones_like(token)], 1)
        logits, cache = graphs.run_decode(token, mask, deploy.positions(mask)[:, -1:], cache)
    for (_, kind), name, tensor in zip(graphs.cache, graphs.cache_names, cache):
        if deploy.grows(kind):  # keys and values: one position per step
            assert tensor.shape[2] == before[name][2] + 3, name
        else:  # a linearized layer's state
            assert tensor.shape == before[name], name


def test_linearized_embedded_model_generates_in_torch_and_ort(embedded, tmp_path) -> None:
    pytest.importorskip("onnxruntime")
    _, tokenizer, step, text = embedded
    ctx = rewriter.PassContext(calibration=text, tokenizer=tokenizer, progress=False)
    spec = "linearize(fit_steps=10,calibration_batches=2,window=8)"
    out = rewriter.Pipeline.parse(spec).run(step, ctx).graph_module
    graphs = deploy.split(out)
    assert all(kind >= 2 for _, kind in graphs.cache)  # no keys or values left
    prompts = [zoo.eval_text()[i : i + 60] for i in (0, 1500)]
    report = deploy.agreement(deploy.split(step), graphs, tokenizer, prompts, 12)
    assert 0.0 <= report["token_agreement"] <= 1.0 and len(report["candidate_texts"]) == 2
    ort = rewriter.backends.onnx.export_causal_lm(graphs, tmp_path)
    assert torch.equal(
        deploy.generate(ort, tokenizer, prompts, 12).tokens,
        deploy.generate(graphs, tokenizer, prompts, 12).tokens,
    )


def test_merged_adapters_generate_like_the_merged_model(tmp_path) -> None:
    # The supported order: adapters on the full-sequence trace, trained, merged, saved as a
    # Hugging Face directory, then the step graph of the saved model.
    from transformers import GPT2LMHeadModel

    config = ModelSpec("gpt2", vocab=64, layers=2, seed=5)
    model = config.build()
    gm = rewriter.trace(model, config.example_inputs(batch=2, seq=6), dynamic_shapes="auto")
    adapted = rewriter.Pipeline.parse("lora(r=2)").run(gm).graph_module
    batches = [
        torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(i)) for i in range(3)
    ]
    rewriter.train(adapted, batches, steps=6, lr=5e-2, seed=0, show_progress=False)
    merged = rewriter.Pipeline.parse("merge-adapters").run(adapted).graph_module
    rewriter.save_pretrained(merged, tmp_path)
    reloaded = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    step = deploy.trace_causal_lm(reloaded, config.example_inputs(batch=2, seq=5)[0])
    step = rewriter.Pipeline.parse("canonicalize,prernorm,fold-ln").run(step).graph_module
    ids, mask = _prompts(64, seed=2)
    got = deploy.generate(deploy.split(step), None, ids, 8, attention_mask=mask).tokens
    assert torch.equal(got, _hf_greedy(reloaded, ids, mask, 8))
    # training changed the model: the merged model generates differently from the base one
    assert not torch.equal(got, _hf_greedy(model, ids, mask, 8))
