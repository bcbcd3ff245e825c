"""The embedded default model: a small trained GPT-2 that ships inside the package.

``tiny_gpt2()`` returns a Hugging Face ``GPT2LMHeadModel`` (4 layers, d=192, 6 heads, context 256,
4096-token byte-level BPE, tied embeddings, about 2.6M parameters) and its tokenizer, loaded from
package data with no network access. It was trained by ``python -m rewriter.zoo.build train`` on
a text snapshot of Python standard-library docstrings, comments and reference topics (shipped
compressed, with its SHA-256, in ``data/``). ``eval_text()`` is held-out text from that snapshot
(whole source files the model never saw); ``calibration_text()`` is a slice of the training
text for passes that calibrate. ``metrics()`` holds the measured held-out perplexities of the
model and of a bigram baseline.

Example::

    >>> model, tokenizer = rewriter.zoo.tiny_gpt2()
    >>> rewriter.metrics.perplexity(model, tokenizer, rewriter.zoo.eval_text())
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import torch

__all__ = ["DATA", "calibration_text", "eval_text", "metrics", "tiny_gpt2", "tokenizer"]

DATA = Path(__file__).parent / "data"
EOT = "<|endoftext|>"


def tiny_gpt2(dtype: torch.dtype = torch.float32, *, data: Path = DATA) -> tuple[Any, Any]:
    """The embedded model (eval mode, ``dtype``) and its tokenizer (``data``: another build)."""
    from safetensors.torch import load_file
    from transformers import GPT2Config, GPT2LMHeadModel

    weights = data / "model.safetensors"
    if not weights.exists():
        raise FileNotFoundError(
            f"{weights} is missing: build it with `python -m rewriter.zoo.build train`"
        )
    config = GPT2Config.from_json_file(str(data / "config.json"))
    model = GPT2LMHeadModel(config)
    state = {k: v.to(torch.float32) for k, v in load_file(str(weights)).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"embedded weights do not fit the config: {missing} {unexpected}")
    model.tie_weights()
    return model.to(dtype).eval(), tokenizer(data)


@functools.cache
def tokenizer(data: Path = DATA) -> Any:
    """The embedded byte-level BPE tokenizer as a Hugging Face fast tokenizer."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_file=str(data / "tokenizer.json"),
        bos_token=EOT,
        eos_token=EOT,
        unk_token=EOT,
        model_max_length=10**9,  # perplexity windows long texts itself; no truncation warnings
    )


@functools.cache
def eval_text() -> str:
    """Held-out evaluation text (documents the model was not trained on)."""
    return (DATA / "eval.txt").read_text(encoding="utf-8")


@functools.cache
def calibration_text() -> str:
    """Calibration text for passes (a slice of the training documents)."""
    return (DATA / "calibration.txt").read_text(encoding="utf-8")


def metrics() -> dict[str, Any]:
    """What training measured: held-out perplexity of the model and the bigram baseline, etc."""
    return json.loads((DATA / "metrics.json").read_text())
