"""The weight store: the only way a pass reads or writes weights.

A pass never pokes module attributes. It reads tensors by name and registers :class:`Edit`\\ s:
an edit declares the tensors it reads and the one it writes, and computes the new tensor in
float64, one block of output rows at a time, cast once to the output dtype. Centering reads W;
folding reads gamma, beta and W; merging reads W, B and A.

Why blocks: a streaming store over safetensors shards (checkpoints larger than memory) runs the
same edits as tensors are written, holding one block of float64 at a time. The in-memory store
here runs the very same block loop, in the same order, so both give bit-identical weights.

Writes never modify a tensor in place: they bind a new tensor to the name (and to every other
name bound to the same tensor object, so ties by name stay ties). Graphs copied with
:func:`rewriter.graph.copy_graph_module` share tensors until one of them writes.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.fx

from rewriter.ir.tensors import get_tensor, set_tensor

__all__ = ["Block", "Edit", "ModuleStore", "WeightStore", "weights"]

STORE_KEY = "rewriter.store"
DEFAULT_BLOCK_BYTES = 8 * 2**20
"""Float64 bytes per block. Small enough that glibc serves blocks from its heap (above 32 MB
every allocation is a fresh mapping, faulted page by page): measured on the GPT-2-XL-shaped
streaming benchmark, writing took 25 s with 64 MB blocks, 16 s with 16 MB, 11-14 s with 8 MB."""


@dataclasses.dataclass(frozen=True)
class Edit:
    """A declared transform: ``target = compute(reads)``, evaluated in float64 row blocks.

    ``compute`` receives a :class:`Block` and returns the float64 rows ``[block.start,
    block.stop)`` of the new tensor (the whole tensor for 0-d and 1-d targets of one block).
    """

    target: str
    reads: tuple[str, ...]
    compute: Callable[[Block], torch.Tensor]
    shape: tuple[int, ...] | None = None
    """Shape of the new tensor; default: the target's current shape."""
    dtype: torch.dtype | None = None
    """Dtype of the new tensor; default: the target's current dtype."""
    note: str = ""
    """What the edit does, for reports (``"center rows"``)."""


def row_blocks(shape: Sequence[int], block_bytes: int) -> Iterator[tuple[int, int]]:
    """Row ranges of a tensor of ``shape`` whose float64 rows fill at most ``block_bytes``
    (0-d and 1-d tensors are one block)."""
    if len(shape) <= 1:
        yield 0, (shape[0] if shape else 1)
        return
    rows = shape[0]
    row_bytes = 8 * max(1, int(torch.Size(shape[1:]).numel()))
    step = max(1, block_bytes // row_bytes)
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


def check_rows(
    edit: Edit, value: torch.Tensor, shape: Sequence[int], start: int, stop: int
) -> None:
    """An edit's block must have the rows ``[start, stop)`` of a tensor of ``shape``."""
    expected = (stop - start, *shape[1:]) if len(shape) > 1 else tuple(shape)
    if tuple(value.shape) != expected:
        raise ValueError(
            f"edit of '{edit.target}' ({edit.note or 'no note'}) returned rows of shape "
            f"{tuple(value.shape)} for block [{start}, {stop}), expected {expected}"
        )


class Block:
    """Rows ``[start, stop)`` of an edit's output, with float64 access to the tensors it reads."""

    def __init__(self, store: WeightStore, edit: Edit, start: int, stop: int) -> None:
        self.start = start
        self.stop = stop
        self._store = store
        self._edit = edit
        self._sums: dict[tuple[str, str | None], torch.Tensor] = {}

    def _check(self, name: str) -> None:
        if name not in self._edit.reads:
            raise KeyError(
                f"edit of '{self._edit.target}' reads '{name}' without declaring it "
                f"(declared: {list(self._edit.reads)})"
            )

    def rows(self, name: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        """Float64 rows of a read tensor: the block's own rows unless ``start``/``stop`` given."""
        self._check(name)
        lo = self.start if start is None else start
        hi = self.stop if stop is None else stop
        return self._store._rows(name, lo, hi).to(torch.float64)

    def gather(self, name: str, index: torch.Tensor) -> torch.Tensor:
        """Float64 rows ``index`` of a read tensor (vocabulary trimming)."""
        self._check(name)
        return self._store._gather(name, index).to(torch.float64)

    def whole(self, name: str) -> torch.Tensor:
        """A whole read tensor in float64; meant for small ones (vectors, low-rank factors)."""
        self._check(name)
        return self._store.read(name).to(torch.float64)

    def matvec(self, name: str, vector: str) -> torch.Tensor:
        """``T @ v`` for a read 2-d tensor ``T`` and read vector ``v``, in float64, block by block.

        (Folding a norm's bias through an ``(out, in)`` weight: ``b + W @ beta``.) Cached.
        """
        self._check(name)
        self._check(vector)
        key = (name, f"@{vector}")
        if key not in self._sums:
            self._sums[key] = self._store._matvec(name, vector)
        return self._sums[key]

    def column_sum(self, name: str, weights: str | None = None) -> torch.Tensor:
        """``sum_r w_r T[r, :]`` over all rows of a read tensor, in float64, one block at a time.

        With ``weights=None`` every ``w_r`` is 1 (a column sum; divide by rows for the mean).
        ``weights`` names a read 1-d tensor with one entry per row (``beta @ W`` for folding a
        norm's bias through a Conv1D). Computed once per edit and cached.
        """
        self._check(name)
        if weights is not None:
            self._check(weights)
        key = (name, weights)
        if key not in self._sums:
            self._sums[key] = self._store._column_sum(name, weights)
        return self._sums[key]


class WeightStore:
    """Read tensors by name and apply declared float64 edits; subclasses say where tensors live."""

    block_bytes: int = DEFAULT_BLOCK_BYTES

    # -- what a subclass provides --
    def read(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def names(self) -> list[str]:
        raise NotImplementedError

    def _bind(self, name: str, tensor: torch.Tensor) -> None:
        raise NotImplementedError

    def aliases(self, name: str) -> list[str]:
        """Every name bound to the same tensor as ``name`` (``name`` included)."""
        return [name]

    # -- the API passes use --
    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.read(name).shape)

    def dtype(self, name: str) -> torch.dtype:
        return self.read(name).dtype

    def device(self, name: str) -> torch.device:
        """Where new tensors that go with ``name`` are made (meta for a weightless graph)."""
        return self.read(name).device

    def apply(self, edit: Edit) -> torch.Tensor:
        """Run ``edit`` block by block; bind the result to the target (and its aliases)."""
        for name in edit.reads:
            if name not in self:
                raise KeyError(f"edit of '{edit.target}' reads unknown tensor '{name}'")
        shape = edit.shape if edit.shape is not None else self.shape(edit.target)
        dtype = edit.dtype if edit.dtype is not None else self.dtype(edit.target)
        device = self.read(edit.reads[0]).device if edit.reads else torch.device("cpu")
        out = torch.empty(shape, dtype=dtype, device=device)

        def into(start: int, stop: int, rows: torch.Tensor) -> None:
            if len(shape) > 1:
                out[start:stop] = rows
            else:
                out.copy_(rows)

        self.run(edit, tuple(shape), dtype, into)
        self._write(edit.target, out)
        self.log.append(edit)
        return out

    def run(
        self,
        edit: Edit,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        sink: Callable[[int, int, torch.Tensor], None],
        *,
        after_block: Callable[[], None] | None = None,
    ) -> None:
        """The block loop every store shares (so stores agree bit for bit): compute ``edit``
        block by block over this store's reads, and hand each block, cast once to ``dtype``,
        to ``sink(start, stop, rows)``."""
        for start, stop in self.blocks(shape):
            value = edit.compute(Block(self, edit, start, stop))
            check_rows(edit, value, shape, start, stop)
            sink(start, stop, value.to(dtype))
            if after_block is not None:
                after_block()

    def write(self, name: str, tensor: torch.Tensor, note: str = "") -> None:
        """Bind an already computed tensor (packed integers, trained factors) to ``name``."""
        self._write(name, tensor)
        self.log.append(
            Edit(name, (), lambda block: tensor, tuple(tensor.shape), tensor.dtype, note)
        )

    def blocks(self, shape: Sequence[int]) -> Iterator[tuple[int, int]]:
        """Row ranges for an output of ``shape``: float64 blocks of at most ``block_bytes``."""
        return row_blocks(shape, self.block_bytes)

    def __contains__(self, name: str) -> bool:
        try:
            self.read(name)
        except (AttributeError, KeyError):
            return False
        return True

    def _write(self, name: str, tensor: torch.Tensor) -> None:
        for alias in self.aliases(name) if name in self else [name]:
            self._bind(alias, tensor)

    def _rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        tensor = self.read(name)
        return tensor if tensor.dim() <= 1 else tensor[start:stop]

    def _gather(self, name: str, index: torch.Tensor) -> torch.Tensor:
        return self.read(name).index_select(0, index.to(torch.long))

    def _matvec(self, name: str, vector: str) -> torch.Tensor:
        shape = self.shape(name)
        v = self.read(vector).to(torch.float64)
        result = torch.empty(shape[0], dtype=torch.float64, device=v.device)
        for start, stop in self.blocks(shape):
            result[start:stop] = self._rows(name, start, stop).to(torch.float64) @ v
        return result

    def _column_sum(self, name: str, weights: str | None) -> torch.Tensor:
        shape = self.shape(name)
        total = torch.zeros(shape[1:], dtype=torch.float64, device=self.read(name).device)
        row_weights = self.read(weights).to(torch.float64) if weights is not None else None
        for start, stop in self.blocks(shape):
            rows = self._rows(name, start, stop).to(torch.float64)
            if row_weights is None:
                total += rows.sum(0)
            else:
                total += row_weights[start:stop] @ rows
        return total

    @property
    def log(self) -> list[Edit]:
        if not hasattr(self, "_log"):
            self._log: list[Edit] = []
        return self._log


class ModuleStore(WeightStore):
    """The in-memory store: tensors are attributes of the GraphModule."""

    def __init__(self, gm: torch.fx.GraphModule) -> None:
        self.gm = gm

    def read(self, name: str) -> torch.Tensor:
        return get_tensor(self.gm, name).detach()

    def names(self) -> list[str]:
        names = [n for n, _ in self.gm.named_parameters(remove_duplicate=False)]
        return names + [n for n, _ in self.gm.named_buffers(remove_duplicate=False)]

    def aliases(self, name: str) -> list[str]:
        tensor = get_tensor(self.gm, name)
        named = (
            *self.gm.named_parameters(remove_duplicate=False),
            *self.gm.named_buffers(remove_duplicate=False),
        )
        return [n for n, t in named if t is tensor] or [name]

    def _bind(self, name: str, tensor: torch.Tensor) -> None:
        set_tensor(self.gm, name, tensor)

    def _write(self, name: str, tensor: torch.Tensor) -> None:
        # Wrap once, so every alias of a tied parameter is bound to the same Parameter object.
        if name in self and not isinstance(tensor, torch.nn.Parameter):
            old = get_tensor(self.gm, name)
            if isinstance(old, torch.nn.Parameter):
                tensor = torch.nn.Parameter(tensor, requires_grad=old.requires_grad)
        super()._write(name, tensor)

    # -- names for new tensors --
    def fresh_name(self, hint: str) -> str:
        """A free attribute path near ``hint`` (``transformer.h.0.attn.c_attn.lora_A``)."""
        hint = re.sub(r"[^0-9A-Za-z_.]", "_", hint).strip(".") or "weight"
        if hint not in self and not self._is_module(hint):
            return hint
        for i in range(1, 10_000):
            candidate = f"{hint}_{i}"
            if candidate not in self and not self._is_module(candidate):
                return candidate
        raise RuntimeError(f"no free name near '{hint}'")

    def _is_module(self, path: str) -> bool:
        try:
            self.gm.get_submodule(path)
        except AttributeError:
            return False
        return True

    def copy(self, name: str, hint: str) -> str:
        """A copy of tensor ``name`` under a free name near ``hint`` (untying); returns the name."""
        new = self.fresh_name(hint)
        value = self.read(name).clone()
        if value.is_floating_point():
            value = torch.nn.Parameter(value, requires_grad=False)
        self.write(new, value, note=f"copy of {name}")
        return new

    def device(self, name: str) -> torch.device:
        return get_tensor(self.gm, name).device

    def split_alias(self, name: str) -> None:
        """Give ``name`` alone a copy of its tensor; the tensor's other names keep the original
        (untying where the readers' own names are aliases of one tied tensor)."""
        old = get_tensor(self.gm, name)
        value = old.detach().clone()
        if isinstance(old, torch.nn.Parameter):
            value = torch.nn.Parameter(value, requires_grad=old.requires_grad)
        self._bind(name, value)
        self.log.append(
            Edit(name, (), lambda block: value, tuple(value.shape), value.dtype, "untied alias")
        )

    def own(self, name: str) -> torch.Tensor:
        """Bind a private clone to ``name`` (and its aliases), so in-place updates stay local."""
        clone = self.read(name).clone()
        self._write(name, clone)
        return get_tensor(self.gm, name)


def weights(gm: torch.fx.GraphModule) -> WeightStore:
    """The store for ``gm``: the one attached at trace time (streaming), else an in-memory one."""
    attached = getattr(gm, "meta", {}).get(STORE_KEY)
    if isinstance(attached, WeightStore):
        return attached
    if attached is not None and hasattr(attached, "store_for"):
        return attached.store_for(gm)  # a checkpoint plan (rewriter.checkpoint): one per graph
    return ModuleStore(gm)
