"""Tests of rewriter.tokenizer_trim: closure, rebuild and id remapping on small trained tokenizers.

Each tokenizer kind (byte-level BPE like GPT-2, char BPE with subword prefix and word suffix,
WordPiece like BERT, Unigram like T5, Unigram with byte fallback like Llama 2) is trained once on
standard-library docstrings plus seeded multilingual lines, then trimmed to the ids of a third of
those lines; the trimmed tokenizer must encode those lines to exactly the old ids mapped.
"""

from __future__ import annotations

import inspect
import json
import random
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import (
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

from rewriter import zoo
from rewriter.errors import RewriterError
from rewriter.io.tokenizer_trim import (
    TokenizerTrimError,
    backend,
    close,
    encodes_identically,
    model_type,
    rebuild,
    remap_config_ids,
    required_ids,
    special_ids,
)

WORDS = (
    "graph node rewrite pattern tensor layer norm attention head embedding vocabulary token "
    "naïve café über straße façade Zürich 東京 数据 模型 привет мир γράφος λόγος 🙂 ok"
).split()


def _corpus() -> list[str]:
    """Docstring lines of a few stdlib modules, then seeded lines mixing scripts and emoji."""
    import collections
    import functools
    import itertools
    import os
    import re
    import string

    lines: list[str] = []
    for module in (collections, functools, itertools, os, re, string):
        for _name, member in sorted(vars(module).items()):
            doc = inspect.getdoc(member) if callable(member) else None
            lines.extend(line.strip() for line in (doc or "").splitlines() if line.strip())
    rng = random.Random(0)
    lines.extend(" ".join(rng.choices(WORDS, k=rng.randint(3, 12))) for _ in range(150))
    return list(dict.fromkeys(lines))[:900]


CORPUS = _corpus()
TRIM = CORPUS[::3]  # the trimming corpus
OUTSIDE = [line for line in CORPUS if line not in set(TRIM)][:200]


def _byte_bpe() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=900,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    eot = tok.token_to_id("<|endoftext|>")
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single="$A <|endoftext|>",
                pair="$A <|endoftext|> $B:1 <|endoftext|>:1",
                special_tokens=[("<|endoftext|>", eot)],
            ),
        ]
    )
    return tok


def _char_bpe() -> Tokenizer:
    tok = Tokenizer(
        models.BPE(unk_token="<unk>", continuing_subword_prefix="##", end_of_word_suffix="</w>")
    )
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(
        vocab_size=900,
        special_tokens=["<unk>"],
        continuing_subword_prefix="##",
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    tok.add_special_tokens(["<s>", "</s>"])  # ids after the model vocabulary
    tok.post_processor = processors.BertProcessing(
        ("</s>", tok.token_to_id("</s>")), ("<s>", tok.token_to_id("<s>"))
    )
    return tok


def _wordpiece() -> Tokenizer:
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(
        vocab_size=900, special_tokens=["[PAD]", "[UNK]"], show_progress=False
    )
    tok.train_from_iterator(CORPUS, trainer)
    tok.add_special_tokens(["[CLS]", "[SEP]", "[MASK]"])  # ids after the model vocabulary
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    tok.enable_padding(pad_id=tok.token_to_id("[PAD]"), pad_token="[PAD]")
    return tok


def _unigram() -> Tokenizer:
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=700,
        special_tokens=["<pad>", "</s>", "<unk>"],
        unk_token="<unk>",
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B:1 </s>:1", special_tokens=[("</s>", 1)]
    )
    return tok


def _unigram_byte_fallback() -> Tokenizer:
    """The Unigram tokenizer with 256 ``<0xNN>`` pieces and byte fallback, like Llama 2."""
    spec = json.loads(_unigram().to_str())
    model = spec["model"]
    model["vocab"][3:3] = [[f"<0x{b:02X}>", 0.0] for b in range(256)]
    model["byte_fallback"] = True
    spec["decoder"] = {
        "type": "Sequence",
        "decoders": [{"type": "ByteFallback"}, json.loads(decoders.Metaspace().__getstate__())],
    }
    return Tokenizer.from_str(json.dumps(spec))


BUILDERS: dict[str, Callable[[], Tokenizer]] = {
    "byte_bpe": _byte_bpe,
    "char_bpe": _char_bpe,
    "wordpiece": _wordpiece,
    "unigram": _unigram,
    "unigram_bytes": _unigram_byte_fallback,
}


@pytest.fixture(scope="module")
def trained() -> dict[str, Tokenizer]:
    return {name: build() for name, build in BUILDERS.items()}


def _used(tok: Any, texts: Sequence[str], specials: bool = False) -> set[int]:
    encodings = backend(tok).encode_batch(list(texts), add_special_tokens=specials)
    return {i for encoding in encodings for i in encoding.ids}


def _trim(tok: Any, texts: Sequence[str]) -> tuple[Any, list[int]]:
    kept = sorted(close(tok, _used(tok, texts)))
    return rebuild(tok, kept), kept


def _mapped(kept: Sequence[int], ids: Sequence[int]) -> list[int]:
    old_to_new = {old: new for new, old in enumerate(kept)}
    return [old_to_new[i] for i in ids]


# ----------------------------------------------------------------------------------------------
# Each tokenizer kind


@pytest.mark.parametrize("name", list(BUILDERS))
def test_trim_keeps_encoding_of_trim_corpus(trained: dict[str, Tokenizer], name: str) -> None:
    tok = trained[name]
    before = tok.to_str()
    new, kept = _trim(tok, TRIM)
    assert tok.to_str() == before, "input tokenizer changed"
    assert model_type(new) == model_type(tok)
    assert len(kept) < tok.get_vocab_size(), "nothing was trimmed"
    assert new.get_vocab_size(with_added_tokens=True) == len(kept)
    assert sorted(new.get_vocab(with_added_tokens=True).values()) == list(range(len(kept)))
    assert encodes_identically(tok, new, kept, TRIM) == 1.0
    for specials in (False, True):
        for old, fresh in zip(
            tok.encode_batch(TRIM, add_special_tokens=specials),
            new.encode_batch(TRIM, add_special_tokens=specials),
        ):
            assert fresh.ids == _mapped(kept, old.ids)
            assert fresh.tokens == old.tokens
    pair_old = tok.encode(TRIM[0], TRIM[1])
    assert new.encode(TRIM[0], TRIM[1]).ids == _mapped(kept, pair_old.ids)
    olds = [e.ids for e in tok.encode_batch(TRIM[:50])]
    assert new.decode_batch([_mapped(kept, ids) for ids in olds]) == tok.decode_batch(olds)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_specials_and_coverage_are_kept(trained: dict[str, Tokenizer], name: str) -> None:
    tok = trained[name]
    specials = special_ids(tok)
    added = {token.content for token in tok.get_added_tokens_decoder().values()}
    assert {tok.id_to_token(i) for i in specials} >= added
    kept = close(tok, [])
    assert required_ids(tok) <= kept
    new = rebuild(tok, sorted(kept))
    assert set(new.get_vocab(with_added_tokens=True)) >= added


def test_required_ids_per_kind(trained: dict[str, Tokenizer]) -> None:
    byte_bpe = trained["byte_bpe"]
    alphabet = {byte_bpe.token_to_id(c) for c in pre_tokenizers.ByteLevel.alphabet()}
    assert alphabet <= required_ids(byte_bpe) and None not in alphabet
    wordpiece = trained["wordpiece"]
    chars = {i for t, i in wordpiece.get_vocab().items() if len(t.removeprefix("##")) == 1}
    assert {wordpiece.token_to_id("a"), wordpiece.token_to_id("##a")} <= chars
    assert chars <= required_ids(wordpiece)
    byte_pieces = {trained["unigram_bytes"].token_to_id(f"<0x{b:02X}>") for b in range(256)}
    assert byte_pieces <= required_ids(trained["unigram_bytes"])
    pieces = json.loads(trained["unigram"].to_str())["model"]["vocab"]
    lowest = min(range(len(pieces)), key=lambda i: pieces[i][1])
    assert {2, lowest} <= required_ids(trained["unigram"])  # unk and the lowest score


def test_unigram_keeps_the_lowest_score_so_unk_does_not_win() -> None:
    # unk scores (lowest piece score - 10), recomputed on load. Dropping "a" (-40) would lift
    # it to -22, and "abc" would become [unk, "bc"] (-22.5) instead of ["ab", "c"] (-24).
    pieces = [("<unk>", 0.0), ("ab", -12.0), ("c", -12.0), ("bc", -0.5), ("a", -40.0), ("b", -13.0)]
    tok = Tokenizer(models.Unigram(pieces, unk_id=0))
    texts = ["abc", "bc"]
    assert [tok.encode(t).tokens for t in texts] == [["ab", "c"], ["bc"]]
    naive = [0, *sorted(_used(tok, texts))]
    assert encodes_identically(tok, rebuild(tok, naive), naive, texts) == 0.5
    kept = sorted(close(tok, _used(tok, texts)))
    assert kept == [0, 1, 2, 3, 4]
    assert encodes_identically(tok, rebuild(tok, kept), kept, texts) == 1.0


@pytest.mark.parametrize("name", list(BUILDERS))
def test_texts_outside_the_corpus_still_encode(trained: dict[str, Tokenizer], name: str) -> None:
    tok = trained[name]
    new, kept = _trim(tok, TRIM)
    unk = tok.model.unk_token if name != "byte_bpe" and "unigram" not in name else None
    for text in [*OUTSIDE, "never seen: Ωmega ∑ 𝔘nicode ☃"]:
        ids = new.encode(text, add_special_tokens=False).ids
        assert all(0 <= i < len(kept) for i in ids)
        if name in ("byte_bpe", "unigram_bytes"):
            assert new.decode(ids).strip() == text.strip()  # no unk: bytes cover everything
        if unk is not None:  # whole characters are kept: no new unknown words
            old_unk = tok.encode(text).tokens.count(unk)
            assert new.encode(text).tokens.count(unk) == old_unk
    if name == "byte_bpe":
        assert all(new.decode(new.encode(t).ids) == t for t in OUTSIDE)


@given(data=st.data())
@settings(max_examples=25, deadline=None)
def test_property_random_trim_corpora(trained: dict[str, Tokenizer], data: st.DataObject) -> None:
    name = data.draw(st.sampled_from(list(BUILDERS)), label="tokenizer")
    tok = trained[name]
    lines = data.draw(st.lists(st.sampled_from(CORPUS), min_size=1, max_size=40), label="lines")
    extra = data.draw(st.sets(st.integers(0, tok.get_vocab_size() - 1), max_size=60), label="ids")
    kept = sorted(close(tok, _used(tok, lines) | extra))
    new = rebuild(tok, kept)
    assert encodes_identically(tok, new, kept, lines) == 1.0
    old = tok.encode_batch(lines)
    assert [e.ids for e in new.encode_batch(lines)] == [_mapped(kept, e.ids) for e in old]


# ----------------------------------------------------------------------------------------------
# Hugging Face tokenizers


def test_embedded_model_tokenizer(tmp_path: Any) -> None:
    tok = zoo.tokenizer()
    before = tok.backend_tokenizer.to_str()
    lines = [line for line in zoo.calibration_text().splitlines() if line.strip()]
    part, rest = lines[::4], lines[1::4][:300]
    new, kept = _trim(tok, part)
    assert tok.backend_tokenizer.to_str() == before
    assert isinstance(new, transformers.PreTrainedTokenizerFast)
    assert len(new) == len(kept) < len(tok)
    assert (new.bos_token, new.eos_token, new.unk_token) == (
        tok.bos_token,
        tok.eos_token,
        tok.unk_token,
    )
    assert new.eos_token_id == _mapped(kept, [tok.eos_token_id])[0]
    assert new.model_max_length == tok.model_max_length
    assert encodes_identically(tok, new, kept, part) == 1.0
    for text in part[:100]:
        assert new(text)["input_ids"] == _mapped(kept, tok(text)["input_ids"])
    assert all(new.decode(new(text)["input_ids"]) == text for text in rest)
    new.save_pretrained(tmp_path)
    reloaded = transformers.AutoTokenizer.from_pretrained(tmp_path)
    from_file = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(tmp_path / "tokenizer.json")
    )
    assert reloaded.eos_token == tok.eos_token and len(reloaded) == len(kept)
    for other in (reloaded, from_file):
        assert [other(t)["input_ids"] for t in part[:50]] == [
            new(t)["input_ids"] for t in part[:50]
        ]


def test_hf_wrapper_keeps_special_token_attributes(trained: dict[str, Tokenizer]) -> None:
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=trained["wordpiece"],
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        extra_special_tokens=["<extra>"],
        model_max_length=77,
        padding_side="left",
    )
    assert "<extra>" in tok.all_special_tokens
    new, kept = _trim(tok, TRIM)
    assert isinstance(new, type(tok))
    assert new.special_tokens_map == tok.special_tokens_map
    assert new.all_special_tokens == tok.all_special_tokens
    assert new.all_special_ids == _mapped(kept, tok.all_special_ids)
    assert (new.model_max_length, new.padding_side) == (77, "left")
    batch = TRIM[:8]
    old = tok(batch, padding=True)["input_ids"]
    assert new(batch, padding=True)["input_ids"] == [_mapped(kept, ids) for ids in old]


# ----------------------------------------------------------------------------------------------
# Errors


def test_ids_out_of_range(trained: dict[str, Tokenizer]) -> None:
    tok = trained["byte_bpe"]
    before = tok.to_str()
    size = tok.get_vocab_size()
    with pytest.raises(TokenizerTrimError, match=rf"{size}, {size + 5}") as info:
        close(tok, [1, -3, size, size + 5])
    assert "-3" in str(info.value)
    with pytest.raises(TokenizerTrimError, match="name no token"):
        rebuild(tok, [0, 1, size])
    with pytest.raises(TokenizerTrimError, match="sorted and unique"):
        rebuild(tok, [3, 1, 2])
    assert tok.to_str() == before
    assert issubclass(TokenizerTrimError, RewriterError)


@pytest.mark.parametrize("name", ["byte_bpe", "char_bpe"])
def test_rebuild_refuses_a_set_not_closed_under_merges(
    trained: dict[str, Tokenizer], name: str
) -> None:
    tok = trained[name]
    before = tok.to_str()
    kept = close(tok, _used(tok, TRIM))
    merges = json.loads(before)["model"]["merges"]
    vocab = tok.get_vocab()
    strip = 2 if name == "char_bpe" else 0
    a = next(
        a
        for a, b in reversed(merges)
        if vocab[a + b[strip:]] in kept and len(a) > 1 and vocab[a] not in required_ids(tok)
    )
    with pytest.raises(TokenizerTrimError, match=rf"not closed.*{a!r}"):
        rebuild(tok, sorted(kept - {vocab[a]}))
    assert tok.to_str() == before


def test_refuses_what_is_not_a_fast_tokenizer() -> None:
    class SlowTokenizer:
        """Stands in for a Python-only tokenizer (no backend_tokenizer)."""

    for thing in (SlowTokenizer(), "gpt2", None):
        with pytest.raises(TokenizerTrimError, match="needs a fast tokenizer") as info:
            close(thing, [0])
        assert type(thing).__qualname__ in str(info.value)


def test_word_level_is_supported() -> None:
    words = sorted({word for line in TRIM for word in line.split()})
    vocab = {"[UNK]": 0, **{word: i + 1 for i, word in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    texts = TRIM[::5]
    new, kept = _trim(tok, texts)
    assert len(kept) < len(vocab)
    assert encodes_identically(tok, new, kept, texts) == 1.0


def test_encodes_identically_counts_changed_texts(trained: dict[str, Tokenizer]) -> None:
    tok = trained["byte_bpe"]
    new, kept = _trim(tok, TRIM[:5])
    fraction = encodes_identically(tok, new, kept, TRIM[:5] + OUTSIDE[:5])
    assert 0.5 <= fraction < 1.0  # outside lines need removed merges
    with pytest.raises(TokenizerTrimError, match="at least one text"):
        encodes_identically(tok, new, kept, [])


# ----------------------------------------------------------------------------------------------
# Configs


def test_remap_config_ids() -> None:
    kept = [0, 5, 7, 50, 99]
    config = {
        "vocab_size": 100,
        "bos_token_id": 5,
        "eos_token_id": [7, 99],
        "pad_token_id": None,
        "decoder_start_token_id": 0,
        "suppress_tokens": [3, 50],
        "text_config": {"vocab_size": 100, "eos_token_id": 99},
        "hidden_size": 64,
    }
    out = remap_config_ids(config, kept)
    assert out == {
        "vocab_size": 5,
        "bos_token_id": 1,
        "eos_token_id": [2, 4],
        "pad_token_id": None,
        "decoder_start_token_id": 0,
        "suppress_tokens": [3],
        "text_config": {"vocab_size": 5, "eos_token_id": 4},
        "hidden_size": 64,
    }
    assert config["eos_token_id"] == [7, 99], "input config changed"
    with pytest.raises(TokenizerTrimError, match=r"'pad_token_id' holds token id 8"):
        remap_config_ids({"pad_token_id": 8}, kept)
    with pytest.raises(TokenizerTrimError, match=r"'eos_token_id' holds token id 6"):
        remap_config_ids({"eos_token_id": [5, 6]}, kept)
