"""ONNX Runtime through the shared backend interface (:mod:`rewriter.backends.base`)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.fx
from rewriter.backends.base import (
    Backend,
    Exported,
    Measurement,
    artifact_bytes,
    example_inputs,
    time_calls,
)
from rewriter.backends.onnx import exporter, runtime, translations

from rewriter.verify import ErrorReport

__all__ = ["OnnxBackend"]


class OnnxBackend(Backend):
    """ONNX Runtime on CPU through the shared interface: ``model.onnx`` in the output folder."""

    name = "onnx"
    summary = "an ONNX file run by ONNX Runtime (CPU)"
    label = "ONNX Runtime"
    options = ("opset", "accuracy_level")
    streams = True

    def available(self) -> tuple[bool, str]:
        import importlib.util

        if importlib.util.find_spec("onnxruntime") is None:
            return False, "onnxruntime is not installed"
        return True, "ONNX Runtime, CPUExecutionProvider"

    def native(self) -> frozenset[str]:
        return frozenset(translations.NATIVE)

    def export(
        self,
        gm: torch.fx.GraphModule,
        inputs: Sequence[torch.Tensor] | None,
        out: str | os.PathLike[str],
        *,
        large: bool = False,
        **options: Any,
    ) -> Exported:
        result = exporter.export(
            gm, inputs, Path(out) / "model.onnx", external_data=True if large else None, **options
        )
        info = {"opset": result.opset, "lowering": result.lowering, "notes": result.notes}
        return Exported(self.name, result.path, result, info, example_inputs(gm, inputs))

    def check(
        self,
        gm: torch.fx.GraphModule,
        exported: Exported,
        inputs: Sequence[torch.Tensor] | None = None,
    ) -> ErrorReport:
        return runtime.check(gm, exported.path, inputs)

    def measure(
        self,
        exported: Exported,
        inputs: Sequence[torch.Tensor] | None = None,
        *,
        repeats: int = 10,
        threads: int = 1,
    ) -> Measurement:
        sess = runtime.session(exported.path, threads=threads, spinning=False)
        feeds = list(exported.inputs if inputs is None else inputs)
        median, low, high = time_calls(lambda: runtime.run(sess, feeds), repeats)
        size = artifact_bytes(exported.path) + sum(
            artifact_bytes(p) for p in exported.path.parent.glob(exported.path.name + "*.data")
        )
        return Measurement(self.name, median, low, high, repeats, size, {"threads": threads})
