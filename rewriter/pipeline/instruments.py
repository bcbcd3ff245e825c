"""Pipeline instruments: hooks that run around a pipeline and around each of its passes.

As MLIR's pass instrumentation and xDSL's pipeline callbacks do, an instrument observes a run
without being a pass: it adds metrics to the report (the baseline row, or a pass's row), and may
hand a pass an adapted context. ``Pipeline.run`` itself only copies, runs, times, verifies and
records; what a run measures beyond that lives here:

* :class:`Vocabulary`: after ``vocab-trim``, later passes get their calibration data in the
  trimmed graph's ids (``rewriter.vocab.adapt_context``);
* :class:`Perplexity`: the perplexity column, on the context's evaluation data.

Both run in every pipeline (:func:`default_instruments`); users add their own with
``Pipeline.run(gm, ctx, instruments=[...])``: a memory probe, a per-pass latency on a backend,
the collector of an HTML report::

    class NodeCount(rewriter.instruments.Instrument):
        def after_pass(self, step, before, after, record):
            return {"nodes": len(after.graph.nodes)}

    rewriter.Pipeline.parse("canonicalize,fold-ln").run(gm, ctx, instruments=[NodeCount()])
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.fx

from rewriter.analysis import vocab
from rewriter.context import PassContext, is_text
from rewriter.ir.graph import is_weightless

if TYPE_CHECKING:
    from rewriter.pipeline import Pass, PassRecord, PipelineResult

__all__ = ["Instrument", "Perplexity", "Vocabulary", "default_instruments"]


class Instrument:
    """Hooks around a pipeline run; every hook is optional (the defaults do nothing).

    Metrics returned by :meth:`before_pipeline` go to the report's baseline row, those returned
    by :meth:`after_pass` to that pass's row. An instrument must not change the graphs it sees
    (it gets the pipeline's own, not copies)."""

    def before_pipeline(self, gm: torch.fx.GraphModule, ctx: PassContext) -> dict[str, Any] | None:
        """Called once with the input graph; metrics for the baseline row."""
        return None

    def before_pass(
        self, step: Pass, gm: torch.fx.GraphModule, ctx: PassContext
    ) -> PassContext | None:
        """Called before each pass with the graph it will get; a context to give it instead
        (``None``: the one it would get)."""
        return None

    def after_pass(
        self,
        step: Pass,
        before: torch.fx.GraphModule,
        after: torch.fx.GraphModule,
        record: PassRecord,
    ) -> dict[str, Any] | None:
        """Called after each pass that ran; metrics for its row."""
        return None

    def after_pipeline(self, result: PipelineResult) -> None:
        """Called once with the result."""


class Vocabulary(Instrument):
    """Calibration data follows the vocabulary: a pass that runs after ``vocab-trim`` gets its
    context's token ids in the graph's ids (``rewriter.vocab.adapt_context``)."""

    def before_pipeline(self, gm: torch.fx.GraphModule, ctx: PassContext) -> None:
        self.input_vocab = vocab.vocab_map(gm)

    def before_pass(self, step: Pass, gm: torch.fx.GraphModule, ctx: PassContext) -> PassContext:
        return vocab.adapt_context(ctx, self.input_vocab, vocab.vocab_map(gm))


class Perplexity(Instrument):
    """Perplexity of each graph on the context's evaluation data (nothing without such data, or
    for a weightless graph).

    The data's ids are those of the pipeline's input graph. A graph whose vocabulary a pass
    trimmed gets them renumbered when every token was kept; otherwise text is encoded again with
    the rebuilt tokenizer and the perplexity is of the text's likelihood per original token (so
    the column stays comparable), and a graph that still takes original ids gets them as they
    are (removed targets are not counted).
    """

    def before_pipeline(self, gm: torch.fx.GraphModule, ctx: PassContext) -> dict[str, float]:
        self.ctx = ctx
        enabled = ctx.evaluation is not None and not is_weightless(gm)
        self.ids = ctx.evaluation_ids() if enabled else None
        self.vocab = vocab.vocab_map(gm)
        return self.measure(gm)

    def after_pass(
        self,
        step: Pass,
        before: torch.fx.GraphModule,
        after: torch.fx.GraphModule,
        record: PassRecord,
    ) -> dict[str, float]:
        return self.measure(after)

    def measure(self, gm: torch.fx.GraphModule) -> dict[str, float]:
        if self.ids is None:
            return {}
        from rewriter.pipeline.metrics import perplexity_of_ids

        ids = self._ids_for(vocab.vocab_map(gm))
        if ids is None:
            return {}
        ppl = perplexity_of_ids(gm, ids)
        if ids.numel() != self.ids.numel():
            # Text encoded again with a rebuilt tokenizer: a different number of tokens. The
            # text's total log-likelihood per *original* token keeps the column comparable.
            ppl = math.exp(math.log(ppl) * (ids.numel() - 1) / (self.ids.numel() - 1))
        return {"ppl": ppl}

    def _ids_for(self, target: vocab.VocabMap | None) -> torch.Tensor | None:
        assert self.ids is not None
        if vocab.same_vocab(self.vocab, target) or target is None:
            return self.ids
        original = self.ids if self.vocab is None else self.vocab.original_ids(self.ids)
        if target.ids == "original" or bool((target.positions(original) >= 0).all()):
            return target.graph_ids(original) if target.ids == "new" else original
        if target.tokenizer is not None and is_text(self.ctx.evaluation):
            return self.ctx.evaluation_ids(target.tokenizer)
        return None


def default_instruments() -> list[Instrument]:
    """The instruments every pipeline runs (fresh ones: they keep per-run state)."""
    return [Vocabulary(), Perplexity()]
