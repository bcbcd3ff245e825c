"""The HLS project through the shared backend interface (:mod:`rewriter.backends.base`)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.fx
from rewriter.backends.base import Backend, Exported, Measurement, artifact_bytes, example_inputs
from rewriter.backends.hls.project import ap_types_dir, export, native
from rewriter.backends.hls.simulation import csim, port_values

from rewriter.errors import LoweringError

__all__ = ["CHECK_LSBS", "HlsBackend"]

CHECK_LSBS = 20
""":meth:`HlsBackend.check`'s default bound, in units of the data type's last bit: 2e-2 at
ap_fixed<18,8>, what a GPT-2 block's csim is held to in tests/test_hls.py."""


class HlsBackend(Backend):
    """The HLS project through the shared interface: the project folder ``out/hls``, static
    shapes of the inputs; checked by the g++ C simulation; measured as its modelled resources
    (a latency needs the vendor's synthesis, which does not run here)."""

    name = "hls"
    summary = "an FPGA HLS project (ap_fixed), C-simulated with g++"
    label = "HLS C simulation"
    options = ("precision", "reuse_factor", "io", "subgraph")

    def available(self) -> tuple[bool, str]:
        if shutil.which("g++") is None:
            return False, "C simulation needs g++ on the PATH"
        try:
            ap_types_dir()
        except LoweringError as error:
            return False, str(error)
        return True, "g++ C simulation with hls4ml's ap_types"

    def native(self) -> frozenset[str]:
        return native()

    def export(
        self,
        gm: torch.fx.GraphModule,
        inputs: Sequence[torch.Tensor] | None,
        out: str | os.PathLike[str],
        **options: Any,
    ) -> Exported:
        args = example_inputs(gm, inputs)
        project = export(gm, args, Path(out) / "hls", **options)
        info = {
            "directory": str(project.directory),
            "precision": project.precision.as_dict(),
            "resources": project.resources.get("total"),
        }
        return Exported(self.name, project.directory, project, info, args)

    def check(
        self,
        gm: torch.fx.GraphModule,
        exported: Exported,
        inputs: Sequence[torch.Tensor] | None = None,
        *,
        atol: float | None = None,
    ) -> Any:
        """The C simulation against ``gm`` at the project's ports; held to ``atol`` (default
        :data:`CHECK_LSBS` last bits of the data type), not the float tolerance rule."""
        from rewriter.verify import compare_outputs

        project = exported.result
        args = exported.inputs if inputs is None else tuple(inputs)
        feeds, wants = port_values(gm, args, project)
        gots = csim(project.directory, feeds)
        if atol is None:
            atol = CHECK_LSBS * 2.0**-project.precision.data.fraction
        return compare_outputs([w.double() for w in wants], gots, 0.0, atol)

    def measure(
        self,
        exported: Exported,
        inputs: Sequence[torch.Tensor] | None = None,
        *,
        repeats: int = 10,
    ) -> Measurement:
        project = exported.result
        total = dict(project.resources.get("total") or {})
        return Measurement(self.name, None, None, None, 0, artifact_bytes(project.directory), total)
