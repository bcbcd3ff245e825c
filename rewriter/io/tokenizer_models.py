"""Vocabulary trimming, per tokenizer model: what BPE, WordPiece, Unigram and WordLevel need.

:func:`read_vocab` parses the ``tokenizer.json`` form of a Hugging Face ``tokenizers`` tokenizer
into a :class:`Vocab` (old id -> token). Per model kind, this module knows which tokens give
coverage of any text (:func:`coverage_tokens`: the byte alphabet, byte-fallback pieces, WordPiece
characters, Unigram's lowest-scoring piece), the BPE merge closure (:func:`merge_closure`) and
how to rebuild the model part of the file for a kept set of ids (:func:`rebuild_model`). The
driver that closes a keep-set and rebuilds the whole tokenizer is
:mod:`rewriter.io.tokenizer_trim`, which re-exports the public names here.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from tokenizers import Tokenizer
from tokenizers.pre_tokenizers import ByteLevel

from rewriter.errors import RewriterError

__all__ = [
    "SUPPORTED_MODELS",
    "TokenizerTrimError",
    "Vocab",
    "backend",
    "coverage_tokens",
    "merge_closure",
    "model_type",
    "model_unk_id",
    "read_vocab",
    "rebuild_model",
    "remapper",
    "require_supported",
]

SUPPORTED_MODELS = ("BPE", "Unigram", "WordLevel", "WordPiece")
_BYTE_PIECES = tuple(f"<0x{b:02X}>" for b in range(256))


class TokenizerTrimError(RewriterError):
    """A tokenizer cannot be trimmed as asked; the message names the token, id or type."""


# ----------------------------------------------------------------------------------------------
# Reading a tokenizer


def backend(tokenizer: Any) -> Tokenizer:
    """The ``tokenizers.Tokenizer`` behind ``tokenizer`` (itself, or a fast HF tokenizer's)."""
    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    inner = getattr(tokenizer, "backend_tokenizer", None)
    if isinstance(inner, Tokenizer):
        return inner
    raise TokenizerTrimError(
        f"cannot trim a {type(tokenizer).__module__}.{type(tokenizer).__qualname__}: vocabulary "
        "trimming needs a fast tokenizer (a tokenizers.Tokenizer or a Hugging Face "
        "PreTrainedTokenizerFast with a tokenizer.json)"
    )


def model_type(tokenizer: Any) -> str:
    """The tokenizer model's kind: ``"BPE"``, ``"WordPiece"``, ``"Unigram"``, ``"WordLevel"``..."""
    return type(backend(tokenizer).model).__name__


@dataclass(frozen=True)
class Vocab:
    """A parsed ``tokenizer.json`` with the id -> token table of the model and added tokens."""

    spec: dict[str, Any]
    tokens: list[str | None]  # old id -> token text, None where no token has that id
    model_ids: dict[str, int]  # token text -> id in the model vocabulary

    @property
    def kind(self) -> str:
        return str(self.spec["model"]["type"])

    @property
    def size(self) -> int:
        return len(self.tokens)

    def name(self, token_id: int) -> str:
        """``"'hello' (id 123)"`` for messages."""
        token = self.tokens[token_id] if 0 <= token_id < self.size else None
        return f"{token!r} (id {token_id})" if token is not None else f"id {token_id}"


def read_vocab(tokenizer: Any) -> Vocab:
    """The :class:`Vocab` of ``tokenizer`` (model vocabulary and added tokens, by old id)."""
    spec = json.loads(backend(tokenizer).to_str())
    model = spec["model"]
    if model["type"] == "Unigram":
        model_ids = {piece: i for i, (piece, _score) in enumerate(model["vocab"])}
    else:
        model_ids = dict(model.get("vocab") or {})
    added = {entry["id"]: entry["content"] for entry in spec.get("added_tokens") or ()}
    size = 1 + max([*model_ids.values(), *added, -1])
    tokens: list[str | None] = [None] * size
    for token, token_id in model_ids.items():
        tokens[token_id] = token
    for token_id, token in added.items():
        tokens[token_id] = token
    return Vocab(spec, tokens, model_ids)


def require_supported(vocab: Vocab) -> None:
    """Raise unless ``vocab``'s model kind is one of :data:`SUPPORTED_MODELS`."""
    if vocab.kind not in SUPPORTED_MODELS:
        raise TokenizerTrimError(
            f"tokenizer model type {vocab.kind!r} is not supported for vocabulary trimming; "
            f"supported: {', '.join(SUPPORTED_MODELS)}"
        )


def model_unk_id(vocab: Vocab) -> int | None:
    """The tokenizer model's own unknown-token id (WordPiece / BPE ``unk_token``, Unigram
    ``unk_id``); None when it has none."""
    model = vocab.spec["model"]
    if vocab.kind == "Unigram":
        return model.get("unk_id")
    unk = model.get("unk_token")
    return vocab.model_ids.get(unk) if unk is not None else None


# ----------------------------------------------------------------------------------------------
# Tokens that give coverage of any text


def coverage_tokens(vocab: Vocab) -> Iterator[str]:
    """Tokens without which some text would encode to unk, lose characters, or re-segment."""
    model = vocab.spec["model"]
    if model.get("byte_fallback"):
        yield from _BYTE_PIECES
    if vocab.kind == "BPE":
        yield from _bpe_alphabet(vocab)
    elif vocab.kind == "WordPiece":
        prefix = model.get("continuing_subword_prefix", "##")
        for token in vocab.model_ids:
            if len(token) == 1 or (token.startswith(prefix) and len(token) == len(prefix) + 1):
                yield token
    elif vocab.kind == "Unigram" and model["vocab"]:
        # The unk node's score is (lowest piece score - 10), recomputed on load: dropping the
        # lowest-scoring piece would raise it and could let unk beat a path the original chose.
        scores = np.array([score for _piece, score in model["vocab"]], dtype=np.float64)
        yield model["vocab"][int(np.argmin(scores))][0]


def _bpe_alphabet(vocab: Vocab) -> Iterator[str]:
    """The symbols BPE starts from: the byte alphabet, or every token no merge produces."""
    model = vocab.spec["model"]
    if _is_byte_level(vocab.spec):
        prefix = model.get("continuing_subword_prefix") or ""
        suffix = model.get("end_of_word_suffix") or ""
        for char in ByteLevel.alphabet():
            yield from {char, prefix + char, char + suffix, prefix + char + suffix}
    elif not model.get("byte_fallback"):
        produced = _merge_parents(model)
        yield from (token for token in vocab.model_ids if token not in produced)


def _is_byte_level(spec: dict[str, Any]) -> bool:
    parts = [spec.get("pre_tokenizer"), spec.get("normalizer")]
    while parts:
        part = parts.pop()
        if not part:
            continue
        if part.get("type") == "ByteLevel":
            return True
        parts.extend(part.get("pretokenizers") or part.get("normalizers") or ())
    return False


# ----------------------------------------------------------------------------------------------
# BPE merges


def _merge_pairs(model: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """The BPE merges as pairs, from either format (``"a b"`` strings or ``[a, b]`` lists)."""
    for merge in model.get("merges") or ():
        parts = merge.split(" ") if isinstance(merge, str) else merge
        if len(parts) != 2:
            raise TokenizerTrimError(f"BPE merge {merge!r} does not have two parts")
        yield parts[0], parts[1]


def _merge_parents(model: dict[str, Any]) -> dict[str, list[tuple[str, str]]]:
    """Token -> the merges ``(a, b)`` that produce it (the model strips the prefix from ``b``)."""
    strip = len(model.get("continuing_subword_prefix") or "")
    parents: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for a, b in _merge_pairs(model):
        parents[a + b[strip:]].append((a, b))
    return parents


def merge_closure(vocab: Vocab, kept: set[int]) -> set[int]:
    """``kept`` plus every token on a BPE merge path to a kept token (all merges producing it)."""
    parents = _merge_parents(vocab.spec["model"])
    closed = set(kept)
    pending = [vocab.tokens[i] for i in kept]
    while pending:
        for pair in parents.get(pending.pop() or "", ()):
            for part in pair:
                part_id = vocab.model_ids[part]
                if part_id not in closed:
                    closed.add(part_id)
                    pending.append(part)
    return closed


# ----------------------------------------------------------------------------------------------
# Rebuilding the model part


def remapper(vocab: Vocab, old_to_new: np.ndarray) -> Callable[[int, str], int]:
    """``remap(old, where)``: the new id of ``old``; raises naming ``where`` if it is not kept."""

    def remap(old: int, where: str) -> int:
        new = int(old_to_new[old]) if 0 <= old < len(old_to_new) else -1
        if new < 0:
            raise TokenizerTrimError(f"{where} uses {vocab.name(old)}, which is not kept")
        return new

    return remap


def _kept_model_vocab(vocab: Vocab, kept: list[int], old_to_new: np.ndarray) -> dict[str, int]:
    """Token -> new id for the kept tokens that belong to the model vocabulary."""
    out: dict[str, int] = {}
    for old in kept:
        token = vocab.tokens[old]
        if token is not None and vocab.model_ids.get(token) == old:
            out[token] = int(old_to_new[old])
    return out


def _rebuild_bpe(vocab: Vocab, kept: list[int], old_to_new: np.ndarray) -> dict[str, Any]:
    model = dict(vocab.spec["model"])
    model["vocab"] = new_vocab = _kept_model_vocab(vocab, kept, old_to_new)
    parents = _merge_parents(model)
    for token in new_vocab:
        for a, b in parents.get(token, ()):
            missing = a if a not in new_vocab else b if b not in new_vocab else None
            if missing is not None:
                raise TokenizerTrimError(
                    f"kept ids are not closed under the BPE merges: {token!r} is kept but its "
                    f"merge part {vocab.name(vocab.model_ids[missing])} is not; pass the result "
                    "of close(tokenizer, ids)"
                )
    strip = len(model.get("continuing_subword_prefix") or "")
    model["merges"] = [
        merge
        for merge, (a, b) in zip(model.get("merges") or (), _merge_pairs(model))
        if a in new_vocab and b in new_vocab and a + b[strip:] in new_vocab
    ]
    return model


def _rebuild_dict_vocab(vocab: Vocab, kept: list[int], old_to_new: np.ndarray) -> dict[str, Any]:
    model = dict(vocab.spec["model"])
    model["vocab"] = _kept_model_vocab(vocab, kept, old_to_new)
    unk = model.get("unk_token")
    if unk is not None and unk in vocab.model_ids and unk not in model["vocab"]:
        raise TokenizerTrimError(f"the model's unk token {unk!r} is not kept")
    return model


def _rebuild_unigram(vocab: Vocab, kept: list[int], old_to_new: np.ndarray) -> dict[str, Any]:
    model = dict(vocab.spec["model"])
    pieces = model["vocab"]
    model["vocab"] = [pieces[old] for old in kept if old < len(pieces)]
    if model.get("unk_id") is not None:
        model["unk_id"] = remapper(vocab, old_to_new)(model["unk_id"], "the Unigram unk_id")
    return model


_REBUILD_MODEL: dict[str, Callable[[Vocab, list[int], np.ndarray], dict[str, Any]]] = {
    "BPE": _rebuild_bpe,
    "Unigram": _rebuild_unigram,
    "WordLevel": _rebuild_dict_vocab,
    "WordPiece": _rebuild_dict_vocab,
}


def rebuild_model(vocab: Vocab, kept: list[int], old_to_new: np.ndarray) -> dict[str, Any]:
    """The ``model`` part of ``tokenizer.json`` with only ``kept`` (sorted old ids), renumbered
    by ``old_to_new``; raises when ``kept`` lacks a token the model needs."""
    return _REBUILD_MODEL[vocab.kind](vocab, kept, old_to_new)
