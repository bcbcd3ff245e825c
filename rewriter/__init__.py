"""rewriter: compiler-style, verified graph rewriting of transformer models over torch.fx.

Trace a model once, rewrite the graph with composable passes, verify the result against the
model, and export it::

    import rewriter

    gm = rewriter.trace(model, (input_ids,), dynamic_shapes="auto")
    ctx = rewriter.PassContext(calibration=text, tokenizer=tokenizer, seed=0)
    result = rewriter.Pipeline.parse("canonicalize").run(gm, ctx)
    print(result.report.table())
    rewriter.verify.assert_equivalent(model, result.graph_module)
    rewriter.backends.onnx.export(result.graph_module, None, "out/model.onnx")
    rewriter.save(result.graph_module, "out/model.pt2")

This module is the facade: it re-exports the public names of the core and is, with the CLI,
the only core module that reaches up into ``rewriter.passes``.
"""

from __future__ import annotations

from rewriter import adapters, checkpoint, instruments, ops, tokenizer_trim, verify, vocab
from rewriter.checkpoint import open_checkpoint, rewrite_checkpoint, write_checkpoint
from rewriter.context import PassContext
from rewriter.errors import (
    LoweringError,
    PassError,
    PreconditionError,
    RewriterError,
    SpecError,
    TraceError,
)
from rewriter.graph import format_graph
from rewriter.pipeline import Pass, PassResult, Pipeline, PipelineResult, Report, option
from rewriter.serialize import load, save, save_pretrained
from rewriter.spec import Budget
from rewriter.store import Edit, weights
from rewriter.trace import TraceInfo, trace, trace_info
from rewriter.train import TrainReport, train
from rewriter.weightless import trace_weightless

__version__ = "0.1.0"


def register_pass(cls: type) -> type:
    """Register a third-party pass so its name works in pipeline specs (see rewriter.passes)."""
    from rewriter.passes import register_pass as _register

    return _register(cls)


def register_backend(cls: type) -> type:
    """Register a third-party backend (a ``rewriter.backends.base.Backend`` subclass) so
    ``rewriter.backends.get_backend`` and ``rewriter run --backend`` know its name."""
    from rewriter.backends import register_backend as _register

    return _register(cls)


def available_backends() -> list[str]:
    """Names of every registered backend (whether each runs here: ``.available()``)."""
    from rewriter.backends import available

    return available()


def __getattr__(name: str) -> object:
    # Heavier parts load on first use: rewriter.backends, rewriter.zoo, rewriter.metrics, ...
    if name in ("backends", "zoo", "metrics", "passes", "deploy"):
        import importlib

        return importlib.import_module(f"rewriter.{name}")
    if name in ("generate", "trace_causal_lm", "split"):  # deployment, see rewriter.deploy
        import importlib

        return getattr(importlib.import_module("rewriter.deploy"), name)
    raise AttributeError(f"module 'rewriter' has no attribute {name!r}")


def available_passes() -> list[str]:
    """Names of every registered pass."""
    from rewriter.passes import available

    return available()


__all__ = [
    "Budget",
    "Edit",
    "LoweringError",
    "Pass",
    "PassContext",
    "PassError",
    "PassResult",
    "Pipeline",
    "PipelineResult",
    "PreconditionError",
    "Report",
    "RewriterError",
    "SpecError",
    "TraceError",
    "TraceInfo",
    "TrainReport",
    "adapters",
    "available_backends",
    "available_passes",
    "checkpoint",
    "format_graph",
    "generate",
    "instruments",
    "load",
    "open_checkpoint",
    "ops",
    "option",
    "register_backend",
    "register_pass",
    "rewrite_checkpoint",
    "save",
    "save_pretrained",
    "split",
    "tokenizer_trim",
    "trace",
    "trace_causal_lm",
    "trace_info",
    "trace_weightless",
    "train",
    "verify",
    "vocab",
    "weights",
    "write_checkpoint",
]
