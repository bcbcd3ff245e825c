"""Tracing: every family, masks, dynamic dims, dtypes, errors, and an untouched caller model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import rewriter
from rewriter.errors import TraceError
from rewriter.testing import fingerprint
from rewriter.verify import outputs
from rewriter.verify.families import FAMILIES, ModelSpec

HF_FAMILIES = [f for f in FAMILIES if f != "tenc"]


def _logits(output: object) -> torch.Tensor:
    return outputs(output)[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_trace_matches_model_and_leaves_it_untouched(family: str) -> None:
    spec = ModelSpec(family, outliers=True)
    model = spec.build()
    model.train()  # the tracer must trace in eval mode and restore this flag
    before = fingerprint(model)
    (ids,) = spec.example_inputs(seq=10)
    gm = rewriter.trace(model, (ids,))
    assert fingerprint(model) == before
    assert model.training and all(m.training for m in model.modules())
    assert "forward" not in vars(model)
    model.eval()
    expected = _logits(model(ids, **rewriter.trace_info(gm).bound_kwargs))
    # nn.TransformerEncoder's eager path fuses differently; everything else is bit-identical.
    error = (_logits(gm(ids)) - expected).abs().max().item()
    assert error <= (rewriter.verify.tolerance(expected) if family == "tenc" else 0.0)
    # The graph owns its weights: editing them leaves the model alone.
    for parameter in gm.parameters():
        parameter.data.add_(1.0)
    model.train()
    assert fingerprint(model) == before


@pytest.mark.parametrize("family", HF_FAMILIES)
def test_trace_with_attention_mask_and_dynamic_dims(family: str) -> None:
    spec = ModelSpec(family)
    model = spec.build()
    ids = spec.example_inputs(batch=3, seq=9)[0]
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    gm = rewriter.trace(
        model, kwargs={"input_ids": ids, "attention_mask": mask}, dynamic_shapes="auto"
    )
    info = rewriter.trace_info(gm)
    assert info.input_names == ("input_ids", "attention_mask")
    assert set(info.dynamic_dims["input_ids"].values()) == {"batch", "seq"}
    for batch, seq in [(1, 2), (2, 17), (5, 5)]:
        ids2 = torch.randint(0, spec.vocab, (batch, seq))
        mask2 = torch.ones_like(ids2)
        mask2[0, : seq // 2] = 0
        got = _logits(gm(input_ids=ids2, attention_mask=mask2))
        want = _logits(model(input_ids=ids2, attention_mask=mask2, **info.bound_kwargs))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_trace_records_ranges_from_the_model() -> None:
    spec = ModelSpec("bert", max_positions=32)
    gm = rewriter.trace(spec.build(), spec.example_inputs(seq=8), dynamic_shapes="auto")
    info = rewriter.trace_info(gm)
    assert info.dim_ranges["seq"][1] == 32  # BERT's position table bounds the sequence
    assert info.max_positions == 32


@pytest.mark.parametrize("size", [0, 1])
def test_dynamic_dim_with_special_example_size_is_explained(size: int) -> None:
    spec = ModelSpec("gpt2")
    ids = (
        torch.zeros(2, size, dtype=torch.long)
        if size == 0
        else torch.zeros(size, 8, dtype=torch.long)
    )
    dims = {"input_ids": {1: "seq"}} if size == 0 else {"input_ids": {0: "batch"}}
    with pytest.raises(TraceError, match=rf"has size {size}.*size >= 2"):
        rewriter.trace(spec.build(), (ids,), dynamic_shapes=dims)


def test_untraceable_model_gets_an_explanation() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:
                return self.linear(x)
            return x

    with pytest.raises(TraceError, match=r"data-dependent control flow.*test_trace\.py:\d+"):
        rewriter.trace(Branchy(), (torch.randn(2, 4),))


def test_specialized_dynamic_dim_is_refused() -> None:
    class FixedBatch(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.reshape(2, -1)

    with pytest.raises(TraceError, match="batch"):
        rewriter.trace(FixedBatch(), (torch.randn(2, 4),), dynamic_shapes={"x": {0: "batch"}})


def test_bad_inputs_are_named() -> None:
    model = nn.Linear(4, 4)
    with pytest.raises(TraceError, match="not a tensor"):
        rewriter.trace(model, (3,))
    with pytest.raises(TraceError, match="names inputs"):
        rewriter.trace(model, (torch.randn(2, 4),), dynamic_shapes={"nope": {0: "batch"}})
    with pytest.raises(TraceError, match=r"nn\.Module"):
        rewriter.trace(lambda x: x, (torch.randn(2),))  # type: ignore[arg-type]


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_graph_dtype_is_the_models(dtype: torch.dtype, family: str) -> None:
    spec = ModelSpec(family, dtype=dtype)
    model = spec.build()
    (ids,) = spec.example_inputs()
    gm = rewriter.trace(model, (ids,))
    assert rewriter.trace_info(gm).dtype == dtype
    got = _logits(gm(ids))
    assert got.dtype == dtype
    assert torch.equal(got, _logits(model(ids, use_cache=False)))


def test_plain_modules_and_encoder() -> None:
    mlp = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Dropout(0.5), nn.Linear(16, 4)).train()
    x = torch.randn(3, 8)
    gm = rewriter.trace(mlp, (x,), dynamic_shapes={"input": {0: "batch"}})
    assert mlp.training
    mlp.eval()
    torch.testing.assert_close(gm(torch.randn(5, 8)).shape, torch.Size([5, 4]))
    assert torch.equal(gm(x), mlp(x))

    spec = ModelSpec("tenc")
    model = spec.build()
    ids = spec.example_inputs(seq=6)[0]
    gm = rewriter.trace(model, (ids,), dynamic_shapes="auto")
    other = torch.randint(0, spec.vocab, (3, 11))
    torch.testing.assert_close(gm(other), model(other), rtol=1e-5, atol=1e-5)


def test_tied_weights_stay_tied_and_private() -> None:
    spec = ModelSpec("gpt2", tied=True)
    model = spec.build()
    gm = rewriter.trace(model, spec.example_inputs())
    assert gm.lm_head.weight is gm.transformer.wte.weight
    assert gm.lm_head.weight is not model.lm_head.weight
    assert not gm.lm_head.weight.requires_grad
