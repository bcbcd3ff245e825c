"""Versions of a tensor, and how a version becomes bytes in a safetensors file.

A tensor of a streamed graph is a *version*: :class:`Stored` (as it lies in the checkpoint or a
spill file), :class:`Held` (computed by a pass, in memory) or :class:`Computed` (an edit over the
versions its reads had when it was recorded). :func:`write_file` writes versions to one
safetensors file, evaluating computed ones row block by row block (the spill files of
:class:`rewriter.checkpoint.store.Plan` and the shards :func:`rewriter.checkpoint.write_checkpoint`
writes).
"""

from __future__ import annotations

import dataclasses
import json
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from rewriter.checkpoint.memory import trim_heap
from rewriter.checkpoint.shards import DTYPE_NAMES, Shards
from rewriter.ir.store import Edit, WeightStore, row_blocks

if TYPE_CHECKING:
    from rewriter.checkpoint.store import Plan

__all__ = ["Computed", "Held", "Reads", "Stored", "Version", "nbytes_of", "write_file"]


@dataclasses.dataclass(eq=False)
class Stored:
    """A tensor as it lies in a checkpoint (or a spill file)."""

    shards: Shards
    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclasses.dataclass(eq=False)
class Held:
    """A tensor a pass computed (small ones stay in memory)."""

    tensor: torch.Tensor
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclasses.dataclass(eq=False)
class Computed:
    """``edit`` over the versions its reads had when it was recorded."""

    edit: Edit
    reads: dict[str, Version]
    shape: tuple[int, ...]
    dtype: torch.dtype


Version = Stored | Held | Computed


def nbytes_of(version: Version) -> int:
    """Bytes of the tensor of ``version``."""
    count = 1
    for size in version.shape:
        count *= size
    return count * torch.empty((), dtype=version.dtype).element_size()


class Reads(WeightStore):
    """The tensors one computed version reads, by the names its edit uses: stored ones as views
    of the mapping, computed ones evaluated whole (and kept until this evaluation ends)."""

    def __init__(self, plan: Plan, version: Computed) -> None:
        self.plan = plan
        self.version = version
        self.block_bytes = plan.block_bytes
        self._values: dict[str, torch.Tensor] = {}

    def read(self, name: str) -> torch.Tensor:
        if name not in self._values:
            read = self.version.reads[name]
            if isinstance(read, Stored):
                return read.shards.view(read.key)
            self._values[name] = self.plan.value(read)
        return self._values[name]

    def names(self) -> list[str]:
        return list(self.version.reads)

    def __contains__(self, name: str) -> bool:
        return name in self.version.reads

    def shape(self, name: str) -> tuple[int, ...]:
        return self.version.reads[name].shape

    def dtype(self, name: str) -> torch.dtype:
        return self.version.reads[name].dtype

    def release(self) -> None:
        for read in self.version.reads.values():
            if isinstance(read, Stored):
                read.shards.release(read.key)


def write_file(
    path: Path, contents: dict[str, Version], plan: Plan | None, bar: Any = None
) -> None:
    """One safetensors file; tensors sorted by element size so every one stays aligned."""
    order = sorted(contents, key=lambda n: -torch.empty((), dtype=contents[n].dtype).element_size())
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in order:
        version = contents[name]
        nbytes = nbytes_of(version)
        header[name] = {
            "dtype": DTYPE_NAMES[version.dtype],
            "shape": list(version.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    tmp = path.with_suffix(".partial")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for name in order:
            _write_tensor(f, contents[name], plan, bar)
    tmp.replace(path)


def _write_tensor(f: Any, version: Version, plan: Plan | None, bar: Any) -> None:
    # Written in this thread: a writer thread overlapping the next block's computation was
    # measured no faster on 2 cores (copying into the page cache competes for the same CPUs).
    def emit(rows: torch.Tensor) -> None:
        data = rows.contiguous().reshape(-1).view(torch.uint8).numpy()
        f.write(memoryview(data))
        if bar is not None:
            bar.update(data.nbytes)

    if nbytes_of(version) == 0:
        return
    trim_heap()
    if isinstance(version, Held):
        emit(version.tensor)
    elif isinstance(version, Stored):
        view = version.shards.view(version.key)
        block_bytes = plan.block_bytes if plan is not None else WeightStore.block_bytes
        for start, stop in row_blocks(version.shape, block_bytes):
            emit(view[start:stop] if view.dim() > 1 else view)
            version.shards.release(version.key)
    else:
        assert plan is not None
        plan.evaluate(version, lambda start, stop, rows: emit(rows))
