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

from rewriter.errors import LoadError, RewriterError

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
            raise LoadError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (size,) = struct.unpack("<Q", raw)
        if size > 100 * 2**20:
            raise LoadError(f"{path}: not a safetensors file (header of {size} bytes)")
        text = f.read(size)
        try:
            header = json.loads(text)
        except ValueError as e:
            raise LoadError(f"{path}: not a safetensors file ({e})") from e
    if len(text) != size or not isinstance(header, dict):
        raise LoadError(f"{path}: not a safetensors file (truncated or malformed header)")
    _validate(path, header, path.stat().st_size - 8 - size)
    return header, 8 + size


def _validate(path: Path, header: dict[str, Any], data_bytes: int) -> None:
    """Check a header as the ``safetensors`` library does before it trusts one: every tensor's
    byte range matches its dtype and shape, the ranges tile the data section without gaps or
    overlaps, and the data section ends where the file ends. A header that lies would otherwise
    make one tensor's bytes another's (an overlapping pair was accepted before this check)."""
    metadata = header.get("__metadata__")
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
    ):
        raise LoadError(f"{path}: '__metadata__' must map names to strings")
    ranges = []
    for key, info in header.items():
        if key == "__metadata__":
            continue
        where = f"{path}: tensor '{key}'"
        if not isinstance(info, dict) or info.get("dtype") not in DTYPES:
            dtype = info.get("dtype") if isinstance(info, dict) else info
            raise LoadError(f"{where} has unsupported dtype {dtype}")
        shape, offsets = info.get("shape"), info.get("data_offsets")
        if not (isinstance(shape, list) and all(_natural(n) for n in shape)):
            raise LoadError(f"{where}: shape {shape!r} is not a list of sizes")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_natural, offsets))):
            raise LoadError(f"{where}: data_offsets {offsets!r} is not a [begin, end] pair")
        begin, end = offsets
        count = 1
        for n in shape:
            count *= n
        nbytes = count * DTYPES[info["dtype"]].itemsize
        if end - begin != nbytes:
            raise LoadError(
                f"{where}: data_offsets {offsets} hold {end - begin} bytes; "
                f"{info['dtype']} {shape} needs {nbytes}"
            )
        ranges.append((begin, end, key))
    position = 0
    for begin, end, key in sorted(ranges):
        if begin != position:
            kind = "overlaps the tensor before it" if begin < position else "leaves a gap"
            raise LoadError(f"{path}: tensor '{key}' at bytes {begin}..{end} {kind}")
        position = end
    if position != data_bytes:
        raise LoadError(
            f"{path}: the tensors end at byte {position} of a {data_bytes}-byte data section"
        )


def _natural(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _index_files(source: Path) -> list[Path]:
    """The shards ``model.safetensors.index.json`` names: files inside ``source`` only."""
    index = source / INDEX_FILE
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        names = set(weight_map.values())
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise LoadError(f"{index}: not a safetensors index ({e})") from None
    root = source.resolve()
    files = []
    for name in sorted(names):
        file = (source / str(name)).resolve()
        if not isinstance(name, str) or Path(name).is_absolute() or not file.is_relative_to(root):
            raise LoadError(f"{index}: shard {name!r} is outside the model folder {source}")
        if not file.is_file():
            raise LoadError(f"{index}: shard {name!r} does not exist")
        files.append(source / name)
    return files


class Shards:
    """The tensors of a safetensors checkpoint: a file, or a directory of shards (with or
    without ``model.safetensors.index.json``), read lazily through memory maps."""

    def __init__(self, source: str | os.PathLike[str]) -> None:
        source = Path(source)
        if source.is_dir():
            index = source / INDEX_FILE
            if index.exists():
                files = _index_files(source)
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
                if key in self.entries:
                    raise LoadError(f"{file}: tensor '{key}' is also in {self.entries[key].file}")
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
