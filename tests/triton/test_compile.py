"""Rewritten graphs run on the kernels through rewriter.backends.triton.compile, under the
interpreter: the same outputs as the graph, and greedy generation from compiled prefill and
decode graphs of a linearized step graph."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import rewriter
from rewriter import deploy, verify
from rewriter.verify.families import ModelSpec


@pytest.fixture(scope="module")
def gpt2():
    spec = ModelSpec("gpt2", vocab=64, layers=2, heads=2, seed=4)
    model = spec.build()
    example = spec.example_inputs(batch=2, seq=8)
    return model, rewriter.trace(model, example, dynamic_shapes="auto"), example[0]


@pytest.mark.parametrize(
    "spec",
    [
        "canonicalize,prernorm,fold-ln",
        "canonicalize,crmsnorm",
        "canonicalize,l1quant(bits=4)",
        "canonicalize,l1quant(bits=3,act_bits=8)",
        "canonicalize,linearize(feature_map=elu,decay=lightning)",
    ],
)
def test_rewritten_graphs_run_on_the_kernels(gpt2, spec) -> None:
    from rewriter.backends import triton as backend

    _, gm, ids = gpt2
    ctx = rewriter.PassContext(
        calibration=torch.randint(0, 64, (4, 16)), progress=False, batch_size=2
    )
    out = rewriter.Pipeline.parse(spec).run(gm, ctx).graph_module
    compiled = backend.compile(out)
    assert compiled.kernels_run and "triton" in compiled.plan.values(), compiled.summary()
    with torch.no_grad():
        got, want = compiled(ids).logits, out(ids).logits
    error = float((got - want).abs().max())
    assert error <= verify.tolerance(want), f"max abs error {error:.3g} (the tolerance rule)"


def test_linearized_deployment_generates_the_same_tokens_on_the_kernels() -> None:
    from rewriter.backends import triton as backend

    spec = ModelSpec("llama", vocab=64, layers=2, heads=2, seed=2)
    model = spec.build()
    step = deploy.trace_causal_lm(model, spec.example_inputs(batch=2, seq=6)[0])
    ctx = rewriter.PassContext(
        calibration=torch.randint(0, 64, (4, 12)), progress=False, batch_size=2
    )
    step = (
        rewriter.Pipeline.parse("canonicalize,linearize(feature_map=elu)")
        .run(step, ctx)
        .graph_module
    )
    graphs = deploy.split(step)
    prefill, decode = backend.compile(graphs.prefill), backend.compile(graphs.decode)
    assert "triton" in decode.plan.values() and not decode.missing, decode.summary()
    on_kernels = dataclasses.replace(
        graphs, prefill=prefill.graph_module, decode=decode.graph_module
    )
    ids = torch.randint(1, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    want = deploy.generate(graphs, None, ids, 6, attention_mask=mask).tokens
    assert torch.equal(deploy.generate(on_kernels, None, ids, 6, attention_mask=mask).tokens, want)
