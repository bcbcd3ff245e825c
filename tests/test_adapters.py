"""lora and merge-adapters: no-op at init, exact merge, targets, training, export, ties."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import rewriter
from rewriter import verify, zoo
from rewriter.analysis.adapters import records
from rewriter.errors import PassError
from rewriter.ir.graph import is_lm_head, linear_maps
from rewriter.testing import fingerprint, graph_fingerprint
from rewriter.verify.families import ModelSpec

FAMILIES = ["gpt2", "opt", "llama", "bert"]


def _randomize(gm: torch.fx.GraphModule, seed: int = 0, size: float = 0.5) -> None:
    """Give every adapter factor random values, large enough to move the logits by O(1)."""
    generator = torch.Generator().manual_seed(seed)
    for record in records(gm):
        for name in record.trainable:
            parameter = gm.get_parameter(name)
            with torch.no_grad():
                noise = torch.randn(parameter.shape, generator=generator, dtype=torch.float64)
                parameter.copy_(noise * size)


def _within_tolerance(got: torch.Tensor, want: torch.Tensor) -> None:
    """The project's tolerance rule (``verify.tolerance``) for an exact claim."""
    error = float((got - want).abs().max())
    assert error <= verify.tolerance(want), (error, verify.tolerance(want))


@settings(max_examples=4, deadline=None)
@given(
    spec=verify.model_specs(FAMILIES, dtype=torch.float64),
    init=st.sampled_from(["default", "gaussian", "pissa"]),
)
def test_injection_is_a_no_op_at_init_and_merge_is_exact(spec: ModelSpec, init: str) -> None:
    # float64: the merged and unmerged graphs round differently in float32 once the adapters
    # move the logits by O(1); in float64 the tolerance rule (1e-10 relative) shows exactness.
    model = spec.build()
    gm = rewriter.trace(model, spec.example_inputs(), dynamic_shapes="auto")
    r = min(2, spec.hidden)
    injected = rewriter.Pipeline.parse(f"lora(r={r},init={init})").run(gm).graph_module
    verify.assert_equivalent(model, injected, max_examples=3)  # the function is unchanged
    _randomize(injected)
    ids = spec.example_inputs(seed=3)[0]
    moved = verify.outputs(injected(ids))[0]
    assert (moved - verify.outputs(model(ids))[0]).abs().max() > 0.05  # the adapters matter
    merged = rewriter.Pipeline.parse("merge-adapters").run(injected).graph_module
    assert not records(merged) and all("lora" not in n for n in merged.state_dict())
    verify.assert_equivalent(injected, merged, max_examples=3)


METHODS = [
    "lora(r=2,init=gaussian)",
    "nola(k=8,l=8,r=2)",
    "lora-xs(r=2,init=zeros)",
    "lora-sb(r=2,samples=2)",
]


@settings(max_examples=4, deadline=None)
@given(
    spec=verify.model_specs(["gpt2", "llama"], dtype=torch.float64), method=st.sampled_from(METHODS)
)
def test_every_method_merges_exactly(spec: ModelSpec, method: str) -> None:
    model = spec.build()
    gm = rewriter.trace(model, spec.example_inputs(), dynamic_shapes="auto")
    ctx = rewriter.PassContext(
        calibration=torch.randint(0, spec.vocab, (4, 8)), progress=False, batch_size=2
    )
    injected = rewriter.Pipeline.parse(method).run(gm, ctx).graph_module
    if not method.startswith("lora-sb"):  # LoRA-SB starts from an update by design
        verify.assert_equivalent(model, injected, max_examples=2)
    _randomize(injected, size=0.3)
    merged = rewriter.Pipeline.parse("merge-adapters").run(injected).graph_module
    assert not records(merged)
    verify.assert_equivalent(injected, merged, max_examples=2)


def test_nola_bases_are_seeded_and_stored_as_frozen_tensors() -> None:
    from rewriter.analysis.adapters import nola_bases

    spec = ModelSpec("gpt2", layers=1, vocab=100)
    gm = rewriter.trace(spec.build(), spec.example_inputs(), dynamic_shapes="auto")
    state = torch.random.get_rng_state()
    out = rewriter.Pipeline.parse("nola(k=4,l=3,r=2,seed=7)").run(gm).graph_module
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is untouched
    first = records(out)[0]
    a_basis, _ = nola_bases(7, 0, 4, 3, 2, 16, 48)
    torch.testing.assert_close(out.state_dict()[first.tensors["A_basis"]], a_basis)
    assert first.extra["seed"] == 7 and first.trainable == sorted(
        [first.tensors["alpha"], first.tensors["beta"]]
    )
    assert sum(p.numel() for p in out.parameters() if p.requires_grad) == 4 * (4 + 3)


def test_targets_follow_peft_rules_and_errors_name_the_maps() -> None:
    spec = ModelSpec("gpt2", layers=2, vocab=100)
    gm = rewriter.trace(spec.build(), spec.example_inputs(), dynamic_shapes="auto")

    def adapted(targets: str) -> list[str]:
        out = rewriter.Pipeline.parse(f"lora(targets='{targets}')").run(gm).graph_module
        return sorted(r.module for r in records(out))

    everything = adapted("all-linear")
    assert len(everything) == 8 and not any("lm_head" in m for m in everything)
    assert adapted("c_attn") == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    assert adapted(r"transformer\.h\.1\.mlp\..*") == [
        "transformer.h.1.mlp.c_fc",
        "transformer.h.1.mlp.c_proj",
    ]
    with pytest.raises(PassError, match=r"targets='q_proj' selects no linear map.*c_attn"):
        rewriter.Pipeline.parse("lora(targets='q_proj')").run(gm)
    with pytest.raises(PassError, match=r"dropout must be in \[0, 1\)"):
        rewriter.Pipeline.parse("lora(dropout=1.5)").run(gm)


def test_adapter_dropout_acts_only_while_training() -> None:
    from rewriter.pipeline.train import _switch_train_dropout

    spec = ModelSpec("gpt2", layers=1, vocab=100)
    model = spec.build()
    gm = rewriter.trace(model, spec.example_inputs(), dynamic_shapes="auto")
    out = (
        rewriter.Pipeline.parse("canonicalize,lora(r=2,dropout=0.5),canonicalize")
        .run(gm)
        .graph_module
    )
    _randomize(out)
    ids = torch.randint(0, 100, (2, 7))
    quiet = verify.outputs(out(ids))[0]
    assert torch.equal(quiet, verify.outputs(out(ids))[0])  # off in the graph: deterministic
    assert _switch_train_dropout(out, True) == 4
    noisy = [verify.outputs(out(ids))[0] for _ in range(2)]
    assert not torch.equal(noisy[0], noisy[1])
    _switch_train_dropout(out, False)
    assert torch.equal(quiet, verify.outputs(out(ids))[0])
    merged = rewriter.Pipeline.parse("merge-adapters").run(out).graph_module
    assert "aten.dropout.default" not in rewriter.graph.op_counts(merged)


def test_report_counts_trainable_parameters_like_peft() -> None:
    spec = ModelSpec("llama", layers=2, vocab=100)
    gm = rewriter.trace(spec.build(), spec.example_inputs(), dynamic_shapes="auto")
    result = rewriter.Pipeline.parse("lora(r=4,targets='q_proj,v_proj')").run(gm)
    metrics = result.report.records[0].metrics
    expected = sum(
        4 * (lin.in_features + lin.out_features)
        for lin in linear_maps(gm)
        if lin.module.endswith(("q_proj", "v_proj"))
    )
    assert metrics["trainable_parameters"] == expected == metrics["peft_lora_parameters"]
    xs = (
        rewriter.Pipeline.parse("lora-xs(r=4,targets='q_proj,v_proj')")
        .run(gm)
        .report.records[0]
        .metrics
    )
    assert xs["trainable_parameters"] == 4 * 4 * 4 and xs["peft_lora_parameters"] == expected
    trainable = [n for n, p in result.graph_module.named_parameters() if p.requires_grad]
    assert sorted(trainable) == sorted(n for r in records(result.graph_module) for n in r.trainable)


@pytest.mark.parametrize("family", ["gpt2", "llama"])  # Conv1D (in, out) and Linear (out, in)
def test_lora_sb_starts_from_the_best_rank_r_first_update(family: str) -> None:
    # LoRA-SB's injected delta is the best rank-r approximation of -lr sign(g), g the gradient
    # of the next-token loss on the calibration batch, in the (out, in) orientation; the
    # reference gradient comes from the Hugging Face model, not from the pass's own copy.
    from rewriter.analysis.adapters import delta_weight
    from rewriter.pipeline.train import causal_lm_loss

    spec = ModelSpec(family, layers=1, dtype=torch.float64, heads=2, head_dim=8, vocab=40)
    model = spec.build()
    gm = rewriter.trace(model, spec.example_inputs(), dynamic_shapes="auto")
    batch = torch.randint(0, spec.vocab, (2, 8), generator=torch.Generator().manual_seed(5))
    ctx = rewriter.PassContext(calibration=batch, progress=False, batch_size=2)
    out = rewriter.Pipeline.parse("lora-sb(r=2,samples=1,update_lr=0.01)").run(gm, ctx)
    out = out.graph_module
    model.zero_grad()
    causal_lm_loss(model(batch).logits, batch).backward()
    weights = dict(model.named_parameters())
    checked = 0
    for record in records(out):
        grad = weights[record.weight].grad.to(torch.float64)
        grad = grad if record.layout == "out_in" else grad.T
        if min(grad.shape) <= 2 or (grad == 0).all():
            continue
        u, s, vh = torch.linalg.svd(-0.01 * torch.sign(grad), full_matrices=False)
        want = u[:, :2] @ torch.diag(s[:2]) @ vh[:2]
        got = delta_weight(out, record)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)  # SVDs of one matrix
        checked += 1
    assert checked >= 3


@pytest.mark.parametrize("init", ["pissa", "default"])
def test_an_adapter_on_a_tied_head_unties_and_leaves_the_embedding(init: str, tmp_path) -> None:
    # PiSSA writes a residual at injection, a plain LoRA writes the head at merge: either way
    # the tied embedding table must keep its bits
    from transformers import GPT2LMHeadModel

    # float64: with randomized factors the unmerged float32 graph rounds at the scale of the
    # adapter terms, not of the logits (a drawn input once missed the float32 rule by 2x)
    spec = ModelSpec("gpt2", layers=1, vocab=100, tied=True, dtype=torch.float64)
    model = spec.build()
    gm = rewriter.trace(model, spec.example_inputs(), dynamic_shapes="auto")
    before = fingerprint(model), graph_fingerprint(gm)
    out = rewriter.Pipeline.parse(f"lora(targets='.*',init={init},r=2)").run(gm).graph_module
    assert any("lm_head" in r.module for r in records(out))
    assert torch.equal(_embedding_table(out), model.transformer.wte.weight)
    _randomize(out)
    merged = rewriter.Pipeline.parse("merge-adapters").run(out).graph_module
    verify.assert_equivalent(out, merged, max_examples=3)
    assert torch.equal(_embedding_table(merged), model.transformer.wte.weight)
    # each copy is named after the module that reads it (not 'lm_head.weight_1'), and a saved
    # directory says the head is untied: loading it must not tie the merged head back
    head = next(lin for lin in linear_maps(merged) if is_lm_head(lin))
    assert _embedding_name(merged) == "transformer.wte.weight"
    assert head.weight_name == "lm_head.weight"
    rewriter.save_pretrained(merged, tmp_path)  # compares the reloaded model's logits itself
    reloaded = GPT2LMHeadModel.from_pretrained(tmp_path)
    assert reloaded.config.tie_word_embeddings is False
    assert torch.equal(reloaded.transformer.wte.weight, model.transformer.wte.weight)
    assert (fingerprint(model), graph_fingerprint(gm)) == before


def _embedding_name(gm: torch.fx.GraphModule) -> str:
    node = next(n for n in gm.graph.nodes if n.target == torch.ops.aten.embedding.default)
    return str(node.args[0].target)


def _embedding_table(gm: torch.fx.GraphModule) -> torch.Tensor:
    node = next(n for n in gm.graph.nodes if n.target == torch.ops.aten.embedding.default)
    return gm.state_dict()[str(node.args[0].target)]


def test_unmerged_and_merged_graphs_export_to_onnx_exactly(tmp_path) -> None:
    from rewriter.backends import onnx as backend

    torch.manual_seed(0)  # random factors and inputs: fixed, so the outcome is too
    spec = ModelSpec("gpt2", layers=1, vocab=100)
    gm = rewriter.trace(spec.build(), spec.example_inputs(), dynamic_shapes="auto")
    injected = rewriter.Pipeline.parse("lora(r=2)").run(gm).graph_module
    _randomize(injected)
    for name, graph in (
        ("unmerged", injected),
        ("merged", rewriter.Pipeline.parse("merge-adapters").run(injected).graph_module),
    ):
        exported = backend.export(graph, None, tmp_path / f"{name}.onnx")
        report = backend.check(graph, exported.path, (torch.randint(0, 100, (3, 7)),))
        assert report.ok, (name, report)
        import onnx

        initializers = {i.name for i in onnx.load(str(exported.path)).graph.initializer}
        assert any("lora" in i for i in initializers) == (name == "unmerged")


@pytest.mark.skipif(
    not (zoo.DATA / "model.safetensors").exists(), reason="the embedded model has not been built"
)
def test_a_few_steps_reduce_the_loss_on_the_embedded_model() -> None:
    model, tokenizer = zoo.tiny_gpt2()
    ids = tokenizer(zoo.eval_text()[:4000], return_tensors="pt").input_ids[:, :64].view(2, 32)
    gm = rewriter.trace(model, (ids,), dynamic_shapes="auto")
    injected = rewriter.Pipeline.parse("lora(r=4,alpha=8)").run(gm).graph_module
    ctx = rewriter.PassContext(
        calibration=zoo.calibration_text(), tokenizer=tokenizer, seq_len=64, batch_size=4
    )
    batches = ctx.batches()[:4]
    report = rewriter.train(injected, batches, steps=12, lr=3e-3, seed=0, show_progress=False)
    assert report.last < report.first
    assert sorted(report.params) == sorted(n for r in records(injected) for n in r.trainable)
    frozen = {n: p for n, p in injected.named_parameters() if "lora" not in n}
    torch.testing.assert_close(
        frozen["transformer.h.0.attn.c_attn.weight"], model.transformer.h[0].attn.c_attn.weight
    )


@pytest.mark.parametrize("method", ["lora(r=2)", "nola(k=6,l=5,r=2,seed=3)", "lora-xs(r=2)"])
def test_adapter_checkpoint_applies_to_a_fresh_trace(method: str, tmp_path) -> None:
    from rewriter.analysis import adapters

    spec = ModelSpec("gpt2", layers=1, vocab=100)
    model = spec.build()
    gm = rewriter.trace(model, spec.example_inputs(), dynamic_shapes="auto")
    injected = rewriter.Pipeline.parse(method).run(gm).graph_module
    _randomize(injected, size=0.3)
    adapters.save(injected, str(tmp_path / "adapters.safetensors"))
    fresh = rewriter.trace(model, spec.example_inputs(), dynamic_shapes="auto")
    loaded = adapters.load(fresh, str(tmp_path / "adapters.safetensors"))
    verify.assert_equivalent(injected, loaded, max_examples=2)
    if method.startswith("nola"):  # the file holds seeds and coefficients, not the bases
        from safetensors import safe_open

        with safe_open(str(tmp_path / "adapters.safetensors"), framework="pt") as handle:
            assert sorted({k.split(".")[1] for k in handle.keys()}) == ["alpha", "beta"]
    other = ModelSpec("llama", layers=1, vocab=100)
    wrong = rewriter.trace(other.build(), other.example_inputs(), dynamic_shapes="auto")
    with pytest.raises(ValueError, match=r"transformer\.h\.0\.attn\.c_attn.*does not have"):
        adapters.load(wrong, str(tmp_path / "adapters.safetensors"))


@pytest.mark.parametrize(
    ("family", "targets"), [("gpt2", "c_attn,c_fc"), ("llama", "q_proj,v_proj,down_proj")]
)
def test_merged_lora_equals_peft_merge_and_unload(family: str, targets: str) -> None:
    peft = pytest.importorskip("peft", reason="PEFT is not installed (dev extra)")
    spec = ModelSpec(family, layers=2, vocab=100)
    model = spec.build()
    gm = rewriter.trace(model, spec.example_inputs(), dynamic_shapes="auto")
    injected = (
        rewriter.Pipeline.parse(f"lora(targets='{targets}',r=4,alpha=8)").run(gm).graph_module
    )
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=targets.split(","),
        init_lora_weights=False,
        fan_in_fan_out=family == "gpt2",
    )
    reference = peft.get_peft_model(spec.build(), config)
    layers = {
        name.removeprefix("base_model.model."): module
        for name, module in reference.named_modules()
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {})
    }
    for record in records(injected):  # the same (random, non-zero) factors on both sides
        layer = layers[record.module]
        with torch.no_grad():
            injected.get_parameter(record.tensors["A"]).copy_(layer.lora_A["default"].weight)
            injected.get_parameter(record.tensors["B"]).copy_(layer.lora_B["default"].weight)
    merged = rewriter.Pipeline.parse("merge-adapters").run(injected).graph_module
    theirs = reference.merge_and_unload().state_dict()
    ours = merged.state_dict()
    assert len(records(injected)) == len(layers) > 0
    for record in records(injected):
        torch.testing.assert_close(
            ours[record.weight], theirs[record.module + ".weight"], rtol=1e-6, atol=1e-7
        )


def test_merged_model_saves_as_a_hugging_face_directory(tmp_path) -> None:
    import transformers

    spec = ModelSpec("llama", layers=1, vocab=100)
    gm = rewriter.trace(spec.build(), spec.example_inputs(), dynamic_shapes="auto")
    injected = rewriter.Pipeline.parse("lora(r=2)").run(gm).graph_module
    _randomize(injected, size=0.3)
    merged = rewriter.Pipeline.parse("merge-adapters").run(injected).graph_module
    report = rewriter.save_pretrained(merged, tmp_path / "merged")
    assert report.ok
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    ids = torch.randint(0, 100, (2, 6))
    verify.assert_equivalent(merged, reloaded, (ids,), max_examples=2)


def test_unmerge_is_exact_with_keep_base_and_refused_without() -> None:
    spec = ModelSpec("opt", layers=1, vocab=100)
    gm = rewriter.trace(spec.build(), spec.example_inputs(), dynamic_shapes="auto")
    injected = rewriter.Pipeline.parse("nola(k=4,l=4,r=2)").run(gm).graph_module
    _randomize(injected, size=0.3)
    kept = rewriter.Pipeline.parse("merge-adapters(keep_base=true)").run(injected).graph_module
    back = rewriter.Pipeline.parse("unmerge-adapters").run(kept).graph_module
    assert len(records(back)) == len(records(injected))
    ids = torch.randint(0, 100, (2, 7))
    assert torch.equal(verify.outputs(back(ids))[0], verify.outputs(injected(ids))[0])
    for record in records(injected):  # the base weights are the original bits
        assert torch.equal(back.state_dict()[record.weight], injected.state_dict()[record.weight])
    plain = rewriter.Pipeline.parse("merge-adapters").run(injected).graph_module
    with pytest.raises(PassError, match="without keep_base=true"):
        rewriter.Pipeline.parse("unmerge-adapters").run(plain)


class _SharedLayer(torch.nn.Module):
    """One linear module applied twice (weight sharing, as in ALBERT or a recurrent block)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)
        self.head = torch.nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.proj(torch.relu(self.proj(x))))


@pytest.mark.parametrize("method", ["lora(targets=proj,r=2,init=pissa)", "nola(targets=proj,r=2)"])
def test_a_module_applied_twice_gets_one_shared_adapter(method: str, tmp_path) -> None:
    torch.manual_seed(0)
    model = _SharedLayer().eval()
    x = torch.randn(3, 8)
    gm = rewriter.trace(model, (x,))
    adapted = rewriter.Pipeline.parse(method).run(gm).graph_module
    (record,) = records(adapted)
    assert len(record.outputs) == 2 and len(record.trainable) == 2
    _within_tolerance(adapted(x), model(x))  # exact at init (PiSSA's residual rounds)
    _randomize(adapted, seed=1)
    moved = adapted(x)
    assert not torch.allclose(moved, model(x))
    merged = rewriter.Pipeline.parse("merge-adapters(keep_base=true)").run(adapted).graph_module
    _within_tolerance(merged(x), moved)
    assert sum(p.numel() for p in merged.parameters()) == sum(p.numel() for p in gm.parameters())
    unmerged = rewriter.Pipeline.parse("unmerge-adapters").run(merged).graph_module
    assert len(records(unmerged)[0].outputs) == 2
    assert torch.equal(unmerged(x), moved)  # keep_base restores the base bit for bit
    path = str(tmp_path / "a.safetensors")
    if "pissa" in method:  # the base weight is the residual: the factors alone are not enough
        with pytest.raises(ValueError, match="residual"):
            rewriter.adapters.save(adapted, path)
        return
    rewriter.adapters.save(adapted, path)
    loaded = rewriter.adapters.load(gm, path)
    assert torch.equal(loaded(x), moved)  # the same factors on the same graph
