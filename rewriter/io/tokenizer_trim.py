"""Vocabulary trimming, tokenizer side: close a keep-set of token ids and rebuild the tokenizer.

Trimming a vocabulary (Ushio et al. 2023, "An Efficient Multilingual Language Model Compression
through Vocabulary Trimming") keeps the rows of the embedding and LM head for the tokens a corpus
uses and drops the rest. The model side is a gather with ``new_ids = sorted(keep)``; this module
does the tokenizer side, on the ``tokenizer.json`` form of a Hugging Face ``tokenizers`` tokenizer:

* ``close(tokenizer, ids)`` grows a keep-set until the trimmed tokenizer encodes every text the
  ids came from exactly as before: special and added tokens, the tokens that give coverage of any
  text (the byte alphabet, byte-fallback pieces, WordPiece characters), and for BPE every token on
  a merge path to a kept token (the model refuses a merge whose parts are missing, and a token
  whose merge is gone can no longer be produced).
* ``rebuild(tokenizer, kept)`` writes the trimmed tokenizer: old id ``kept[i]`` becomes new id
  ``i`` in the model vocabulary, the BPE merges, the added tokens, the post-processor and the
  padding settings, so the model's gathered rows line up with the new ids.
* ``remap_config_ids`` moves the special-token ids of a model or generation config the same way;
  ``encodes_identically`` measures how much of a text sample keeps its encoding.

What each tokenizer model (BPE, WordPiece, Unigram, WordLevel) needs, reading ``tokenizer.json``
and rebuilding its model part, is :mod:`rewriter.io.tokenizer_models`; this module is the driver.

Example::

    >>> texts = corpus_lines[:1000]
    >>> used = {i for enc in backend(tok).encode_batch(texts) for i in enc.ids}
    >>> kept = sorted(close(tok, used))
    >>> small = rebuild(tok, kept)
    >>> encodes_identically(tok, small, kept, texts)
    1.0
"""

from __future__ import annotations

import copy
import itertools
import json
import operator
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from rewriter.io.tokenizer_models import (
    SUPPORTED_MODELS,
    TokenizerTrimError,
    Vocab,
    backend,
    coverage_tokens,
    merge_closure,
    model_type,
    model_unk_id,
    read_vocab,
    rebuild_model,
    remapper,
    require_supported,
)

__all__ = [
    "SUPPORTED_MODELS",
    "TokenizerTrimError",
    "backend",
    "close",
    "encodes_identically",
    "model_type",
    "rebuild",
    "remap_config_ids",
    "required_ids",
    "special_ids",
    "unk_id",
]

# Config fields that hold one token id (or, for eos, possibly a list of them).
CONFIG_ID_FIELDS = (
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "decoder_start_token_id",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "sep_token_id",
    "cls_token_id",
    "mask_token_id",
    "unk_token_id",
)
# Generation-config lists of ids that only forbid tokens: a removed token is already impossible.
CONFIG_SUPPRESS_FIELDS = ("suppress_tokens", "begin_suppress_tokens")

# Keyword arguments of a Hugging Face tokenizer that describe the old files or old ids.
_STALE_INIT_KWARGS = frozenset(
    {
        "added_tokens_decoder",
        "merges",
        "merges_file",
        "name_or_path",
        "tokenizer_file",
        "tokenizer_object",
        "vocab",
        "vocab_file",
    }
)
_HF_SPECIAL_ATTRIBUTES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
_HF_SETTINGS = ("model_max_length", "padding_side", "truncation_side", "model_input_names")


# ----------------------------------------------------------------------------------------------
# Ids that must stay


def special_ids(tokenizer: Any) -> set[int]:
    """Ids of added/special tokens, post-processor tokens, padding, the unk token, HF specials."""
    return _special_ids(read_vocab(tokenizer), tokenizer)


def _special_ids(vocab: Vocab, tokenizer: Any) -> set[int]:
    spec = vocab.spec
    ids = {entry["id"] for entry in spec.get("added_tokens") or ()}
    ids.update(_post_processor_ids(spec.get("post_processor")))
    if spec.get("padding"):
        ids.add(spec["padding"]["pad_id"])
    unk = model_unk_id(vocab)
    if unk is not None:
        ids.add(unk)
    if not isinstance(tokenizer, Tokenizer):
        ids.update(i for i in getattr(tokenizer, "all_special_ids", ()) if isinstance(i, int))
    return {i for i in ids if 0 <= i < vocab.size and vocab.tokens[i] is not None}


def unk_id(tokenizer: Any) -> int | None:
    """The unknown token's id: a Hugging Face tokenizer's ``unk_token_id``, else the tokenizer
    model's own (WordPiece / BPE ``unk_token``, Unigram ``unk_id``); None when it has none."""
    hf = getattr(tokenizer, "unk_token_id", None)
    if isinstance(hf, int):
        return hf
    return model_unk_id(read_vocab(tokenizer))


def _post_processor_ids(processor: dict[str, Any] | None) -> list[int]:
    found: list[int] = []

    def record(token_id: int, _where: str) -> int:
        found.append(token_id)
        return token_id

    _map_post_processor(processor, record)
    return found


def required_ids(tokenizer: Any) -> set[int]:
    """Ids that keep the trimmed tokenizer able to encode any text, plus ``special_ids``."""
    vocab = read_vocab(tokenizer)
    return _required_ids(vocab, tokenizer)


def _required_ids(vocab: Vocab, tokenizer: Any) -> set[int]:
    ids = _special_ids(vocab, tokenizer)
    ids.update(vocab.model_ids[t] for t in coverage_tokens(vocab) if t in vocab.model_ids)
    return ids


# ----------------------------------------------------------------------------------------------
# Closure


def close(tokenizer: Any, ids: Iterable[int]) -> set[int]:
    """``ids`` plus ``required_ids`` plus, for BPE, every token on a merge path to a kept one.

    Why this keeps the encoding of every text whose old encoding uses only kept ids:

    * BPE applies, at each step, the lowest-ranked merge among adjacent pairs. The trimmed model
      keeps every merge that produces a kept token (its parts are kept, recursively), ranks in
      the same order, so the merge the original applied is still there and no new merge appears:
      every step picks the same pair. All merges producing a token are kept, not just one,
      because which one fires depends on the surrounding word.
    * WordPiece is greedy longest-match: at each position the original's longest piece is still
      in the smaller vocabulary and nothing longer can be, so the same piece is picked; a word
      that failed to match (became unk) fails at the same position.
    * Unigram picks the Viterbi path; the smaller lattice still holds the original best path with
      the same score and only loses alternatives. The lowest-scoring piece is kept so the unk
      score, derived from it, does not rise.
    * WordLevel looks whole words up: kept words keep their ids.
    """
    vocab = read_vocab(tokenizer)
    require_supported(vocab)
    kept = _checked_ids(vocab, ids)
    kept |= _required_ids(vocab, tokenizer)
    if vocab.kind == "BPE":
        kept = merge_closure(vocab, kept)
    return kept


def _checked_ids(vocab: Vocab, ids: Iterable[int]) -> set[int]:
    """``ids`` as a set of ints, each naming a token of ``vocab``."""
    try:
        kept = {operator.index(i) for i in ids}
    except TypeError as error:
        raise TokenizerTrimError(f"token ids must be integers: {error}") from None
    bad = sorted(i for i in kept if not (0 <= i < vocab.size and vocab.tokens[i] is not None))
    if bad:
        shown = ", ".join(map(str, bad[:10])) + (" ..." if len(bad) > 10 else "")
        raise TokenizerTrimError(
            f"{len(bad)} token id(s) name no token of this tokenizer (ids 0..{vocab.size - 1}): "
            f"{shown}"
        )
    return kept


# ----------------------------------------------------------------------------------------------
# Rebuild


def rebuild(tokenizer: Any, kept: Sequence[int]) -> Any:
    """A tokenizer of the same kind with only ``kept`` (sorted old ids); new id = rank in kept."""
    vocab = read_vocab(tokenizer)
    require_supported(vocab)
    kept_ids = _checked_kept(vocab, kept)
    old_to_new = _old_to_new(kept_ids, vocab.size)
    remap = remapper(vocab, old_to_new)
    spec = dict(vocab.spec)  # shallow: every part that changes is rebuilt, not edited in place
    spec["model"] = rebuild_model(vocab, kept_ids, old_to_new)
    spec["added_tokens"] = [
        {**entry, "id": int(old_to_new[entry["id"]])}
        for entry in spec.get("added_tokens") or ()
        if old_to_new[entry["id"]] >= 0
    ]
    spec["post_processor"] = _map_post_processor(spec.get("post_processor"), remap)
    if spec.get("padding"):
        padding = spec["padding"]
        spec["padding"] = {**padding, "pad_id": remap(padding["pad_id"], "padding pad_id")}
    trimmed = Tokenizer.from_str(json.dumps(spec))
    _check_new_ids(vocab, trimmed, kept_ids)
    return trimmed if isinstance(tokenizer, Tokenizer) else _wrap_like(tokenizer, trimmed)


def _checked_kept(vocab: Vocab, kept: Sequence[int]) -> list[int]:
    kept_ids = [operator.index(i) for i in kept]
    if any(a >= b for a, b in itertools.pairwise(kept_ids)):
        raise TokenizerTrimError("kept ids must be sorted and unique: pass sorted(close(...))")
    _checked_ids(vocab, kept_ids)
    if not kept_ids:
        raise TokenizerTrimError("kept ids are empty: a tokenizer needs at least one token")
    return kept_ids


def _old_to_new(kept: Sequence[int], size: int) -> np.ndarray:
    """Dense old id -> new id table, -1 for removed ids."""
    table = np.full(max(size, (max(kept) + 1) if len(kept) else 0), -1, dtype=np.int64)
    table[np.asarray(kept, dtype=np.int64)] = np.arange(len(kept), dtype=np.int64)
    return table


def _map_post_processor(
    processor: dict[str, Any] | None, remap: Callable[[int, str], int]
) -> dict[str, Any] | None:
    """A copy of a post-processor with every token id passed through ``remap``."""
    if processor is None:
        return None
    kind = processor.get("type")
    out = dict(processor)
    if kind == "Sequence":
        out["processors"] = [_map_post_processor(p, remap) for p in processor["processors"]]
    elif kind == "TemplateProcessing":
        out["special_tokens"] = {
            name: {
                **entry,
                "ids": [remap(i, f"post-processor token {name!r}") for i in entry["ids"]],
            }
            for name, entry in processor["special_tokens"].items()
        }
    elif kind in ("BertProcessing", "RobertaProcessing"):
        for role in ("sep", "cls"):
            token, token_id = processor[role]
            out[role] = [token, remap(token_id, f"{kind} {role} token {token!r}")]
    elif kind != "ByteLevel":
        raise TokenizerTrimError(f"post-processor type {kind!r} is unknown; cannot remap its ids")
    return out


def _check_new_ids(vocab: Vocab, trimmed: Tokenizer, kept: list[int]) -> None:
    """Every kept token must land on its rank: added tokens get ids in order, not from the file."""
    for new, old in enumerate(kept):
        token = vocab.tokens[old]
        got = trimmed.token_to_id(token) if token is not None else None
        if got != new:
            raise TokenizerTrimError(
                f"rebuilt tokenizer gives {vocab.name(old)} id {got}, expected {new}: its added "
                "tokens are interleaved with the model vocabulary, which tokenizers renumbers"
            )


def _wrap_like(original: Any, trimmed: Tokenizer) -> Any:
    """A Hugging Face tokenizer of ``original``'s class and settings around ``trimmed``."""
    kwargs = {k: v for k, v in original.init_kwargs.items() if k not in _STALE_INIT_KWARGS}
    for attribute in _HF_SPECIAL_ATTRIBUTES:
        value = getattr(original, attribute, None)
        if value is not None:
            kwargs[attribute] = str(value)
    extra = getattr(original, "extra_special_tokens", None)
    if extra:
        kwargs["extra_special_tokens"] = [str(token) for token in extra]
    for setting in _HF_SETTINGS:
        if hasattr(original, setting):
            kwargs[setting] = copy.copy(getattr(original, setting))
    try:
        wrapped = type(original)(tokenizer_object=trimmed, **kwargs)
    except TypeError as error:
        if "tokenizer_object" not in str(error):
            raise
        # A class that builds its own backend in __init__: swap the trimmed one in afterwards.
        wrapped = type(original)(**kwargs)
        wrapped._tokenizer = trimmed
    if len(wrapped) != trimmed.get_vocab_size(with_added_tokens=True):
        raise TokenizerTrimError(
            f"the Hugging Face wrapper added tokens to the trimmed tokenizer ({len(wrapped)} vs "
            f"{trimmed.get_vocab_size(with_added_tokens=True)}): a special token is not kept"
        )
    return wrapped


# ----------------------------------------------------------------------------------------------
# Configs and checks


def remap_config_ids(config: dict[str, Any], kept: Sequence[int]) -> dict[str, Any]:
    """A copy of an HF config or generation-config dict with token ids moved to the new ids.

    Single-id fields (``eos_token_id`` may be a list) must name kept tokens; ``suppress_tokens``
    lists drop removed ids; ``vocab_size`` (where present) becomes ``len(kept)``. A nested
    ``text_config`` is remapped the same way.
    """
    old_to_new = {int(old): new for new, old in enumerate(kept)}
    return _remap_config(config, old_to_new, len(kept))


def _remap_config(config: dict[str, Any], old_to_new: dict[int, int], size: int) -> dict[str, Any]:
    out = copy.deepcopy(config)

    def remap(field: str, old: Any) -> int:
        if isinstance(old, bool) or not isinstance(old, int) or old not in old_to_new:
            raise TokenizerTrimError(f"config field {field!r} holds token id {old!r}, not kept")
        return old_to_new[old]

    for field in CONFIG_ID_FIELDS:
        value = out.get(field)
        if isinstance(value, list | tuple):
            out[field] = [remap(field, v) for v in value]
        elif value is not None:
            out[field] = remap(field, value)
    for field in CONFIG_SUPPRESS_FIELDS:
        if out.get(field) is not None:
            out[field] = [old_to_new[v] for v in out[field] if v in old_to_new]
    if "vocab_size" in out:
        out["vocab_size"] = size
    if isinstance(out.get("text_config"), dict):
        out["text_config"] = _remap_config(out["text_config"], old_to_new, size)
    return out


def encodes_identically(
    old_tokenizer: Any, new_tokenizer: Any, kept: Sequence[int], texts: Iterable[str]
) -> float:
    """Fraction of ``texts`` whose new ids equal their old ids mapped through ``kept``.

    Compares the backend tokenizers with ``add_special_tokens=False``: the model-visible pieces
    of the text itself, not the template the post-processor wraps around them (whose ids
    ``rebuild`` remaps separately). A text whose old encoding uses a removed id counts as changed.
    """
    texts = list(texts)
    if not texts:
        raise TokenizerTrimError("encodes_identically needs at least one text")
    old_backend, new_backend = backend(old_tokenizer), backend(new_tokenizer)
    old_to_new = _old_to_new(kept, old_backend.get_vocab_size(with_added_tokens=True))
    olds = old_backend.encode_batch_fast(texts, add_special_tokens=False)
    news = new_backend.encode_batch_fast(texts, add_special_tokens=False)
    same = 0
    for old, new in zip(olds, news):
        ids = np.asarray(old.ids, dtype=np.int64)
        if ids.size and ids.max() >= len(old_to_new):
            continue
        mapped = old_to_new[ids]
        same += bool((mapped >= 0).all()) and mapped.tolist() == new.ids
    return same / len(texts)
