"""Perplexity and the bigram baseline."""

from __future__ import annotations

import math

import torch

import rewriter
from rewriter.pipeline.metrics import bigram_perplexity, perplexity_of_ids, windows
from rewriter.testing import traced
from rewriter.verify.families import ModelSpec


class Uniform(torch.nn.Module):
    """Predicts every token with equal probability: perplexity equals the vocabulary size."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*ids.shape, self.vocab)


def test_windows_are_non_overlapping_and_skip_single_tokens() -> None:
    chunks = windows(torch.arange(11), 4)
    assert [c.tolist() for c in chunks] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10]]
    assert len(windows(torch.arange(9), 4)) == 2  # the last single token predicts nothing


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size() -> None:
    ids = torch.randint(0, 50, (1000,))
    assert math.isclose(perplexity_of_ids(Uniform(50), ids, 32), 50.0, rel_tol=1e-6)


def test_graph_and_model_agree() -> None:
    spec = ModelSpec("gpt2", layers=1, max_positions=32)
    model, gm = traced(spec)
    ids = torch.randint(0, spec.vocab, (500,))
    assert math.isclose(perplexity_of_ids(model, ids), perplexity_of_ids(gm, ids), rel_tol=1e-5)


def test_bigram_baseline_learns_a_deterministic_chain() -> None:
    chain = torch.arange(2000) % 7  # every token determines the next
    result = bigram_perplexity(chain, chain[:500], 50, vocab=7)
    assert result["perplexity"] < 1.2
    noise = torch.randint(0, 7, (2000,), generator=torch.Generator().manual_seed(0))
    assert bigram_perplexity(noise, noise[:500], 50, vocab=7)["perplexity"] > 5


def test_pipeline_reports_perplexity_per_pass() -> None:
    spec = ModelSpec("gpt2", layers=1, max_positions=32)
    _, gm = traced(spec)
    ids = torch.randint(0, spec.vocab, (300,), generator=torch.Generator().manual_seed(1))
    result = rewriter.Pipeline.parse("canonicalize").run(gm, rewriter.PassContext(evaluation=ids))
    baseline = result.report.baseline["ppl"]
    assert math.isclose(result.report.records[0].metrics["ppl"], baseline, rel_tol=1e-6)
    assert "ppl" in result.report.table()
