"""Checkpoints larger than memory: rewrite a safetensors checkpoint shard by shard.

The pieces, in the order a streaming run uses them:

* :class:`Shards` reads a safetensors checkpoint (one file or a sharded directory) through
  memory maps. A tensor is a zero-copy view of the mapping; :meth:`Shards.release` gives its
  pages back to the kernel (``MADV_DONTNEED``), so the resident set holds only what is being
  read right now.
* :func:`open_checkpoint` attaches a :class:`Plan` to a weightless graph
  (:func:`rewriter.trace_weightless`): every tensor of the graph gets a *version*, first the
  stored tensor of the checkpoint (buffers that no checkpoint holds, like the rotary
  ``inv_freq``, are recomputed from the config). From then on :func:`rewriter.store.weights`
  gives the passes a :class:`LazyStore`: an edit is recorded as a new version (its reads are the
  versions current when it was recorded) and checked on meta tensors, not computed. Tensors a
  pass computes itself (packed codes) are held, and spilled to disk when large. A pass that
  reads a value (quantization) gets the evaluated version, one tensor at a time.
* :func:`write_checkpoint` writes the graph's tensors to sharded safetensors. Each tensor's
  version is evaluated as it is written, row block by row block with the same block loop as the
  in-memory store (so the weights are bit-identical to an in-memory rewrite); an unchanged
  tensor is copied from the mapping block by block. A version read by a later edit is
  evaluated whole for that edit and dropped after it.
* :func:`bind` (and ``rewriter.load(pt2, weights_dir)``) puts written weights into a weightless
  graph and moves the device constants the meta trace baked in to the weights' device.

Memory: a pass holds at most the tensors one edit reads; writing holds one float64 block plus
the whole versions its reads need (none for a first edit of a stored tensor).
"""

from __future__ import annotations

import dataclasses
import json
import mmap
import os
import struct
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.fx

from rewriter.errors import PreconditionError, RewriterError
from rewriter.ir.graph import get_tensor, set_tensor
from rewriter.ir.store import (
    STORE_KEY,
    Block,
    Edit,
    ModuleStore,
    WeightStore,
    check_rows,
    row_blocks,
)

__all__ = [
    "LazyStore",
    "Plan",
    "ResidentPeak",
    "Shards",
    "StreamRun",
    "Written",
    "bind",
    "open_checkpoint",
    "rewrite_checkpoint",
    "write_checkpoint",
]

INDEX_FILE = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 2 * 2**30
SPILL_BYTES = 1 * 2**20
"""Tensors a pass computes are held in memory up to this size, and spilled to disk above it."""

_DTYPES = {
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
_NAMES = {v: k for k, v in _DTYPES.items()}
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
                if info["dtype"] not in _DTYPES:
                    raise RewriterError(
                        f"{file}: tensor '{key}' has unsupported dtype {info['dtype']}"
                    )
                lo, hi = info["data_offsets"]
                self.entries[key] = Entry(
                    file,
                    key,
                    _DTYPES[info["dtype"]],
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


# --- versions of a tensor -------------------------------------------------------------------


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


def _nbytes(version: Version) -> int:
    count = 1
    for size in version.shape:
        count *= size
    return count * torch.empty((), dtype=version.dtype).element_size()


class _Reads(WeightStore):
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


class _MetaReads(WeightStore):
    """Fake tensors for an edit's reads: running one block on them checks an edit's shapes
    when it is recorded, long before the checkpoint is written. (Fake CPU tensors, so an edit
    may mix them with real tensors it holds, like an adapter's factors or kept row indices.)"""

    def __init__(self, reads: dict[str, Version], block_bytes: int) -> None:
        self.reads = reads
        self.block_bytes = block_bytes

    def read(self, name: str) -> torch.Tensor:
        v = self.reads[name]
        return torch.empty(v.shape, dtype=v.dtype)

    def names(self) -> list[str]:
        return list(self.reads)

    def __contains__(self, name: str) -> bool:
        return name in self.reads


class Plan:
    """The versions of a weightless graph's tensors, keyed by the identity of the meta tensor
    bound in the graph (copies of a graph share tensors, so they share the plan)."""

    def __init__(
        self,
        shards: Shards,
        *,
        spill_dir: str | os.PathLike[str] | None = None,
        spill_bytes: int = SPILL_BYTES,
        block_bytes: int | None = None,
    ) -> None:
        self.shards = shards
        self.spill_bytes = spill_bytes
        self.block_bytes = block_bytes or WeightStore.block_bytes
        self._spill_root = spill_dir
        self._spill_dir: Path | None = None
        self._spills = 0
        self._versions: dict[int, tuple[torch.Tensor, Version]] = {}

    def close(self) -> None:
        """Unmap the checkpoint and delete the spill files."""
        import shutil

        for version in list(v for _, v in self._versions.values()):
            if isinstance(version, Stored) and version.shards is not self.shards:
                version.shards.close()
        self.shards.close()
        if self._spill_dir is not None:
            shutil.rmtree(self._spill_dir, ignore_errors=True)
            self._spill_dir = None

    def store_for(self, gm: torch.fx.GraphModule) -> LazyStore:
        """The weight store of ``gm`` (any copy of the graph this plan was attached to)."""
        return LazyStore(gm, self)

    def version_of(self, tensor: torch.Tensor, name: str = "") -> Version:
        entry = self._versions.get(id(tensor))
        if entry is None or entry[0] is not tensor:
            raise RewriterError(
                f"tensor '{name}' of this weightless graph has no value in the checkpoint plan "
                "(it was bound outside the weight store)"
            )
        return entry[1]

    def register(self, tensor: torch.Tensor, version: Version) -> None:
        self._versions[id(tensor)] = (tensor, version)

    def hold(self, tensor: torch.Tensor) -> Version:
        """A computed tensor: held in memory when small, written to a spill file when large."""
        tensor = tensor.detach()
        if tensor.device.type == "meta":
            raise PreconditionError(
                "a pass wrote a tensor with no value (meta) into a streamed checkpoint"
            )
        tensor = tensor.cpu().contiguous()
        version = Held(tensor, tuple(tensor.shape), tensor.dtype)
        if _nbytes(version) <= self.spill_bytes:
            return version
        if self._spill_dir is None:
            self._spill_dir = Path(tempfile.mkdtemp(prefix="rewriter-spill-", dir=self._spill_root))
        self._spills += 1
        path = self._spill_dir / f"spill-{self._spills:05d}.safetensors"
        _write_file(path, {"t": version}, self)
        return Stored(Shards(path), "t", version.shape, version.dtype)

    def value(self, version: Version) -> torch.Tensor:
        """The whole tensor of ``version`` in memory (a copy for stored tensors)."""
        trim_heap()  # what the previous reader freed goes back to the system first
        if isinstance(version, Held):
            return version.tensor
        if isinstance(version, Stored):
            value = version.shards.view(version.key).clone()
            version.shards.release(version.key)
            return value
        out = torch.empty(version.shape, dtype=version.dtype)

        def sink(start: int, stop: int, rows: torch.Tensor) -> None:
            if out.dim() > 1:
                out[start:stop] = rows
            else:
                out.copy_(rows)

        self.evaluate(version, sink)
        return out

    def evaluate(self, version: Computed, sink: Callable[[int, int, torch.Tensor], None]) -> None:
        """Run ``version``'s edit block by block (as :meth:`WeightStore.apply` does), handing
        each block, cast to the version's dtype, to ``sink(start, stop, rows)``."""
        reads = _Reads(self, version)
        try:
            reads.run(version.edit, version.shape, version.dtype, sink, after_block=reads.release)
        finally:
            reads.release()

    def sources(
        self, version: Version, into: dict[tuple[int, str], int] | None = None
    ) -> dict[tuple[int, str], int]:
        """The checkpoint tensors ``version`` reads, with their sizes (for throughput)."""
        into = {} if into is None else into
        if isinstance(version, Stored) and version.shards is self.shards:
            into[(id(version.shards), version.key)] = _nbytes(version)
        elif isinstance(version, Computed):
            for read in version.reads.values():
                self.sources(read, into)
        return into


def _written(block: Block) -> torch.Tensor:
    raise RewriterError("a written tensor is not recomputed from the log")


class LazyStore(ModuleStore):
    """The weight store of a weightless graph with a checkpoint plan: edits are recorded (and
    checked on meta tensors), reads evaluate, writes are held or spilled."""

    def __init__(self, gm: torch.fx.GraphModule, plan: Plan) -> None:
        super().__init__(gm)
        self.plan = plan
        self.block_bytes = plan.block_bytes

    def version(self, name: str) -> Version:
        return self.plan.version_of(get_tensor(self.gm, name), name)

    def read(self, name: str) -> torch.Tensor:
        return self.plan.value(self.version(name))

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(get_tensor(self.gm, name).shape)

    def dtype(self, name: str) -> torch.dtype:
        return get_tensor(self.gm, name).dtype

    def device(self, name: str) -> torch.device:
        return torch.device("cpu")

    def __contains__(self, name: str) -> bool:
        try:
            get_tensor(self.gm, name)
        except (AttributeError, KeyError):
            return False
        return True

    def apply(self, edit: Edit) -> torch.Tensor:
        for name in edit.reads:
            if name not in self:
                raise KeyError(f"edit of '{edit.target}' reads unknown tensor '{name}'")
        shape = tuple(edit.shape if edit.shape is not None else self.shape(edit.target))
        dtype = edit.dtype if edit.dtype is not None else self.dtype(edit.target)
        reads = {name: self.version(name) for name in edit.reads}
        self._check(edit, reads, shape)
        bound = self._write(edit.target, Computed(edit, reads, shape, dtype))
        self.log.append(edit)
        return bound

    def write(self, name: str, tensor: torch.Tensor, note: str = "") -> None:
        parameter = isinstance(tensor, torch.nn.Parameter)
        version = self.plan.hold(tensor)
        self._write(name, version, parameter, tensor.requires_grad)
        # The log names the write; it must not keep the tensor alive (it may have been spilled).
        self.log.append(Edit(name, (), _written, version.shape, version.dtype, note))

    def copy(self, name: str, hint: str) -> str:
        """Untying: the new name gets the same version (a copy has the same value, and sharing
        the version means the copy is never materialized); later edits diverge the two."""
        new = self.fresh_name(hint)
        shape, dtype = self.shape(name), self.dtype(name)
        self._write(new, self.version(name), True, False)
        self.log.append(Edit(new, (name,), lambda block: block.rows(name), shape, dtype, "copy"))
        return new

    def own(self, name: str) -> torch.Tensor:
        raise PreconditionError(
            f"'{name}': training updates weights in place, which a streamed checkpoint cannot "
            "do; train on a loaded model"
        )

    def _write(  # type: ignore[override]
        self,
        name: str,
        version: Version,
        parameter: bool | None = None,
        requires_grad: bool = False,
    ) -> torch.Tensor:
        """Bind a meta tensor for ``version`` to ``name`` and its aliases (one object, so ties
        stay ties), a Parameter where the old tensor was one."""
        old = get_tensor(self.gm, name) if name in self else None
        if isinstance(old, torch.nn.Parameter):
            parameter, requires_grad = True, old.requires_grad
        elif parameter is None:
            parameter = old is None and version.dtype.is_floating_point
        meta = torch.empty(version.shape, dtype=version.dtype, device="meta")
        if parameter:
            floating = version.dtype.is_floating_point
            meta = torch.nn.Parameter(meta, requires_grad=requires_grad and floating)
        self.plan.register(meta, version)
        for alias in self.aliases(name) if old is not None else [name]:
            set_tensor(self.gm, alias, meta)
        return meta

    def _check(self, edit: Edit, reads: dict[str, Version], shape: tuple[int, ...]) -> None:
        """Run the edit's first block on fake tensors: a wrong shape fails in the pass that
        recorded the edit, not when the checkpoint is written."""
        from torch._subclasses.fake_tensor import FakeTensorMode

        probe = _MetaReads(reads, self.block_bytes)
        start, stop = next(iter(probe.blocks(shape)))
        with FakeTensorMode(allow_non_fake_inputs=True):
            value = edit.compute(Block(probe, edit, start, stop))
        check_rows(edit, value, shape, start, stop)


# --- attaching a checkpoint to a weightless graph ---------------------------------------------


def open_checkpoint(
    gm: torch.fx.GraphModule,
    source: str | os.PathLike[str] | Shards,
    *,
    spill_dir: str | os.PathLike[str] | None = None,
    config: Any = None,
) -> Plan:
    """Attach the safetensors checkpoint ``source`` to the weightless graph ``gm`` (in place):
    every tensor of the graph is matched by name (any alias of a tied tensor will do) and shape;
    buffers the checkpoint lacks are recomputed from the model's config."""
    from rewriter.ir.graph import is_weightless

    if not is_weightless(gm):
        raise PreconditionError(
            "open_checkpoint needs a weightless graph (rewriter.trace_weightless)"
        )
    shards = source if isinstance(source, Shards) else Shards(source)
    plan = Plan(shards, spill_dir=spill_dir)
    missing: dict[str, list[str]] = {}
    for names, tensor in _alias_groups(gm):
        key = next((n for n in names if n in shards), None)
        if key is None:
            missing[names[0]] = names
            continue
        entry = shards.entries[key]
        if entry.shape != tuple(tensor.shape):
            raise RewriterError(
                f"checkpoint tensor '{key}' has shape {entry.shape}, the graph expects "
                f"{tuple(tensor.shape)}"
            )
        if entry.dtype != tensor.dtype:
            raise RewriterError(
                f"checkpoint tensor '{key}' is {entry.dtype}, the graph was traced with "
                f"{tensor.dtype}: trace with trace_weightless(..., dtype={entry.dtype})"
            )
        plan.register(tensor, Stored(shards, key, entry.shape, entry.dtype))
    if missing:
        computed = _computed_buffers(gm, config, list(missing))
        for name, names in missing.items():
            value = computed.get(name)
            if value is None:
                raise RewriterError(
                    f"the checkpoint has no tensor '{name}' (nor its aliases {names[1:]}), and it "
                    "is not a buffer the model computes from its config"
                )
            plan.register(get_tensor(gm, name), plan.hold(value.to(get_tensor(gm, name).dtype)))
    gm.meta[STORE_KEY] = plan
    return plan


def _alias_groups(gm: torch.nn.Module) -> list[tuple[list[str], torch.Tensor]]:
    groups: dict[int, tuple[list[str], torch.Tensor]] = {}
    named = [
        *gm.named_parameters(remove_duplicate=False),
        *gm.named_buffers(remove_duplicate=False),
    ]
    for name, tensor in named:
        groups.setdefault(id(tensor), ([], tensor))[0].append(name)
    return list(groups.values())


def _computed_buffers(
    gm: torch.fx.GraphModule, config: Any, names: list[str]
) -> dict[str, torch.Tensor]:
    """Buffers a model computes in ``__init__`` (rotary ``inv_freq``): rebuilt by constructing
    the owning module again on the CPU from the model's config."""
    from rewriter.ir.trace import trace_info
    from rewriter.ir.weightless import architecture

    if config is None:
        info = trace_info(gm)
        if info is None or info.config is None:
            return {}
        config = info.config
    config, cls = architecture(config)
    with torch.device("meta"):
        model = cls(config)
    values: dict[str, torch.Tensor] = {}
    for name in names:
        owner_path, _, local = name.rpartition(".")
        try:
            owner = model.get_submodule(owner_path)
        except AttributeError:
            continue
        owner_config = getattr(owner, "config", None)
        if owner_config is None:
            continue
        try:
            fresh = type(owner)(owner_config)
        except TypeError:
            continue
        value = getattr(fresh, local, None)
        if isinstance(value, torch.Tensor) and value.device.type != "meta":
            values[name] = value.detach()
    return values


# --- writing --------------------------------------------------------------------------------


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
    from rewriter.ir.store import weights

    start_time = time.perf_counter()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    store = weights(gm)
    groups = _alias_groups(gm)
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
        nbytes = _nbytes(version)
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = version
        size += nbytes
    total = sum(_nbytes(v) for v in versions.values())
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
            _write_file(file, contents, plan, bar)
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
        max((_nbytes(v) for v in versions.values()), default=0),
        time.perf_counter() - start_time,
        aliases,
    )


def _write_file(
    path: Path, contents: dict[str, Version], plan: Plan | None, bar: Any = None
) -> None:
    """One safetensors file; tensors sorted by element size so every one stays aligned."""
    order = sorted(contents, key=lambda n: -torch.empty((), dtype=contents[n].dtype).element_size())
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in order:
        version = contents[name]
        nbytes = _nbytes(version)
        header[name] = {
            "dtype": _NAMES[version.dtype],
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

    if _nbytes(version) == 0:
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


# --- the whole streaming run -----------------------------------------------------------------


@dataclasses.dataclass
class StreamRun:
    """A streamed rewrite: the pipeline's result (on the weightless graph), what was written,
    and the resident-set growth against the largest tensor read or written."""

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
    from rewriter.context import PassContext
    from rewriter.io.serialize import save
    from rewriter.ir.weightless import trace_weightless
    from rewriter.pipeline import Pipeline

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


# --- binding written weights to a graph -------------------------------------------------------


def bind(
    gm: torch.fx.GraphModule,
    directory: str | os.PathLike[str],
    *,
    device: str | torch.device = "cpu",
) -> torch.fx.GraphModule:
    """Load the weights in ``directory`` (written by :func:`write_checkpoint`) into the
    weightless graph ``gm`` (in place), restoring ties, and move the graph's device constants
    from ``meta`` to ``device``. Returns ``gm``."""
    device = torch.device(device)
    shards = Shards(directory)
    index_file = Path(directory) / INDEX_FILE
    aliases: dict[str, str] = {}
    if index_file.exists():
        aliases = json.loads(index_file.read_text()).get("metadata", {}).get("aliases", {})
    loaded: dict[str, torch.Tensor] = {}
    missing = []
    for names, tensor in _alias_groups(gm):
        key = next((n for n in names if n in shards), None) or next(
            (aliases[n] for n in names if n in aliases and aliases[n] in shards), None
        )
        if key is None:
            missing.append(names[0])
            continue
        if key not in loaded:
            value = shards.view(key).to(device, copy=True)
            shards.release(key)
            if tuple(value.shape) != tuple(tensor.shape):
                raise RewriterError(
                    f"'{key}' in {directory} has shape {tuple(value.shape)}, the graph expects "
                    f"{tuple(tensor.shape)}"
                )
            loaded[key] = value
        value = loaded[key]
        if isinstance(tensor, torch.nn.Parameter):
            value = torch.nn.Parameter(value, requires_grad=False)
            loaded[key] = value
        for name in names:
            set_tensor(gm, name, value)
    shards.close()
    if missing:
        raise RewriterError(f"{directory} has no weights named {missing[:5]}")
    retarget_devices(gm, device)
    gm.meta.pop(STORE_KEY, None)
    return gm


def retarget_devices(gm: torch.fx.GraphModule, device: torch.device) -> int:
    """Point the ``device=meta`` arguments a meta trace baked into the graph (positions from
    ``arange``, casts) at ``device``. Returns how many nodes changed."""

    def swap(value: Any) -> Any:
        if isinstance(value, torch.device) and value.type == "meta":
            return device
        return value

    changed = 0
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        args = torch.fx.node.map_aggregate(node.args, swap)
        kwargs = torch.fx.node.map_aggregate(node.kwargs, swap)
        if args != node.args or kwargs != node.kwargs:
            node.args, node.kwargs = args, kwargs
            changed += 1
    if changed:
        gm.recompile()
    return changed


# --- memory ---------------------------------------------------------------------------------

_LIBC: Any = None


def trim_heap() -> None:
    """Return freed heap memory to the system (glibc ``malloc_trim``), where there is glibc.

    Passes free their working tensors tensor by tensor; glibc keeps freed blocks below its
    mmap threshold in the heap, so without a trim the resident set of a long streamed run
    creeps up to the sum of those holes. (A low fixed mmap threshold does the same but makes
    every block a fresh mapping: measured 5x slower quantization.) A trim costs well under a
    millisecond when there is little to return.
    """
    global _LIBC
    if _LIBC is None:
        import ctypes
        import ctypes.util

        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.malloc_trim  # noqa: B018 - glibc only
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


class ResidentPeak:
    """The growth of the resident set over its value on entry: ``growth`` (bytes) after the
    block. Uses the kernel's high-water mark, reset on entry (``/proc/self/clear_refs``); where
    that is unavailable, a sampling thread."""

    def __init__(self, interval: float = 0.01) -> None:
        self.interval = interval
        self.baseline = 0
        self.peak = 0
        self._thread: Any = None
        self._stop = False
        self._kernel = False

    def __enter__(self) -> ResidentPeak:
        self.baseline = _status("VmRSS")
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self._kernel = _status("VmHWM") > 0
        except OSError:
            self._kernel = False
        if not self._kernel:
            import threading

            self.peak = self.baseline

            def sample() -> None:
                while not self._stop:
                    self.peak = max(self.peak, _status("VmRSS"))
                    time.sleep(self.interval)

            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.sample()
        if self._thread is not None:
            self._stop = True
            self._thread.join()

    def sample(self) -> int:
        """The growth so far."""
        now = _status("VmHWM") if self._kernel else max(self.peak, _status("VmRSS"))
        self.peak = max(self.peak, now)
        return self.growth

    @property
    def growth(self) -> int:
        return max(0, self.peak - self.baseline)


def _status(field: str) -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    if field == "VmRSS":
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return 0
