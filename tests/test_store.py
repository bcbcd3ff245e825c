"""The weight store: declared float64 edits in row blocks, copy-on-write, ties."""

from __future__ import annotations

import pytest
import torch

import rewriter
from rewriter.ir.graph import copy_graph_module
from rewriter.ir.store import Edit, ModuleStore, weights
from rewriter.verify.families import ModelSpec


def _gpt2(tied: bool = True) -> torch.fx.GraphModule:
    spec = ModelSpec("gpt2", tied=tied, outliers=True)
    return rewriter.trace(spec.build(), spec.example_inputs())


def _center_rows(name: str) -> Edit:
    return Edit(
        name, (name,), lambda b: (r := b.rows(name)) - r.mean(-1, keepdim=True), note="center rows"
    )


def test_edit_is_computed_in_float64_and_cast_once() -> None:
    gm = _gpt2()
    store = weights(gm)
    name = "transformer.wpe.weight"
    original = store.read(name).clone()
    store.apply(_center_rows(name))
    result = store.read(name)
    want = (original.double() - original.double().mean(-1, keepdim=True)).float()
    assert torch.equal(result, want)
    assert result.dtype == torch.float32


def test_blocks_give_bit_identical_results() -> None:
    gm_small, gm_big = _gpt2(), _gpt2()
    small, big = ModuleStore(gm_small), ModuleStore(gm_big)
    small.block_bytes = 8 * 32 * 3  # three rows per block
    name = "transformer.h.0.mlp.c_fc.weight"
    assert len(list(small.blocks(small.shape(name)))) > 5
    for store in (small, big):
        store.apply(_center_rows(name))
        column_mean = Edit(
            "transformer.h.0.mlp.c_fc.bias",
            (name, "transformer.h.0.mlp.c_fc.bias"),
            lambda b: b.whole("transformer.h.0.mlp.c_fc.bias") + b.column_sum(name) / 32,
        )
        store.apply(column_mean)
    assert torch.equal(small.read(name), big.read(name))
    torch.testing.assert_close(
        small.read("transformer.h.0.mlp.c_fc.bias"),
        big.read("transformer.h.0.mlp.c_fc.bias"),
        rtol=0,
        atol=1e-6,
    )


def test_weighted_column_sum() -> None:
    gm = _gpt2()
    store = ModuleStore(gm)
    store.block_bytes = 64
    w, beta = "transformer.h.0.attn.c_attn.weight", "transformer.h.0.ln_1.bias"
    seen = {}

    def compute(block):
        seen["sum"] = block.column_sum(w, weights=beta)
        return block.whole(beta)

    store.apply(Edit(beta, (w, beta), compute))
    want = store.read(beta).double() @ store.read(w).double()
    torch.testing.assert_close(seen["sum"], want, rtol=1e-12, atol=1e-12)


def test_undeclared_reads_and_bad_shapes_are_refused() -> None:
    gm = _gpt2()
    store = weights(gm)
    with pytest.raises(KeyError, match="without declaring"):
        store.apply(Edit("transformer.wpe.weight", (), lambda b: b.rows("transformer.wte.weight")))
    with pytest.raises(ValueError, match="returned rows of shape"):
        store.apply(
            Edit(
                "transformer.wpe.weight",
                ("transformer.wpe.weight",),
                lambda b: b.rows("transformer.wpe.weight")[:, :3],
            )
        )
    with pytest.raises(KeyError, match="unknown tensor"):
        store.apply(
            Edit("transformer.wpe.weight", ("nope.weight",), lambda b: b.rows("nope.weight"))
        )


def test_writes_are_copy_on_write() -> None:
    gm = _gpt2()
    copy = copy_graph_module(gm)
    name = "transformer.h.1.attn.c_proj.weight"
    # the copy shares the original's storage until it writes
    assert weights(copy).read(name).data_ptr() == weights(gm).read(name).data_ptr()
    before = weights(gm).read(name).clone()
    weights(copy).apply(_center_rows(name))
    assert torch.equal(weights(gm).read(name), before)
    assert not torch.equal(weights(copy).read(name), before)


def test_writes_follow_ties_by_name_and_own_makes_private_copies() -> None:
    gm = _gpt2(tied=True)
    store = ModuleStore(gm)
    assert sorted(store.aliases("lm_head.weight")) == ["lm_head.weight", "transformer.wte.weight"]
    store.apply(_center_rows("lm_head.weight"))
    assert gm.lm_head.weight is gm.transformer.wte.weight
    shared = copy_graph_module(gm)
    tensor = store.own("lm_head.weight")
    assert tensor is gm.lm_head.weight and tensor is not shared.lm_head.weight


def test_fresh_names_avoid_collisions() -> None:
    store = ModuleStore(_gpt2())
    assert (
        store.fresh_name("transformer.h.0.attn.c_attn.lora_A")
        == "transformer.h.0.attn.c_attn.lora_A"
    )
    assert (
        store.fresh_name("transformer.h.0.attn.c_attn.weight")
        == "transformer.h.0.attn.c_attn.weight_1"
    )
    assert store.fresh_name("transformer.h.0") == "transformer.h.0_1"
