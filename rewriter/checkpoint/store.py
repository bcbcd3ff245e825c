"""The lazy store: the weight store of a weightless graph with a checkpoint attached.

:class:`Plan` gives every tensor of the graph a version, keyed by the identity of the meta tensor
bound in the graph. :class:`LazyStore` is what :func:`rewriter.ir.store.weights` gives the passes
for such a graph: an edit is recorded as a new version (its reads are the versions current when
it was recorded) and checked on fake tensors, not computed. Tensors a pass computes itself (packed
codes) are held, and spilled to disk when large. A pass that reads a value (quantization) gets the
evaluated version, one tensor at a time.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
import torch.fx

from rewriter.checkpoint.memory import trim_heap
from rewriter.checkpoint.shards import Shards
from rewriter.checkpoint.versions import (
    Computed,
    Held,
    Reads,
    Stored,
    Version,
    nbytes_of,
    write_file,
)
from rewriter.errors import PreconditionError, RewriterError
from rewriter.ir.store import Block, Edit, ModuleStore, WeightStore, check_rows
from rewriter.ir.tensors import get_tensor, set_tensor

__all__ = ["SPILL_BYTES", "LazyStore", "Plan"]

SPILL_BYTES = 1 * 2**20
"""Tensors a pass computes are held in memory up to this size, and spilled to disk above it."""


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
        if nbytes_of(version) <= self.spill_bytes:
            return version
        if self._spill_dir is None:
            self._spill_dir = Path(tempfile.mkdtemp(prefix="rewriter-spill-", dir=self._spill_root))
        self._spills += 1
        path = self._spill_dir / f"spill-{self._spills:05d}.safetensors"
        write_file(path, {"t": version}, self)
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
        reads = Reads(self, version)
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
            into[(id(version.shards), version.key)] = nbytes_of(version)
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
