"""The explicit context passes run in: data, tokenizer, seed and settings.

Passes hold no state between runs; everything ambient travels in a :class:`PassContext`.
Calibration and evaluation data can be given as text (tokenized with ``tokenizer``) or as token
id batches, and every pass gets them the same way through :meth:`PassContext.batches`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, TypeVar

import torch

from rewriter.errors import RewriterError

__all__ = ["PassContext", "is_text", "progress"]

T = TypeVar("T")


def is_text(data: Any) -> bool:
    """True for context data given as text: a string or a non-empty list of strings."""
    return isinstance(data, str) or (
        isinstance(data, Sequence)
        and not isinstance(data, torch.Tensor)
        and bool(data)
        and all(isinstance(d, str) for d in data)
    )


@dataclasses.dataclass
class PassContext:
    """Data and settings for a pipeline run.

    Example::

        >>> ctx = rewriter.PassContext(calibration=text, tokenizer=tok, seed=0)
        >>> batches = ctx.batches("calibration", seq_len=128, batch_size=4)
    """

    calibration: Any = None
    """Calibration data: text (str or list of str), token ids (a [B, T] tensor or a list), or a
    list of dicts of named inputs (``{"input_ids": ..., "attention_mask": ...}``)."""
    evaluation: Any = None
    """Evaluation data in the same forms. When given, pipelines report the perplexity of the
    input graph and after every pass, and budgets are measured on it."""
    tokenizer: Any = None
    """Tokenizer for text data: Hugging Face ``PreTrainedTokenizer`` or ``tokenizers.Tokenizer``."""
    seed: int = 0
    """Seed for everything random a pass does (it uses its own generator, never the global one)."""
    progress: bool = True
    """Show progress bars for long work (calibration, fitting, training)."""
    device: str = "cpu"
    """Device for work a pass does on data (calibration forward passes, fitting)."""
    example_inputs: tuple[torch.Tensor, ...] | None = None
    """Inputs for the per-pass error column; default: the inputs the graph was traced with."""
    measure_error: bool = True
    """Measure each pass's output error against its input on the example inputs (one forward
    pass of each graph per pass); exact passes that exceed the tolerance rule fail."""
    verify_each: bool = False
    """After each exact pass, check equivalence with hypothesis-drawn inputs (slower)."""
    print_after: str | None = None
    """Print the graph after each pass: ``"all"`` or ``"changed"``."""
    reproducer_dir: str | None = None
    """If set, a failing pass saves its input graph and the spec here."""
    eval_tokens: int | None = None
    """Evaluate perplexity on at most this many tokens of the evaluation data (None: all)."""
    seq_len: int = 128
    """Default sequence length when text is cut into batches."""
    batch_size: int = 8
    """Default batch size when text is cut into batches."""

    def has(self, kind: str) -> bool:
        return getattr(self, kind) is not None

    def require(self, kind: str, pass_name: str) -> Any:
        """The ``kind`` data, or an error telling the user which context field to fill."""
        value = getattr(self, kind)
        if value is None:
            raise RewriterError(
                f"pass '{pass_name}' needs {kind} data: give PassContext({kind}=...) "
                f"(text with a tokenizer, or token id batches)"
                + (" or --calib on the command line" if kind == "calibration" else "")
            )
        return value

    def batches(
        self,
        kind: str = "calibration",
        *,
        seq_len: int | None = None,
        batch_size: int | None = None,
        limit: int | None = None,
        pass_name: str = "",
    ) -> list[torch.Tensor]:
        """The ``kind`` data as a list of [B, T] token id tensors."""
        data = self.require(kind, pass_name or "this pass")
        seq_len = seq_len or self.seq_len
        batch_size = batch_size or self.batch_size
        if is_text(data):
            ids = self.encode(data if isinstance(data, str) else "\n".join(data))
            result = _chunk(ids, seq_len, batch_size)
        elif isinstance(data, torch.Tensor):
            result = list(data.split(batch_size)) if data.dim() == 2 else [data.unsqueeze(0)]
        else:  # a list of batches: id tensors, or dicts of named inputs (ids and attention mask)
            result = [b if isinstance(b, dict) else torch.as_tensor(b) for b in data]
        if not result:
            raise RewriterError(f"{kind} data is too short for one batch of {seq_len} tokens")
        return result[:limit] if limit is not None else result

    def encode(self, text: str, tokenizer: Any = None) -> torch.Tensor:
        """Token ids of ``text`` with ``tokenizer`` (default: the context's)."""
        tokenizer = tokenizer if tokenizer is not None else self.tokenizer
        if tokenizer is None:
            raise RewriterError("text data needs a tokenizer: give PassContext(tokenizer=...)")
        # Both Hugging Face tokenizers and tokenizers.Tokenizer have encode(); the latter
        # returns an Encoding whose ids are in .ids.
        encoded = tokenizer.encode(text)
        ids = getattr(encoded, "ids", encoded)
        return torch.tensor(ids, dtype=torch.long)

    def evaluation_ids(self, tokenizer: Any = None) -> torch.Tensor:
        """The evaluation data as one stream of token ids (for perplexity); text is encoded
        with ``tokenizer`` (default: the context's)."""
        data = self.require("evaluation", "perplexity")
        if is_text(data):
            ids = self.encode(data if isinstance(data, str) else "\n".join(data), tokenizer)
        elif isinstance(data, torch.Tensor):
            ids = data.reshape(-1)
        else:
            ids = torch.cat([torch.as_tensor(b).reshape(-1) for b in data])
        return ids[: self.eval_tokens] if self.eval_tokens is not None else ids

    def generator(self, offset: int = 0) -> torch.Generator:
        """A CPU generator seeded from the context's seed (plus ``offset``)."""
        return torch.Generator().manual_seed(self.seed + offset)


def _chunk(ids: torch.Tensor, seq_len: int, batch_size: int) -> list[torch.Tensor]:
    blocks = ids.numel() // seq_len
    if blocks == 0:
        return []
    rows = ids[: blocks * seq_len].view(blocks, seq_len)
    return list(rows.split(batch_size))


def progress(
    items: Iterable[T], *, total: int | None = None, description: str = "", enabled: bool = True
) -> Iterator[T]:
    """Iterate with a progress bar (rich) unless disabled or ``REWRITER_NO_PROGRESS`` is set."""
    if not enabled or os.environ.get("REWRITER_NO_PROGRESS"):
        yield from items
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, transient=True) as bar:
        task = bar.add_task(description, total=total)
        for item in items:
            yield item
            bar.advance(task)
