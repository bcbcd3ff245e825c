"""MLIR backend through torch-mlir: a rewritten graph as MLIR text in the linalg-on-tensors, TOSA,
StableHLO or torch dialect, every ``rewriter::`` op imported through its decomposition
(:mod:`.exporter`); linalg-on-tensors compiled to LLVM and executed on this CPU to check it
against the graph (:mod:`.runtime`); and :class:`MlirBackend`, the shared interface
(:mod:`.backend`).
"""

from __future__ import annotations

from rewriter.backends.mlir.backend import MlirBackend
from rewriter.backends.mlir.exporter import (
    DIALECTS,
    LIMITS,
    Dialect,
    MlirExport,
    available,
    export,
)
from rewriter.backends.mlir.runtime import check, run

__all__ = [
    "DIALECTS",
    "LIMITS",
    "Dialect",
    "MlirBackend",
    "MlirExport",
    "available",
    "check",
    "export",
    "run",
]
