"""The Triton lowering through the shared backend interface (:mod:`rewriter.backends.base`)."""

from __future__ import annotations

import json
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
from rewriter.backends.triton.dispatch import NATIVE, available
from rewriter.backends.triton.lowering import TritonGraph, compile

from rewriter import ops
from rewriter.ir.trace import trace_info

__all__ = ["TritonBackend"]


class TritonBackend(Backend):
    """The Triton lowering through the shared interface: the lowered graph runs in this
    process; the output folder ``out/triton`` gets its code and per-node plan. Without a GPU the
    kernels do not run (their references do), which :meth:`available` says and the measurement
    records."""

    name = "triton"
    summary = "rewriter:: ops on Triton kernels (GPU; references elsewhere)"
    label = "the Triton lowering"
    options = ("torch_compile",)

    def available(self) -> tuple[bool, str]:
        return available()

    def native(self) -> frozenset[str]:
        return NATIVE

    def plan(self, gm: torch.fx.GraphModule) -> dict[str, str]:
        """``"native"`` for ops with a kernel, ``"reference"`` for the rest: the lowered graph
        calls their Python references (nothing is decomposed or refused)."""
        return {
            name: "native" if name in NATIVE else "reference" for name in ops.rewriter_nodes(gm)
        }

    def checkable(self, exported: Exported) -> tuple[bool, str]:
        return True, "runs in this process (kernels, or their references without a GPU)"

    def export(
        self,
        gm: torch.fx.GraphModule,
        inputs: Sequence[torch.Tensor] | None,
        out: str | os.PathLike[str],
        **options: Any,
    ) -> Exported:
        lowered = compile(gm, warn=False, **options)
        folder = Path(out) / "triton"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "graph.py").write_text(lowered.graph_module.code)
        plan = {"device": lowered.device, "kernels_run": lowered.kernels_run, "nodes": lowered.plan}
        (folder / "plan.json").write_text(json.dumps(plan, indent=2))
        info = {"device": lowered.device, "kernels_run": lowered.kernels_run}
        info["missing"] = lowered.missing
        return Exported(self.name, folder, lowered, info, example_inputs(gm, inputs))

    def check(
        self,
        gm: torch.fx.GraphModule,
        exported: Exported,
        inputs: Sequence[torch.Tensor] | None = None,
    ) -> Any:
        from rewriter.verify import compare_outputs, graph_reference, outputs, run

        args, reference = graph_reference(gm, exported.inputs if inputs is None else inputs)
        got = run(_runner(exported.result), args, trace_info(gm))
        return compare_outputs(reference, outputs(got), None, None)

    def measure(
        self,
        exported: Exported,
        inputs: Sequence[torch.Tensor] | None = None,
        *,
        repeats: int = 10,
    ) -> Measurement:
        from rewriter.verify import run

        args = tuple(exported.inputs if inputs is None else inputs)
        runner, info = _runner(exported.result), trace_info(exported.result.graph_module)

        def call() -> None:
            run(runner, args, info)

        median, low, high = time_calls(call, repeats)
        details = {"device": exported.result.device, "kernels_run": exported.result.kernels_run}
        return Measurement(
            self.name, median, low, high, repeats, artifact_bytes(exported.path), details
        )


def _runner(lowered: TritonGraph) -> torch.nn.Module:
    return lowered.compiled if lowered.compiled is not None else lowered.graph_module
