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

import importlib
import importlib.abc
import importlib.util
import sys
from typing import Any

from rewriter import checkpoint, ops, verify
from rewriter.analysis import adapters, vocab
from rewriter.checkpoint import open_checkpoint, write_checkpoint
from rewriter.context import PassContext
from rewriter.errors import (
    LoadError,
    LoweringError,
    PassError,
    PreconditionError,
    RewriterError,
    SpecError,
    TraceError,
)
from rewriter.io import tokenizer_trim
from rewriter.io.serialize import load, save, save_pretrained
from rewriter.io.streaming import rewrite_checkpoint
from rewriter.ir.graph import format_graph
from rewriter.ir.store import Edit, weights
from rewriter.ir.trace import TraceInfo, trace, trace_info
from rewriter.ir.weightless import trace_weightless
from rewriter.pipeline import (
    Pass,
    PassResult,
    Pipeline,
    PipelineResult,
    Report,
    instruments,
    option,
)
from rewriter.pipeline.spec import Budget
from rewriter.pipeline.train import TrainReport, train

# Where modules lived before the core was split into layers (docs/architecture.md, "Moved
# modules"): the old dotted names keep importing, as the same module objects, so code and saved
# files that name them go on working. Our own code uses the new names (tests/test_layering.py).
MOVED = {
    "adapters": "rewriter.analysis.adapters",
    "centering": "rewriter.analysis.centering",
    "driver": "rewriter.rewrite.driver",
    "families": "rewriter.verify.families",
    "folding": "rewriter.analysis.folding",
    "graph": "rewriter.ir.graph",
    "instruments": "rewriter.pipeline.instruments",
    "metrics": "rewriter.pipeline.metrics",
    "pattern": "rewriter.rewrite.pattern",
    "serialize": "rewriter.io.serialize",
    "spec": "rewriter.pipeline.spec",
    "store": "rewriter.ir.store",
    "stream": "rewriter.analysis.residual",
    "tokenizer_trim": "rewriter.io.tokenizer_trim",
    "trace": "rewriter.ir.trace",
    "train": "rewriter.pipeline.train",
    "vocab": "rewriter.analysis.vocab",
    "weightless": "rewriter.ir.weightless",
}


class _MovedFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports ``rewriter.<old>`` as the module now at ``MOVED[old]`` (the same object)."""

    def find_spec(self, fullname: str, path: object, target: object = None) -> Any:
        prefix, _, old = fullname.partition(".")
        if prefix != "rewriter" or old not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec: Any) -> Any:
        return importlib.import_module(MOVED[spec.name.partition(".")[2]])

    def exec_module(self, module: Any) -> None:
        pass


def _alias_moved_modules() -> None:
    for old, new in MOVED.items():
        if new in sys.modules:  # loaded: alias now, so the facade's names (trace, train) stay
            sys.modules.setdefault(f"rewriter.{old}", sys.modules[new])
    if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
        sys.meta_path.append(_MovedFinder())


_alias_moved_modules()

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
    if name in ("backends", "zoo", "passes", "deploy"):
        return importlib.import_module(f"rewriter.{name}")
    if name in MOVED:  # rewriter.metrics, and the old dotted names of moved modules
        return importlib.import_module(MOVED[name])
    if name in ("generate", "trace_causal_lm", "split"):  # deployment, see rewriter.deploy
        return getattr(importlib.import_module("rewriter.deploy"), name)
    raise AttributeError(f"module 'rewriter' has no attribute {name!r}")


def available_passes() -> list[str]:
    """Names of every registered pass."""
    from rewriter.passes import available

    return available()


__all__ = [
    "Budget",
    "Edit",
    "LoadError",
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
