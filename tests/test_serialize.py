"""Saving and loading graphs (.pt2) and Hugging Face directories."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import rewriter
from rewriter.errors import RewriterError
from rewriter.testing import traced
from rewriter.verify.families import ModelSpec

CANONICALIZE = rewriter.Pipeline.parse("canonicalize")


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert", "tenc"])
def test_save_load_round_trip_keeps_outputs_dims_and_trace_info(family: str, tmp_path) -> None:
    spec = ModelSpec(family, layers=1, max_positions=32)
    _, gm = traced(spec)
    out = CANONICALIZE.run(gm).graph_module
    path = rewriter.save(out, tmp_path / "model.pt2")
    loaded = rewriter.load(path)
    info, original = rewriter.trace_info(loaded), rewriter.trace_info(gm)
    assert info.input_names == original.input_names and info.dynamic_dims == original.dynamic_dims
    assert info.dim_ranges == original.dim_ranges
    assert all(torch.equal(a, b) for a, b in zip(info.example_inputs, original.example_inputs))
    ids = torch.randint(0, spec.vocab, (3, 13))
    assert rewriter.verify.compare(out, loaded, (ids,)).ok
    assert type(loaded(ids)) is type(out(ids))  # Hugging Face output classes come back
    rewriter.verify.assert_equivalent(out, loaded, max_examples=3)


def test_loading_needs_only_import_rewriter(tmp_path) -> None:
    _, gm = traced(ModelSpec("gpt2", layers=1))
    path = rewriter.save(CANONICALIZE.run(gm).graph_module, tmp_path / "model.pt2")
    code = (
        "import torch, rewriter\n"
        f"gm = rewriter.load({str(path)!r})\n"
        "print(type(gm(torch.zeros(2, 5, dtype=torch.long))).__name__)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "CausalLMOutputWithCrossAttentions"


def test_rewriter_ops_survive_save_and_load(tmp_path) -> None:
    class Crms(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.ops.rewriter.crms_norm(x, 1e-5) * 2

    gm = rewriter.trace(Crms(), (torch.randn(2, 3, 5),), dynamic_shapes={"x": {0: "batch"}})
    code = (
        "import torch, rewriter\n"
        f"gm = rewriter.load({str(rewriter.save(gm, tmp_path / 'crms.pt2'))!r})\n"
        "x = torch.randn(4, 3, 5)\n"
        "print(torch.allclose(gm(x), torch.ops.rewriter.crms_norm(x, 1e-5) * 2))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300
    )
    assert done.stdout.strip() == "True", done.stderr[-3000:]


def test_tied_weights_are_stored_once(tmp_path) -> None:
    sizes = {}
    for tied in (True, False):
        spec = ModelSpec("gpt2", layers=1, vocab=4000, tied=tied)
        _, gm = traced(spec)
        path = rewriter.save(gm, tmp_path / f"tied{tied}.pt2")
        sizes[tied] = path.stat().st_size
    embedding_bytes = 4000 * 16 * 4
    assert sizes[False] - sizes[True] > 0.9 * embedding_bytes


def test_save_pretrained_reloads_equal(tmp_path) -> None:
    for family in ("gpt2", "llama"):
        spec = ModelSpec(family, layers=2, tied=True, outliers=True)
        _, gm = traced(spec)
        out = CANONICALIZE.run(gm).graph_module
        report = rewriter.save_pretrained(out, tmp_path / family)
        assert report.ok
        config = json.loads((tmp_path / family / "config.json").read_text())
        assert config["model_type"] == family


def test_save_pretrained_refuses_architecture_changes(tmp_path) -> None:
    _, gm = traced(ModelSpec("gpt2", layers=1))
    out = rewriter.graph.copy_graph_module(gm)
    norm = next(n for n in out.graph.nodes if n.target == torch.ops.aten.layer_norm.default)
    norm.args = (*norm.args[:2], None, None, *norm.args[4:])  # drop the affine: not GPT-2 any more
    out.recompile()
    with pytest.raises(RewriterError, match="changed the model's architecture"):
        rewriter.save_pretrained(out, tmp_path / "changed")
    assert not (tmp_path / "changed").exists()
