"""Every weight edit again with 256-byte row blocks, so each tensor is edited in many blocks.

The weight store computes every edit in float64 blocks of output rows (8 MiB by default, so every
weight of the suite's small models is one block). A block loop that reads the wrong rows of a
factor, skips the last block or restarts a column sum is invisible with one block; here each
test weight spans dozens of blocks. Each exact rewrite is checked in float64 against the model
with the tolerance rule, and the adapters' merges against the unmerged graph.
"""

from __future__ import annotations

import pytest
import torch

import rewriter
from rewriter import verify
from rewriter.analysis.adapters import records
from rewriter.ir.store import WeightStore
from rewriter.verify.families import ModelSpec

BLOCK_BYTES = 256


@pytest.fixture
def small_blocks(monkeypatch) -> list[int]:
    """256-byte blocks; returns the number of blocks of each edit that ran (to assert on)."""
    counts: list[int] = []
    plain = WeightStore.blocks

    def blocks(self, shape):
        ranges = list(plain(self, shape))
        counts.append(len(ranges))
        return iter(ranges)

    monkeypatch.setattr(WeightStore, "block_bytes", BLOCK_BYTES)
    monkeypatch.setattr(WeightStore, "blocks", blocks)
    return counts


def _spec(family: str, **options) -> ModelSpec:
    # vocab 97 and width 24: rows of 192 bytes, so one or two rows per block, odd row counts
    return ModelSpec(
        family, heads=3, head_dim=8, vocab=97, dtype=torch.float64, outliers=True, tied=False
    ).with_options(**options)


EXACT = [
    ("gpt2", "canonicalize,prernorm,fold-ln"),
    ("bloom", "canonicalize,prernorm,fold-ln"),
    ("gpt_neox", "canonicalize,crmsnorm"),
    ("tenc", "canonicalize,prernorm,fold-ln"),
    ("opt", "canonicalize,prernorm,fold-ln"),
]


@pytest.mark.parametrize(("family", "pipeline"), EXACT, ids=[f for f, _ in EXACT])
def test_exact_passes_with_small_blocks(small_blocks, family: str, pipeline: str) -> None:
    spec = _spec(family, eps=1e-3)
    model = spec.build()
    gm = rewriter.trace(model, spec.example_inputs(), dynamic_shapes="auto")
    out = rewriter.Pipeline.parse(pipeline).run(gm).graph_module
    assert max(small_blocks) > 10
    report = verify.assert_equivalent(model, out, max_examples=2)
    assert report.max_abs <= 1e-10 * report.ref_max


METHODS = ["lora(r=3,init=gaussian)", "nola(k=6,l=6,r=3)", "lora-xs(r=3)", "lora-sb(r=3,samples=2)"]


@pytest.mark.parametrize("family", ["gpt2", "llama"])  # Conv1D (in, out) and Linear (out, in)
@pytest.mark.parametrize("method", METHODS)
def test_adapter_merges_with_small_blocks(small_blocks, family: str, method: str) -> None:
    spec = _spec(family)
    model = spec.build()
    gm = rewriter.trace(model, spec.example_inputs(), dynamic_shapes="auto")
    ctx = rewriter.PassContext(
        calibration=torch.randint(0, spec.vocab, (4, 8)), progress=False, batch_size=2
    )
    injected = rewriter.Pipeline.parse(method).run(gm, ctx).graph_module
    generator = torch.Generator().manual_seed(0)
    for record in records(injected):
        for name in record.trainable:
            parameter = injected.get_parameter(name)
            with torch.no_grad():
                parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))
    small_blocks.clear()
    merged = rewriter.Pipeline.parse("merge-adapters").run(injected).graph_module
    assert not records(merged)
    assert max(small_blocks) > 10
    report = verify.assert_equivalent(injected, merged, max_examples=2)
    assert report.max_abs <= 1e-10 * report.ref_max


def test_vocab_trim_with_small_blocks(small_blocks) -> None:
    spec = _spec("gpt2")
    model = spec.build()
    gm = rewriter.trace(model, spec.example_inputs(), dynamic_shapes="auto")
    keep = torch.tensor([[0, 3, 5, 8, 13, 21, 34, 55, 89, 90, 91, 96]])
    ctx = rewriter.PassContext(calibration=keep)
    out = rewriter.Pipeline.parse("vocab-trim").run(gm, ctx).graph_module
    assert max(small_blocks) > 5
    verify.assert_equivalent(model, out, max_examples=2)
