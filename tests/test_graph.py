"""Graph utilities: ties, linear-map views, look-through, printing, metadata, copies."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import rewriter
from rewriter.ir.graph import (
    as_linear,
    copy_graph_module,
    format_graph,
    is_transparent,
    linear_maps,
    look_back,
    prune_dead_get_attrs,
    refresh_meta,
    tie_groups,
    transparent_users,
    weight_name_for,
)
from rewriter.rewrite.driver import Rewriter
from rewriter.testing import traced
from rewriter.verify.families import ModelSpec

aten = torch.ops.aten


def test_tied_embedding_and_head_are_one_node_used_twice_plus_a_dead_alias() -> None:
    _, gm = traced(ModelSpec("gpt2", tied=True))
    gm = copy_graph_module(gm)
    groups = tie_groups(gm)
    assert len(groups) == 1
    group = groups[0]
    assert set(group.names) == {"lm_head.weight", "transformer.wte.weight"}
    assert group.uses == 2
    removed = prune_dead_get_attrs(gm)
    assert removed == ["transformer.wte.weight"]
    live = [n for n in gm.graph.find_nodes(op="get_attr") if n.target == "lm_head.weight"]
    assert len(live) == 1 and len(live[0].users) == 2


def test_untie_gives_one_use_its_own_copy() -> None:
    model, gm = traced(ModelSpec("gpt2", tied=True))
    gm = copy_graph_module(gm)
    prune_dead_get_attrs(gm)
    shared = next(n for n in gm.graph.find_nodes(op="get_attr") if n.target == "lm_head.weight")
    embedding = next(u for u in shared.users if u.target == aten.embedding.default)
    rw = Rewriter(gm, pass_name="test")
    new = rw.untie(shared, [embedding], name_hint="transformer.wte.weight")
    rw.finish()
    assert new.target == "transformer.wte.weight"
    assert gm.transformer.wte.weight is not gm.lm_head.weight
    assert torch.equal(gm.transformer.wte.weight, gm.lm_head.weight)
    assert tie_groups(gm) == []
    (ids,) = ModelSpec("gpt2").example_inputs()
    assert torch.equal(gm(ids).logits, model(ids, use_cache=False).logits)


@pytest.mark.parametrize(
    ("family", "layout", "count"),
    [("gpt2", "in_out", 4 * 2 + 1), ("opt", "out_in", 6 * 2 + 1), ("llama", "out_in", 7 * 2 + 1)],
)
def test_linear_maps_cover_every_form(family: str, layout: str, count: int) -> None:
    _, gm = traced(ModelSpec(family, tied=False))
    maps = linear_maps(gm)
    assert len(maps) == count
    body = [m for m in maps if "head" not in m.module]
    assert all(m.layout == layout for m in body)
    for lin in maps:
        weight = gm.get_parameter(lin.weight_name)
        assert weight.shape[lin.out_dim] == lin.out_features
        assert weight.shape[lin.in_dim] == lin.in_features


def test_linear_map_view_computes_the_node_value() -> None:
    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(6, 4))
            self.b = nn.Parameter(torch.randn(4))
            self.proj = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.proj(x @ self.w + self.b)

    model = Functional()
    x = torch.randn(5, 6)
    gm = rewriter.trace(model, (x,))
    maps = linear_maps(gm)
    assert [m.layout for m in maps] == ["in_out", "out_in"]
    first = maps[0]
    assert first.output.target == aten.add.Tensor and first.bias_name == "b"
    assert (first.in_features, first.out_features) == (6, 4)
    weight = gm.get_parameter(first.weight_name)
    w_out_in = weight.t() if first.layout == "in_out" else weight
    torch.testing.assert_close(
        x @ w_out_in.t() + gm.get_parameter(first.bias_name), x @ model.w + model.b
    )


def test_non_linear_matmuls_are_not_linear_maps() -> None:
    class Bilinear(nn.Module):
        def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return a @ b

    gm = rewriter.trace(Bilinear(), (torch.randn(3, 4), torch.randn(4, 5)))
    assert linear_maps(gm) == []
    assert all(as_linear(n) is None for n in gm.graph.nodes)


def test_look_through_stream_transparent_ops() -> None:
    _, gm = traced(ModelSpec("gpt2"))
    dropouts = [n for n in gm.graph.nodes if n.target == aten.dropout.default]
    assert dropouts and all(is_transparent(n) for n in dropouts)
    norm = next(n for n in gm.graph.nodes if n.target == aten.layer_norm.default)
    source = look_back(norm.args[0])
    assert source.target == aten.add.Tensor  # token + position embeddings, through dropout
    readers = list(transparent_users(source))
    assert norm in readers and not any(is_transparent(r) for r in readers)
    views = [
        n
        for n in gm.graph.nodes
        if n.target == aten.view.default and n.args[0].target == aten.addmm.default
    ]
    assert views and all(is_transparent(v) for v in views)  # (B*T, d) -> (B, T, d) keeps d
    splits = [n for n in gm.graph.nodes if n.target == aten.view.default and len(n.args[1]) == 4]
    assert splits and not any(is_transparent(v) for v in splits)  # head split changes the last dim


def test_new_weights_are_named_by_the_module_that_uses_them() -> None:
    _, gm = traced(ModelSpec("gpt2"))
    gm = copy_graph_module(gm)
    lin = linear_maps(gm)[0]
    rw = Rewriter(gm, pass_name="test")
    node = rw.add_weight(weight_name_for(lin.node, "lora_A"), torch.zeros(2, 16), trainable=True)
    assert node.target == "transformer.h.0.attn.c_attn.lora_A"
    assert gm.get_parameter(node.target).requires_grad
    again = rw.add_weight(weight_name_for(lin.node, "lora_A"), torch.zeros(2, 16))
    assert again.target == "transformer.h.0.attn.c_attn.lora_A_1"


def test_printer_is_stable_across_traces() -> None:
    spec = ModelSpec("llama", layers=1)
    first = format_graph(rewriter.trace(spec.build(), spec.example_inputs(), dynamic_shapes="auto"))
    second = format_graph(
        rewriter.trace(spec.build(), spec.example_inputs(), dynamic_shapes="auto")
    )
    assert first == second
    assert "%input_ids: i64[d0, d1] = input" in first
    assert "s4" not in first and "s7" not in first


def test_refresh_meta_recomputes_fake_values() -> None:
    _, gm = traced(ModelSpec("gpt2"))
    gm = copy_graph_module(gm)
    norm = next(n for n in gm.graph.nodes if n.target == aten.layer_norm.default)
    del norm.meta["val"]
    refresh_meta(gm)
    assert tuple(norm.meta["val"].shape)[-1] == 16


def test_copies_share_weights_but_not_graphs() -> None:
    _, gm = traced(ModelSpec("gpt2"))
    copy = copy_graph_module(gm)
    assert copy.graph is not gm.graph
    assert copy.transformer.wpe.weight is gm.transformer.wpe.weight
    assert copy.meta["rewriter.trace"] is gm.meta["rewriter.trace"]
    node = next(n for n in copy.graph.nodes if n.target == aten.layer_norm.default)
    node.args = (node.args[0], node.args[1], None, None, 1e-5)
    copy.recompile()
    assert "None, None" not in gm.code.split("layer_norm")[1][:200]
