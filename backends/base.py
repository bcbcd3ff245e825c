"""The one interface every backend implements, and what its methods return.

A backend lowers a (rewritten) graph to a runtime or a project and checks the result against
the graph. The CLI's ``--backend`` and the search in ``rewriter optimize`` use backends only
through this interface, looked up by name in the registry (:mod:`rewriter.backends`):

* :attr:`Backend.name`, :attr:`Backend.summary`: how users name and recognise it;
* :meth:`Backend.available`: whether it runs on this machine, and why not;
* :meth:`Backend.native`: the ``rewriter::`` ops it lowers natively; every other ``rewriter::`` op
  goes through its ATen decomposition (:func:`rewriter.ops.check_lowerable`, :meth:`plan`);
* :meth:`Backend.export`: write the artifact for ``gm`` into a folder (an :class:`Exported`);
* :meth:`Backend.check`: run the artifact and the graph on the same inputs (an error report under
  ``rewriter.verify``'s tolerance rule); :meth:`Backend.checkable` says beforehand whether it can
  here;
* :meth:`Backend.measure`: what the artifact costs (a :class:`Measurement`: latency where it runs
  here, bytes on disk, backend-specific figures), the hook a search optimizes.

Each backend keeps its own full Python API (``rewriter.backends.onnx.export`` with every option,
``session``, ``export_causal_lm``, ...); the interface is the part they share.
"""

from __future__ import annotations

import abc
import dataclasses
import statistics
import time
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch

__all__ = ["Backend", "Exported", "Measurement", "time_calls"]


@dataclasses.dataclass
class Exported:
    """What :meth:`Backend.export` wrote: where, and the backend's own result object."""

    backend: str
    path: Path
    """The artifact (a file, or a project folder)."""
    result: Any
    """The backend's own export result (``OnnxExport``, ``MlirExport``, ``HlsProject``, ...)."""
    info: dict[str, Any] = dataclasses.field(default_factory=dict)
    """A JSON-ready summary for reports (opset, dialect, lowering plan, notes, ...)."""
    inputs: tuple[torch.Tensor, ...] = ()
    """The inputs the export was made for (the default inputs of ``check`` and ``measure``)."""


@dataclasses.dataclass
class Measurement:
    """What an artifact costs. Latencies are per call, in seconds, over ``repeats`` timed calls
    after one warm-up call; ``None`` where the backend cannot run the artifact here."""

    backend: str
    latency_s: float | None
    """Median latency of one call."""
    latency_min_s: float | None
    latency_max_s: float | None
    repeats: int
    bytes: int
    """Size of the artifact on disk (every file of it)."""
    details: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Backend-specific figures (modelled DSPs and BRAM of an HLS design, threads, ...)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        size = f"{self.bytes / 1e6:.2f} MB"
        if self.latency_s is None:
            return f"{self.backend}: {size}, latency not measured here"
        return (
            f"{self.backend}: {self.latency_s * 1e3:.2f} ms per call (min "
            f"{self.latency_min_s * 1e3:.2f}, max {self.latency_max_s * 1e3:.2f}, "  # type: ignore[operator]
            f"{self.repeats} calls), {size}"
        )


def time_calls(call: Callable[[], Any], repeats: int) -> tuple[float, float, float]:
    """(median, min, max) seconds of ``call()`` over ``repeats`` calls after one warm-up."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times), max(times)


def artifact_bytes(path: Path) -> int:
    """Bytes of a file, or of every file under a folder."""
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size if path.exists() else 0


class Backend(abc.ABC):
    """A lowering target (see the module docstring). Subclasses set :attr:`name` (kebab-case)
    and :attr:`summary`, and implement :meth:`available`, :meth:`native`, :meth:`export`,
    :meth:`check` and :meth:`measure`; register third-party ones with
    :func:`rewriter.register_backend`."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    label: ClassVar[str] = ""
    """What runs the artifact, as reports print it ("ONNX Runtime vs the graph: ...")."""
    options: ClassVar[tuple[str, ...]] = ()
    """Keyword options of :meth:`export` the CLI passes through (``--dialect`` -> ``dialect``)."""
    streams: ClassVar[bool] = False
    """Whether :meth:`export` takes ``large=True`` (weights stored outside the artifact), which
    ``rewriter run --stream`` needs."""

    @abc.abstractmethod
    def available(self) -> tuple[bool, str]:
        """(runs here, what it runs on or why not)."""

    @abc.abstractmethod
    def native(self) -> Collection[str]:
        """Names of the ``rewriter::`` ops lowered natively (others are decomposed)."""

    def plan(self, gm: torch.fx.GraphModule) -> dict[str, str]:
        """How each ``rewriter::`` op of ``gm`` is taken: ``"native"`` or ``"decomposed"``
        (a ``LoweringError`` naming the op and node when neither is possible)."""
        from rewriter.ops import check_lowerable

        return check_lowerable(gm, self.name, self.native())

    @abc.abstractmethod
    def export(
        self,
        gm: torch.fx.GraphModule,
        inputs: Sequence[torch.Tensor] | None,
        out: str | Path,
        **options: Any,
    ) -> Exported:
        """Write the artifact of ``gm`` (not changed) into the folder ``out``; ``inputs``
        default to the trace's example inputs."""

    def checkable(self, exported: Exported) -> tuple[bool, str]:
        """Whether :meth:`check` can run this artifact here, and why not."""
        return self.available()

    @abc.abstractmethod
    def check(
        self,
        gm: torch.fx.GraphModule,
        exported: Exported,
        inputs: Sequence[torch.Tensor] | None = None,
    ) -> Any:
        """Run the artifact and ``gm`` on ``inputs`` (default: the trace's example inputs);
        a ``rewriter.verify.ErrorReport``."""

    @abc.abstractmethod
    def measure(
        self,
        exported: Exported,
        inputs: Sequence[torch.Tensor] | None = None,
        *,
        repeats: int = 10,
    ) -> Measurement:
        """Latency of the artifact on ``inputs`` where it runs here, and its size."""

    def __repr__(self) -> str:
        return f"<backend {self.name}: {self.summary}>"


def example_inputs(gm: torch.fx.GraphModule, inputs: Sequence[torch.Tensor] | None) -> tuple:
    """``inputs``, or the trace's example inputs."""
    if inputs is not None:
        return tuple(inputs)
    from rewriter.ir.trace import trace_info

    info = trace_info(gm)
    if info is None:
        from rewriter.errors import LoweringError

        raise LoweringError("this graph has no trace record: pass example inputs explicitly")
    return tuple(info.example_inputs)
