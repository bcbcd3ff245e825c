"""Checkpoints larger than memory: the weights of a weightless graph kept as versions over a
memory-mapped safetensors checkpoint and written shard by shard. :mod:`~.shards` reads the
checkpoint through memory maps; :mod:`~.versions` holds what a tensor is (stored, held, or an
edit over other versions) and writes versions to a safetensors file; :mod:`~.store` is the
:class:`Plan` of a graph's versions and the :class:`LazyStore` the passes edit through;
:func:`open_checkpoint` (:mod:`~.attach`) attaches a checkpoint to a graph;
:func:`write_checkpoint` (:mod:`~.write`) evaluates and writes the graph's tensors; :func:`bind`
(:mod:`~.binding`) puts written weights into a weightless graph; :mod:`~.memory` measures and
trims the resident set. The whole streaming run, which drives a pipeline over these, is
:func:`rewriter.io.streaming.rewrite_checkpoint` (``rewriter.rewrite_checkpoint``), in the io
layer above. Memory: a pass holds at most the tensors one edit reads; writing holds one float64
block plus the whole versions its reads need (none for a first edit of a stored tensor).
"""

from __future__ import annotations

from rewriter.checkpoint.attach import open_checkpoint
from rewriter.checkpoint.binding import bind, retarget_devices
from rewriter.checkpoint.memory import ResidentPeak, trim_heap
from rewriter.checkpoint.shards import INDEX_FILE, Entry, Shards
from rewriter.checkpoint.store import SPILL_BYTES, LazyStore, Plan
from rewriter.checkpoint.versions import Computed, Held, Stored, Version
from rewriter.checkpoint.write import DEFAULT_SHARD_BYTES, StreamRun, Written, write_checkpoint

__all__ = [
    "DEFAULT_SHARD_BYTES",
    "INDEX_FILE",
    "SPILL_BYTES",
    "Computed",
    "Entry",
    "Held",
    "LazyStore",
    "Plan",
    "ResidentPeak",
    "Shards",
    "Stored",
    "StreamRun",
    "Version",
    "Written",
    "bind",
    "open_checkpoint",
    "retarget_devices",
    "trim_heap",
    "write_checkpoint",
]
