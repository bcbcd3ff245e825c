"""Language-model metrics: perplexity of a model or graph on text, and a bigram baseline.

One definition everywhere (README numbers, pass reports, budgets): the text is tokenized, cut
into non-overlapping windows of the model's context length, and every token after the first of
each window is predicted from the tokens before it in that window. Perplexity is
``exp(mean negative log-likelihood)`` over those predictions.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F

from rewriter.ir.graph import feed
from rewriter.ir.trace import max_positions, trace_info
from rewriter.pipeline.train import logits_of

__all__ = ["bigram_perplexity", "encode", "perplexity", "perplexity_of_ids", "windows"]


def encode(tokenizer: Any, text: str) -> torch.Tensor:
    """Token ids of ``text`` (Hugging Face tokenizers and ``tokenizers.Tokenizer`` alike)."""
    encoded = tokenizer.encode(text)
    return torch.tensor(getattr(encoded, "ids", encoded), dtype=torch.long)


def windows(ids: torch.Tensor, context: int) -> list[torch.Tensor]:
    """Non-overlapping windows of ``context`` tokens (the last may be shorter, >= 2 tokens)."""
    ids = ids.reshape(-1)
    chunks = [ids[i : i + context] for i in range(0, ids.numel(), context)]
    return [c for c in chunks if c.numel() >= 2]


def _context_of(model: torch.nn.Module, default: int = 256) -> int:
    if isinstance(model, torch.fx.GraphModule):
        info = trace_info(model)
        return (info.max_positions if info is not None else None) or default
    return max_positions(model) or default


@torch.no_grad()
def _logits(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    if isinstance(model, torch.fx.GraphModule):
        return logits_of(feed(model, batch))
    kwargs = {"use_cache": False} if hasattr(getattr(model, "config", None), "use_cache") else {}
    return logits_of(model(batch, **kwargs))


def perplexity_of_ids(
    model: torch.nn.Module,
    ids: torch.Tensor,
    context: int | None = None,
    *,
    batch_size: int = 8,
    max_tokens: int | None = None,
    over: torch.Tensor | None = None,
) -> float:
    """Perplexity of ``model`` (an ``nn.Module`` or a traced graph) on token ids.

    ``ids`` are what the model takes. For a graph whose vocabulary was trimmed
    (:mod:`rewriter.vocab`) the logits are over the kept ids, and targets are renumbered to
    them; a target that was removed is not counted. ``over`` (ids of the model's vocabulary)
    renormalizes the model's distribution over those ids only: the original model's perplexity
    as a graph trimmed to ``over`` would see it.
    """
    from rewriter.analysis.vocab import vocab_map

    context = context or _context_of(model)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    chunks = windows(ids, context)
    if not chunks:
        raise ValueError("perplexity needs at least 2 tokens")
    vmap = vocab_map(model)
    renumber = _target_map(vmap, over, int(ids.max()) + 1)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        full = [c for c in chunks if c.numel() == context]
        groups = [full[i : i + batch_size] for i in range(0, len(full), batch_size)]
        groups += [[c] for c in chunks if c.numel() != context]
        for group in groups:
            batch = torch.stack(group)
            logits = _logits(model, batch).float()
            if over is not None:
                logits = logits.index_select(-1, over)
            targets = batch[:, 1:] if renumber is None else renumber[batch[:, 1:]]
            nll = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]),
                targets.reshape(-1),
                reduction="sum",
                ignore_index=-1,
            )
            total += float(nll)
            count += int((targets >= 0).sum())
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("no target token is in the model's vocabulary")
    return math.exp(total / count)


def _target_map(vmap: Any, over: torch.Tensor | None, id_bound: int) -> torch.Tensor | None:
    """Model input id -> logits index (-1: not predictable), when they differ."""
    if over is not None:
        size = max(int(over.max()) + 1, id_bound)
        table = torch.full((size,), -1, dtype=torch.long)
        table[over] = torch.arange(over.numel())
        return table
    if vmap is not None and vmap.ids == "original":
        return vmap.positions(torch.arange(vmap.original_size))
    return None


def perplexity(
    model: torch.nn.Module,
    tokenizer: Any,
    text: str,
    *,
    context: int | None = None,
    batch_size: int = 8,
    max_tokens: int | None = None,
) -> float:
    """Perplexity of ``model`` or a traced graph on ``text`` (see the module docstring).

    Example::

        >>> model, tokenizer = rewriter.zoo.tiny_gpt2()
        >>> rewriter.metrics.perplexity(model, tokenizer, rewriter.zoo.eval_text())
        41.7
    """
    return perplexity_of_ids(
        model, encode(tokenizer, text), context, batch_size=batch_size, max_tokens=max_tokens
    )


def bigram_perplexity(
    train_ids: torch.Tensor,
    eval_ids: torch.Tensor,
    context: int,
    *,
    vocab: int,
) -> dict[str, float]:
    """An interpolated bigram model's perplexity on the tokens :func:`perplexity` scores.

    ``p(w | v) = lam * c(v, w) / c(v) + (1 - lam) * p_add1(w)``; ``lam`` is chosen on the last 5%
    of the training tokens with counts from the rest, then counts are taken from all of them.
    """
    train_ids = train_ids.reshape(-1)
    split = int(train_ids.numel() * 0.95)
    best = min(
        (_bigram_nll(train_ids[:split], _pairs(train_ids[split:], context), vocab, lam), lam)
        for lam in (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95)
    )
    lam = best[1]
    nll = _bigram_nll(train_ids, _pairs(eval_ids, context), vocab, lam)
    return {"perplexity": math.exp(nll), "lambda": lam}


def _pairs(ids: torch.Tensor, context: int) -> torch.Tensor:
    """(previous, next) token pairs predicted within each window, as in :func:`perplexity`."""
    pairs = [torch.stack([w[:-1], w[1:]], 1) for w in windows(ids.reshape(-1), context)]
    return torch.cat(pairs)


def _bigram_nll(train: torch.Tensor, pairs: torch.Tensor, vocab: int, lam: float) -> float:
    unigram = torch.bincount(train, minlength=vocab).double() + 1.0
    unigram /= unigram.sum()
    flat = train[:-1] * vocab + train[1:]
    counts = torch.bincount(flat, minlength=vocab * vocab).double().view(vocab, vocab)
    totals = counts.sum(1)
    previous, following = pairs[:, 0], pairs[:, 1]
    conditional = counts[previous, following] / totals[previous].clamp(min=1)
    probability = torch.where(
        totals[previous] > 0, lam * conditional + (1 - lam) * unigram[following], unigram[following]
    )
    return float(-probability.log().mean())
