"""The whole streaming run: rewrite a Hugging Face checkpoint larger than memory with a
pipeline, shard by shard (``rewriter run --stream``).

:func:`rewrite_checkpoint` traces the architecture on the meta device
(:func:`rewriter.trace_weightless`), attaches the checkpoint (:func:`rewriter.open_checkpoint`),
runs the pipeline, which records its edits instead of computing them, writes the sharded weights
(:func:`rewriter.write_checkpoint`) and saves the weightless graph (:func:`rewriter.save`). It
lives in the io layer, above the pipeline it drives and the serializer it saves with; the
checkpoint machinery it uses is the layer :mod:`rewriter.checkpoint` below both.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from rewriter.checkpoint import (
    DEFAULT_SHARD_BYTES,
    ResidentPeak,
    StreamRun,
    open_checkpoint,
    write_checkpoint,
)
from rewriter.context import PassContext
from rewriter.io.serialize import save
from rewriter.ir.weightless import trace_weightless
from rewriter.pipeline import Pipeline

__all__ = ["StreamRun", "rewrite_checkpoint"]


def rewrite_checkpoint(
    source: str | os.PathLike[str],
    spec: Any,
    out: str | os.PathLike[str],
    *,
    ctx: Any = None,
    seq: int = 8,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: bool = True,
    save_graph: bool = True,
) -> StreamRun:
    """Rewrite the Hugging Face checkpoint directory ``source`` with the pipeline ``spec``
    without loading it: trace its config on the meta device, record the passes' edits against
    the memory-mapped shards, then write ``out``: sharded safetensors (evaluated tensor by
    tensor) and, with ``save_graph``, the rewritten weightless graph as ``model.pt2``. Load the
    result with ``rewriter.load(out / "model.pt2", out)``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pipeline = Pipeline.parse(spec) if isinstance(spec, str) else spec
    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(phase: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[phase] = now - clock
        clock = now

    with ResidentPeak() as peak:
        gm = trace_weightless(source, seq=seq)
        plan = open_checkpoint(gm, source, spill_dir=out)
        lap("trace")
        try:
            result = Pipeline.run(pipeline, gm, ctx if ctx is not None else PassContext(seed=0))
            lap("passes")
            written = write_checkpoint(
                result.graph_module, out, shard_bytes=shard_bytes, progress=progress
            )
            lap("write")
        finally:
            plan.close()
        graph_path = save(result.graph_module, out / "model.pt2") if save_graph else None
        lap("save")
    largest = max((e.nbytes for e in plan.shards.entries.values()), default=0)
    return StreamRun(result, written, peak.growth, largest, graph_path, seconds)
