"""PassContext: data in every accepted form becomes token batches; missing data is explained."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from rewriter import PassContext
from rewriter.errors import RewriterError


def _tokenizer() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["[UNK]"], show_progress=False)
    tokenizer.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20, trainer)
    return tokenizer


def test_text_is_tokenized_and_cut_into_batches() -> None:
    text = "the quick brown fox jumps over the lazy dog. " * 40
    ctx = PassContext(calibration=text, tokenizer=_tokenizer())
    batches = ctx.batches(seq_len=16, batch_size=4)
    assert all(b.shape[1] == 16 and b.dtype == torch.long for b in batches)
    assert batches[0].shape[0] == 4
    assert len(ctx.batches(seq_len=16, batch_size=4, limit=2)) == 2
    listed = PassContext(calibration=[text[:200], text[200:]], tokenizer=_tokenizer())
    assert listed.batches(seq_len=8)


def test_token_batches_pass_through() -> None:
    ids = torch.randint(0, 10, (10, 5))
    ctx = PassContext(evaluation=ids, batch_size=4)
    assert [b.shape[0] for b in ctx.batches("evaluation")] == [4, 4, 2]
    assert PassContext(calibration=[ids[:2], ids[2:]]).batches()[1].shape == (8, 5)


def test_missing_data_names_the_field_and_pass() -> None:
    with pytest.raises(RewriterError, match=r"pass 'ln-freeze' needs calibration data.*--calib"):
        PassContext().batches(pass_name="ln-freeze")
    with pytest.raises(RewriterError, match="needs a tokenizer"):
        PassContext(calibration="some text").batches()
    with pytest.raises(RewriterError, match="too short"):
        PassContext(calibration="the fox", tokenizer=_tokenizer()).batches(seq_len=64)


def test_generators_are_seeded_from_the_context() -> None:
    a = torch.rand(3, generator=PassContext(seed=5).generator())
    b = torch.rand(3, generator=PassContext(seed=5).generator())
    assert torch.equal(a, b)
    assert not torch.equal(a, torch.rand(3, generator=PassContext(seed=5).generator(offset=1)))
