"""Weightless graphs (issue 14's first step): a Hugging Face architecture traced on the meta
device from its config, analysed and rewritten by the weight-editing passes without a weight
in memory; the rewritten structure equals the rewrite of the loaded model."""

from __future__ import annotations

import collections
import json

import pytest
import torch

import rewriter
from rewriter.analysis import vocab
from rewriter.analysis.residual import find_stream
from rewriter.errors import PassError, RewriterError
from rewriter.ir.graph import is_weightless

LLAMA = {
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 80,
    "max_position_embeddings": 64,
}
GPT2 = {
    "model_type": "gpt2",
    "n_embd": 32,
    "n_layer": 2,
    "n_head": 4,
    "vocab_size": 80,
    "n_positions": 64,
    "bos_token_id": 0,
    "eos_token_id": 0,
}


def _ops(gm: torch.fx.GraphModule) -> collections.Counter:
    moves = {torch.ops.aten.contiguous.default, torch.ops.aten._to_copy.default}
    return collections.Counter(
        str(n.target) for n in gm.graph.nodes if n.op == "call_function" and n.target not in moves
    )


def _loaded(config: dict) -> torch.fx.GraphModule:
    import transformers

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.for_model(**config)
    )
    ids = torch.randint(0, config["vocab_size"], (2, 8), generator=torch.Generator().manual_seed(0))
    return rewriter.trace(model.eval(), (ids,), dynamic_shapes="auto")


@pytest.mark.parametrize("config", [LLAMA, GPT2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("spec", ["canonicalize,prernorm,fold-ln", "canonicalize,crmsnorm"])
def test_weightless_rewrite_has_the_structure_of_the_loaded_rewrite(config, spec, tmp_path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(config))
    gm = rewriter.trace_weightless(tmp_path)  # a model directory without weights
    assert is_weightless(gm) and all(p.device.type == "meta" for p in gm.parameters())
    loaded = _loaded(config)
    assert sum(p.numel() for p in gm.parameters()) == sum(p.numel() for p in loaded.parameters())
    # analyses read structure only
    light_stream, heavy_stream = (find_stream(g, width=32) for g in (gm, loaded))
    assert (light_stream is None) == (heavy_stream is None)
    if light_stream is not None:
        assert len(light_stream.norms) == len(heavy_stream.norms)
    assert sorted(vocab.analyze(gm).tensors) == sorted(vocab.analyze(loaded).tensors)
    ctx = rewriter.PassContext(progress=False)
    light = rewriter.Pipeline.parse(spec).run(gm, ctx)
    heavy = rewriter.Pipeline.parse(spec).run(loaded, ctx)
    # the same computation: the same ops (Hugging Face adds a contiguous() for non-CPU devices,
    # and tensors it creates at run time are on meta: binding weights moves them) and the same
    # tensors, every one on meta
    assert _ops(light.graph_module) == _ops(heavy.graph_module)
    shapes = {n: tuple(p.shape) for n, p in light.graph_module.named_parameters()}
    assert shapes == {n: tuple(p.shape) for n, p in heavy.graph_module.named_parameters()}
    assert is_weightless(light.graph_module)
    assert all(r.error is None for r in light.report.records)  # nothing to compare without data


def test_passes_that_need_weight_values_refuse_on_a_weightless_graph() -> None:
    gm = rewriter.trace_weightless(LLAMA)
    with pytest.raises(PassError, match="weightless"):
        rewriter.Pipeline.parse("canonicalize,l1quant(bits=4,norm=keep)").run(
            gm, rewriter.PassContext(progress=False)
        )


def test_remote_code_and_non_configs_are_refused(tmp_path) -> None:
    with pytest.raises(RewriterError, match="remote code"):
        rewriter.trace_weightless({**LLAMA, "auto_map": {"AutoModelForCausalLM": "x.Y"}})
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 4}))
    with pytest.raises(RewriterError, match="model_type"):
        rewriter.trace_weightless(tmp_path)
    with pytest.raises(RewriterError, match="no Hugging Face config"):
        rewriter.trace_weightless(tmp_path / "missing")
