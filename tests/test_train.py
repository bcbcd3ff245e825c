"""rewriter.train: fitting parameters of a traced graph."""

from __future__ import annotations

import pytest
import torch

import rewriter
from rewriter.errors import RewriterError
from rewriter.ir.graph import copy_graph_module
from rewriter.testing import graph_fingerprint, traced
from rewriter.verify.families import ModelSpec


def _batches(spec: ModelSpec, count: int = 4) -> list[torch.Tensor]:
    # A learnable pattern: each sequence counts upward modulo the vocabulary.
    starts = torch.arange(count * 2).view(count, 2, 1)
    return list((starts + torch.arange(12)) % spec.vocab)


def test_training_reduces_the_loss_and_leaves_shared_graphs_alone() -> None:
    spec = ModelSpec("gpt2", layers=1)
    _, gm = traced(spec)
    original = graph_fingerprint(gm)
    work = copy_graph_module(gm)  # shares weights with gm, as pipeline copies do
    report = rewriter.train(
        work, _batches(spec), steps=40, lr=1e-2, params=r"transformer\..*", seed=0
    )
    assert report.last < 0.7 * report.first
    assert all(name.startswith("transformer.") for name in report.params)
    assert graph_fingerprint(gm) == original
    assert not any(p.requires_grad for p in work.parameters())


def test_training_is_deterministic() -> None:
    spec = ModelSpec("llama", layers=1)
    _, gm = traced(spec)
    runs = [
        rewriter.train(
            copy_graph_module(gm), _batches(spec), steps=5, params=["lm_head.weight"], seed=3
        ).losses
        for _ in range(2)
    ]
    assert runs[0] == runs[1]


def test_mse_loss_and_trainable_flags() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    x = torch.randn(16, 4)
    gm = rewriter.trace(model, (x,))
    target = torch.randn(16, 2)
    gm.get_parameter("2.bias").requires_grad_(True)
    report = rewriter.train(gm, [(x, target)], steps=40, lr=5e-2, loss="mse", params=None)
    assert report.params == ["2.bias"] and report.last < report.first
    assert gm.get_parameter("2.bias").requires_grad  # flags come back as they were


def test_bad_selections_are_explained() -> None:
    spec = ModelSpec("gpt2", layers=1)
    _, gm = traced(spec)
    with pytest.raises(RewriterError, match="no trainable parameters"):
        rewriter.train(copy_graph_module(gm), _batches(spec), steps=1)
    with pytest.raises(RewriterError, match="selects no parameter"):
        rewriter.train(copy_graph_module(gm), _batches(spec), steps=1, params="nothing.*")
    with pytest.raises(RewriterError, match="no parameters named"):
        rewriter.train(copy_graph_module(gm), _batches(spec), steps=1, params=["nope"])
    with pytest.raises(ValueError, match="loss must be"):
        rewriter.train(
            copy_graph_module(gm), _batches(spec), steps=1, params=["lm_head.weight"], loss="l1"
        )
