"""The embedded trained model: loads offline, is small, and clearly beats a bigram model."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

import rewriter
from rewriter import zoo
from rewriter.pipeline.metrics import perplexity

pytestmark = pytest.mark.skipif(
    not (zoo.DATA / "model.safetensors").exists(), reason="the embedded model has not been built"
)


def test_model_and_tokenizer_load_offline() -> None:
    model, tokenizer = zoo.tiny_gpt2()
    assert type(model).__name__ == "GPT2LMHeadModel" and not model.training
    assert model.lm_head.weight is model.transformer.wte.weight
    assert (
        model.config.n_layer == 4 and model.config.n_embd == 192 and model.config.vocab_size == 4096
    )
    text = "Return the number of items in a container."
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == text and max(ids) < 4096
    assert (zoo.DATA / "model.safetensors").stat().st_size <= 10 * 2**20


def test_held_out_perplexity_matches_the_record_and_beats_bigram() -> None:
    model, tokenizer = zoo.tiny_gpt2()
    measured = perplexity(model, tokenizer, zoo.eval_text())
    recorded = zoo.metrics()
    assert measured == pytest.approx(recorded["held_out_perplexity"], rel=1e-4)
    assert measured < 0.6 * recorded["bigram_held_out_perplexity"]


def test_traced_graph_scores_like_the_model() -> None:
    model, tokenizer = zoo.tiny_gpt2()
    ids = tokenizer(zoo.eval_text()[:4000], return_tensors="pt")["input_ids"][:, :64]
    gm = rewriter.trace(model, (ids.view(2, 32),), dynamic_shapes="auto")
    text = zoo.eval_text()[:20000]
    assert perplexity(gm, tokenizer, text) == pytest.approx(
        perplexity(model, tokenizer, text), rel=1e-5
    )


def test_snapshot_is_shipped_with_its_hashes_and_held_out_documents_are_unseen() -> None:
    from rewriter.zoo.build import EOT, read_train_text

    train = read_train_text()  # verifies the SHA-256 recorded in corpus.json
    info = json.loads((zoo.DATA / "corpus.json").read_text())
    assert hashlib.sha256(zoo.eval_text().encode()).hexdigest() == info["sha256"]["eval"]
    documents = set(train.split(f"\n{EOT}\n"))
    held_out = zoo.eval_text().split(f"\n{EOT}\n")
    assert held_out and not any(doc in documents for doc in held_out)
    calibration = zoo.calibration_text().split(f"\n{EOT}\n")
    assert all(doc in documents for doc in calibration)


def test_half_precision_loading() -> None:
    model, _ = zoo.tiny_gpt2(dtype=torch.float16)
    assert model.transformer.wte.weight.dtype == torch.float16
