"""Writing a graph's tensors as sharded safetensors, and what a write (or a whole streamed
run) measured.

:func:`write_checkpoint` evaluates each tensor's version as it is written, row block by row
block with the same block loop as the in-memory store (so the weights are bit-identical to an
in-memory rewrite); an unchanged tensor is copied from the mapping block by block. A version
read by a later edit is evaluated whole for that edit and dropped after it. Memory: one float64
block plus the whole versions its reads need (none for a first edit of a stored tensor).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.fx

from rewriter.checkpoint.shards import INDEX_FILE
from rewriter.checkpoint.store import LazyStore
from rewriter.checkpoint.versions import Held, Version, nbytes_of, write_file
from rewriter.errors import PreconditionError
from rewriter.ir.store import weights
from rewriter.ir.tensors import alias_groups

__all__ = ["DEFAULT_SHARD_BYTES", "StreamRun", "Written", "write_checkpoint"]

DEFAULT_SHARD_BYTES = 2 * 2**30


@dataclasses.dataclass
class Written:
    """What :func:`write_checkpoint` wrote, with its measurements."""

    directory: Path
    files: list[Path]
    tensors: int
    bytes_written: int
    bytes_read: int
    largest_tensor: int
    seconds: float
    aliases: dict[str, str]

    @property
    def throughput(self) -> float:
        """Bytes per second: the larger of the checkpoint bytes read (each tensor once) and the
        bytes written, over the time taken."""
        return max(self.bytes_written, self.bytes_read) / max(self.seconds, 1e-9)

    def to_dict(self) -> dict[str, Any]:
        return {
            "directory": str(self.directory),
            "files": [p.name for p in self.files],
            "tensors": self.tensors,
            "bytes_written": self.bytes_written,
            "bytes_read": self.bytes_read,
            "largest_tensor_bytes": self.largest_tensor,
            "seconds": self.seconds,
            "throughput_mb_s": self.throughput / 1e6,
        }


def write_checkpoint(
    gm: torch.fx.GraphModule,
    directory: str | os.PathLike[str],
    *,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: bool = True,
) -> Written:
    """Write the tensors of ``gm`` as sharded safetensors with ``model.safetensors.index.json``.

    For a graph with a checkpoint plan each tensor is evaluated as it is written (row blocks of
    its edits, or copied block by block when unchanged); for an in-memory graph the tensors are
    written as they are. A tied tensor is written once; its other names are in the index
    (``metadata.aliases``), and :func:`bind` restores the tie.
    """
    start_time = time.perf_counter()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    store = weights(gm)
    groups = alias_groups(gm)
    versions: dict[str, Version] = {}
    aliases: dict[str, str] = {}
    for names, tensor in groups:
        versions[names[0]] = (
            store.version(names[0])
            if isinstance(store, LazyStore)
            else Held(tensor.detach(), tuple(tensor.shape), tensor.dtype)
        )
        for other in names[1:]:
            aliases[other] = names[0]
    if not isinstance(store, LazyStore) and any(t.device.type == "meta" for _, t in groups):
        raise PreconditionError(
            "this weightless graph has no checkpoint attached: rewriter.open_checkpoint(gm, dir) "
            "before running passes, then write"
        )
    plan = store.plan if isinstance(store, LazyStore) else None
    # Shards of at most shard_bytes, tensors in graph order.
    shards: list[dict[str, Version]] = [{}]
    size = 0
    for name, version in versions.items():
        nbytes = nbytes_of(version)
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = version
        size += nbytes
    total = sum(nbytes_of(v) for v in versions.values())
    count = len(shards)
    files = [
        directory
        / (f"model-{i + 1:05d}-of-{count:05d}.safetensors" if count > 1 else "model.safetensors")
        for i in range(count)
    ]
    bar = _progress(total, progress)
    sources: dict[tuple[int, str], int] = {}
    try:
        for file, contents in zip(files, shards):
            write_file(file, contents, plan, bar)
            if plan is not None:
                for version in contents.values():
                    plan.sources(version, sources)
    finally:
        bar.close()
    read = sum(sources.values())
    weight_map = {name: file.name for file, contents in zip(files, shards) for name in contents}
    index = {
        "metadata": {"total_size": total, "format": "rewriter", "aliases": aliases},
        "weight_map": {**weight_map, **{a: weight_map[c] for a, c in aliases.items()}},
    }
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2))
    if plan is not None:
        plan.shards.release()
    return Written(
        directory,
        files,
        len(versions),
        total,
        read,
        max((nbytes_of(v) for v in versions.values()), default=0),
        time.perf_counter() - start_time,
        aliases,
    )


def _progress(total: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        desc="writing weights",
        disable=not enabled,
        leave=False,
    )


@dataclasses.dataclass
class StreamRun:
    """A streamed rewrite (:func:`rewriter.io.streaming.rewrite_checkpoint`): the pipeline's
    result (on the weightless graph), what was written, and the resident-set growth against the
    largest tensor read or written."""

    result: Any
    written: Written
    rss_growth: int
    largest_input: int
    graph_path: Path | None
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    """Wall time per phase: trace, passes, write, save (the graph)."""

    @property
    def largest_tensor(self) -> int:
        return max(self.largest_input, self.written.largest_tensor)

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.written.to_dict(),
            "graph": str(self.graph_path) if self.graph_path else None,
            "rss_growth_bytes": self.rss_growth,
            "largest_input_tensor_bytes": self.largest_input,
            "rss_growth_over_largest_tensor": self.rss_growth / max(self.largest_tensor, 1),
            "phase_seconds": self.seconds,
        }

    def summary(self) -> str:
        mb = 1e6
        return (
            f"wrote {self.written.tensors} tensors ({self.written.bytes_written / mb:.1f} MB, "
            f"{len(self.written.files)} shards) in {self.written.seconds:.1f}s "
            f"({self.written.throughput / mb:.0f} MB/s); resident set grew "
            f"{self.rss_growth / mb:.1f} MB, largest tensor {self.largest_tensor / mb:.1f} MB"
        )
