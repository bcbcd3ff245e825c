"""Reading safetensors checkpoints through memory maps.

:class:`Shards` reads a checkpoint (one file or a sharded directory) lazily. A tensor is a
zero-copy view of the mapping; :meth:`Shards.release` gives its pages back to the kernel
(``MADV_DONTNEED``), so the resident set holds only what is being read right now.
"""

from __future__ import annotations

import dataclasses
import json
import mmap
import os
import struct
from pathlib import Path
from typing import Any

import torch

from rewriter.errors import RewriterError

__all__ = ["DTYPES", "DTYPE_NAMES", "INDEX_FILE", "Entry", "Shards"]

INDEX_FILE = "model.safetensors.index.json"

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
"""The safetensors name of each dtype (``torch.float32: "F32"``)."""
_PAGE = mmap.PAGESIZE


# --- reading safetensors through memory maps --------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Entry:
    """Where one tensor lies: file, dtype, shape and absolute byte range."""

    file: Path
    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    stop: int

    @property
    def nbytes(self) -> int:
        return self.stop - self.start


def _header(path: Path) -> tuple[dict[str, Any], int]:
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise RewriterError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (size,) = struct.unpack("<Q", raw)
        if size > 100 * 2**20:
            raise RewriterError(f"{path}: not a safetensors file (header of {size} bytes)")
        try:
            header = json.loads(f.read(size))
        except ValueError as e:
            raise RewriterError(f"{path}: not a safetensors file ({e})") from e
    return header, 8 + size


class Shards:
    """The tensors of a safetensors checkpoint: a file, or a directory of shards (with or
    without ``model.safetensors.index.json``), read lazily through memory maps."""

    def __init__(self, source: str | os.PathLike[str]) -> None:
        source = Path(source)
        if source.is_dir():
            index = source / INDEX_FILE
            if index.exists():
                files = sorted(
                    {source / f for f in json.loads(index.read_text())["weight_map"].values()}
                )
            else:
                files = sorted(source.glob("*.safetensors"))
        else:
            files = [source]
        if not files:
            raise RewriterError(f"{source}: no safetensors files there")
        self.files = files
        self.entries: dict[str, Entry] = {}
        self.metadata: dict[str, str] = {}
        for file in files:
            header, data_start = _header(file)
            self.metadata.update(header.pop("__metadata__", None) or {})
            for key, info in header.items():
                if info["dtype"] not in DTYPES:
                    raise RewriterError(
                        f"{file}: tensor '{key}' has unsupported dtype {info['dtype']}"
                    )
                lo, hi = info["data_offsets"]
                self.entries[key] = Entry(
                    file,
                    key,
                    DTYPES[info["dtype"]],
                    tuple(info["shape"]),
                    data_start + lo,
                    data_start + hi,
                )
        self._maps: dict[Path, mmap.mmap] = {}

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def _map(self, file: Path) -> mmap.mmap:
        if file not in self._maps:
            with open(file, "rb") as f:
                # A private (copy-on-write) mapping is writable as far as Python knows, so torch
                # can view it without copying; nothing ever writes to it.
                self._maps[file] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        return self._maps[file]

    def view(self, key: str) -> torch.Tensor:
        """The tensor ``key`` as a zero-copy view of the mapping (pages load as they are read)."""
        entry = self.entries[key]
        count = 1
        for size in entry.shape:
            count *= size
        if count == 0:
            return torch.empty(entry.shape, dtype=entry.dtype)
        flat = torch.frombuffer(
            self._map(entry.file), dtype=entry.dtype, count=count, offset=entry.start
        )
        return flat.view(entry.shape)

    def release(self, key: str | None = None) -> None:
        """Give the pages of ``key`` (of every mapped tensor when None) back to the kernel."""
        entries = [self.entries[key]] if key is not None else None
        for file, mapped in self._maps.items():
            ranges = (
                [(e.start, e.stop) for e in entries if e.file == file]
                if entries is not None
                else [(0, len(mapped))]
            )
            for start, stop in ranges:
                lo = start - start % _PAGE
                if stop > lo:
                    mapped.madvise(mmap.MADV_DONTNEED, lo, min(stop, len(mapped)) - lo)

    def close(self) -> None:
        for mapped in self._maps.values():
            mapped.close()
        self._maps.clear()
