"""Generation with a prefill and a decode graph: :func:`generate` and :func:`agreement`.

:func:`generate` runs anything with ``run_prefill``, ``run_decode`` and ``vocab`` (the torch
:class:`rewriter.deploy.cut.CausalLMGraphs`, or ONNX Runtime sessions from
``rewriter.backends.onnx.export_causal_lm``): left-padded prompts, greedy or sampled
(temperature, top-k, top-p), rows stopping at EOS. :func:`agreement` measures how closely an
approximate rewrite generates like the original, greedily.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import torch

from rewriter.errors import RewriterError
from rewriter.ir.graph import positions
from rewriter.pipeline.metrics import encode

__all__ = ["GenerationResult", "agreement", "generate"]


@dataclasses.dataclass
class GenerationResult:
    """Generated token ids (the graph's ids), per prompt, and their text when a tokenizer was
    given."""

    tokens: torch.Tensor
    """[batch, new tokens]; finished rows are padded with the pad id."""
    texts: list[str] | None
    prompt_tokens: torch.Tensor
    seconds_prefill: float
    seconds_decode: float


def generate(
    graphs: Any,
    tokenizer: Any = None,
    prompts: Sequence[str] | torch.Tensor | None = None,
    max_new_tokens: int = 32,
    *,
    attention_mask: torch.Tensor | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
) -> GenerationResult:
    """Generate with a prefill and a decode graph (torch :class:`CausalLMGraphs`, or ONNX Runtime
    sessions from ``rewriter.backends.onnx.export_causal_lm``; anything with ``run_prefill``,
    ``run_decode`` and ``vocab``): greedy by default, or sampled (temperature, top-k, top-p).

    ``prompts`` are strings (encoded with ``tokenizer``, left-padded) or a [B, T] id tensor with
    its ``attention_mask``. Rows stop at ``eos_token_id`` (default: the tokenizer's) and are
    padded after it, like Hugging Face ``generate``. A graph whose vocabulary was trimmed takes
    and returns its own ids; its rebuilt tokenizer is used when it has one.
    """
    import time

    vmap = graphs.vocab
    if vmap is not None and vmap.tokenizer is not None:
        tokenizer = vmap.tokenizer
    eos = eos_token_id if eos_token_id is not None else _token_id(tokenizer, "eos_token_id")
    pad = pad_token_id if pad_token_id is not None else _token_id(tokenizer, "pad_token_id")
    pad = pad if pad is not None else (eos if eos is not None else 0)
    # Prompts are padded with a real token (masked out): the pad id, else the tokenizer's EOS.
    candidates = (pad, _token_id(tokenizer, "eos_token_id"))
    fill = next((v for v in candidates if v is not None and v >= 0), 0)
    ids, mask = _encode_prompts(tokenizer, prompts, attention_mask, fill)
    generator = torch.Generator().manual_seed(seed)
    pick = _Picker(do_sample, temperature, top_k, top_p, generator, vmap)

    start = time.perf_counter()
    logits, cache = graphs.run_prefill(ids, mask, positions(mask))
    seconds_prefill = time.perf_counter() - start
    start = time.perf_counter()
    new: list[torch.Tensor] = []
    done = torch.zeros(ids.shape[0], dtype=torch.bool)
    for step in range(max_new_tokens):
        token = pick(logits[:, -1])
        token = torch.where(done, torch.full_like(token, pad), token)
        new.append(token)
        if eos is not None:
            done |= token == eos
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        logits, cache = graphs.run_decode(token[:, None], mask, positions(mask)[:, -1:], cache)
    seconds_decode = time.perf_counter() - start
    tokens = torch.stack(new, 1) if new else ids.new_zeros((ids.shape[0], 0))
    texts = None
    if tokenizer is not None and hasattr(tokenizer, "decode"):
        texts = [tokenizer.decode(row.tolist(), skip_special_tokens=True) for row in tokens]
    return GenerationResult(tokens, texts, ids, seconds_prefill, seconds_decode)


def _token_id(tokenizer: Any, attribute: str) -> int | None:
    value = getattr(tokenizer, attribute, None)
    return value if isinstance(value, int) else None


def _encode_prompts(
    tokenizer: Any, prompts: Any, attention_mask: torch.Tensor | None, pad: int
) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(prompts, torch.Tensor):
        ids = prompts if prompts.dim() == 2 else prompts.view(1, -1)
        mask = attention_mask if attention_mask is not None else torch.ones_like(ids)
        return ids.long(), mask.long()
    if tokenizer is None or prompts is None:
        raise RewriterError("generate() needs prompts as text with a tokenizer, or as token ids")
    texts = [prompts] if isinstance(prompts, str) else prompts
    rows = [encode(tokenizer, text).tolist() for text in texts]
    if any(not row for row in rows):
        raise RewriterError("an empty prompt: every prompt needs at least one token")
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):  # left padding: the last column is every row's last token
        ids[i, width - len(row) :] = torch.tensor(row)
        mask[i, width - len(row) :] = 1
    return ids, mask


class _Picker:
    """Next token from last-position logits: argmax, or a sample after temperature/top-k/top-p.
    Returns the id the graphs take (a trimmed graph's logits index its own ids in either mode)."""

    def __init__(
        self,
        do_sample: bool,
        temperature: float,
        top_k: int,
        top_p: float,
        generator: torch.Generator,
        vmap: Any,
    ) -> None:
        if temperature <= 0:
            raise ValueError("temperature must be > 0 (use do_sample=False for greedy)")
        self.do_sample, self.temperature, self.top_k, self.top_p = (
            do_sample,
            temperature,
            top_k,
            top_p,
        )
        self.generator = generator
        self.back = vmap.kept if vmap is not None and vmap.ids == "original" else None

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        logits = torch.as_tensor(logits).float()
        if not self.do_sample:
            index = logits.argmax(-1)
        else:
            scores = logits / self.temperature
            if self.top_k > 0:
                kth = scores.topk(min(self.top_k, scores.shape[-1]), -1).values[..., -1:]
                scores = scores.masked_fill(scores < kth, -math.inf)
            if self.top_p < 1.0:
                ordered, order = scores.sort(-1, descending=True)
                cumulative = ordered.softmax(-1).cumsum(-1)
                drop = cumulative - ordered.softmax(-1) > self.top_p
                scores = scores.scatter(-1, order, ordered.masked_fill(drop, -math.inf))
            index = torch.multinomial(scores.softmax(-1), 1, generator=self.generator)[:, 0]
        return index if self.back is None else self.back[index]


def agreement(
    reference: Any,
    candidate: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int = 32,
) -> dict[str, Any]:
    """How closely ``candidate`` (an approximate rewrite) generates like ``reference``, greedily.

    Returns the fraction of generated positions with the same token, the mean length of the
    common prefix (generation diverges for good after the first different token), and the
    texts. Tokens are compared as ids of the original vocabulary (a trimmed graph's are mapped
    back).
    """
    first = generate(reference, tokenizer, prompts, max_new_tokens, eos_token_id=-1)
    second = generate(candidate, tokenizer, prompts, max_new_tokens, eos_token_id=-1)
    a, b = _original_tokens(reference, first.tokens), _original_tokens(candidate, second.tokens)
    same = a == b
    prefix = [int(row.long().cumprod(0).sum()) for row in same]
    return {
        "token_agreement": float(same.float().mean()),
        "common_prefix": sum(prefix) / len(prefix),
        "common_prefix_per_prompt": prefix,
        "new_tokens": int(a.shape[1]),
        "reference_texts": first.texts,
        "candidate_texts": second.texts,
    }


def _original_tokens(graphs: Any, tokens: torch.Tensor) -> torch.Tensor:
    vmap = graphs.vocab
    if vmap is None:
        return tokens
    return vmap.original_ids(tokens)
