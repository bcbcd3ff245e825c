"""MLIR through the shared backend interface (:mod:`rewriter.backends.base`)."""

from __future__ import annotations

import os
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.fx
from rewriter.backends.base import Backend, Exported, Measurement, artifact_bytes, example_inputs
from rewriter.backends.mlir import exporter, runtime
from rewriter.backends.mlir.exporter import Dialect, MlirExport

from rewriter.errors import LoweringError

__all__ = ["MlirBackend"]


class MlirBackend(Backend):
    """MLIR through the shared interface: ``model.mlir`` in the output folder, static shapes of
    the inputs; checked and measured by compiling linalg-on-tensors to LLVM on this CPU."""

    name = "mlir"
    summary = "MLIR text (torch-mlir); linalg-on-tensors runs on this CPU"
    label = "MLIR (linalg on CPU)"
    options = ("dialect",)

    def available(self) -> tuple[bool, str]:
        return exporter.available()

    def native(self) -> frozenset[str]:
        return frozenset()  # every rewriter:: op is imported through its decomposition

    def export(
        self,
        gm: torch.fx.GraphModule,
        inputs: Sequence[torch.Tensor] | None,
        out: str | os.PathLike[str],
        *,
        dialect: Dialect = "linalg-on-tensors",
        **options: Any,
    ) -> Exported:
        args = example_inputs(gm, inputs)
        result = exporter.export(gm, args, Path(out) / "model.mlir", dialect=dialect, **options)
        info = {"dialect": dialect, "path": str(result.path), "decomposed": result.decomposed}
        return Exported(self.name, result.path or Path(out), result, info, args)

    def checkable(self, exported: Exported) -> tuple[bool, str]:
        if exported.result.dialect != "linalg-on-tensors":
            return False, f"only linalg-on-tensors runs on this CPU, not {exported.result.dialect}"
        return exporter.available()

    def _runnable(self, exported: Exported) -> MlirExport:
        result = exported.result
        if result.dialect != "linalg-on-tensors":
            raise LoweringError(
                f"the MLIR backend runs linalg-on-tensors on this CPU, not {result.dialect}: "
                "export with dialect='linalg-on-tensors' to check or measure"
            )
        return result

    def check(
        self,
        gm: torch.fx.GraphModule,
        exported: Exported,
        inputs: Sequence[torch.Tensor] | None = None,
    ) -> Any:
        args = exported.inputs if inputs is None else inputs
        return runtime.check(gm, self._runnable(exported), args)

    def measure(
        self,
        exported: Exported,
        inputs: Sequence[torch.Tensor] | None = None,
        *,
        repeats: int = 10,
    ) -> Measurement:
        if repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {repeats}")
        timings: list[float] = []
        runtime.run(
            self._runnable(exported),
            exported.inputs if inputs is None else inputs,
            timings=timings,
            repeats=repeats + 1,  # the first of them warms up
        )
        timings = timings[1:]
        return Measurement(
            self.name,
            statistics.median(timings),
            min(timings),
            max(timings),
            repeats,
            artifact_bytes(exported.path),
        )
