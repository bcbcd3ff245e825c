"""Streaming reads only checkpoints whose headers tell the truth and whose index stays inside the
model folder (issue: trust). Before these checks an overlapping ``data_offsets`` pair was
accepted, so one tensor's bytes were written as another's with exit 0, and an index could name
``../../etc/passwd``."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from rewriter.checkpoint.shards import INDEX_FILE, Shards
from rewriter.errors import LoadError


def _write(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    save_file(tensors, str(path))
    return path


def _rewrite_header(path: Path, change) -> None:
    """Replace the header of the safetensors file ``path`` by ``change(header)``; data kept."""
    raw = path.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + size])
    text = json.dumps(change(header)).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + size :])


@pytest.fixture
def model(tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    tensors = {"a.weight": torch.arange(6.0).reshape(2, 3), "b.weight": -torch.arange(6.0)}
    _write(folder / "model.safetensors", tensors)
    return folder


def test_an_honest_checkpoint_reads_back(model: Path) -> None:
    shards = Shards(model)
    assert torch.equal(shards.view("a.weight"), torch.arange(6.0).reshape(2, 3))
    assert torch.equal(shards.view("b.weight"), -torch.arange(6.0))


def test_overlapping_byte_ranges_are_refused(model: Path) -> None:
    def overlap(header: dict) -> dict:
        header["b.weight"]["data_offsets"] = header["a.weight"]["data_offsets"]
        return header

    _rewrite_header(model / "model.safetensors", overlap)
    with pytest.raises(LoadError, match=r"overlaps the tensor before it"):
        Shards(model)


def test_a_range_that_does_not_fit_the_shape_is_refused(model: Path) -> None:
    def grow(header: dict) -> dict:
        header["a.weight"]["shape"] = [3, 3]
        return header

    _rewrite_header(model / "model.safetensors", grow)
    with pytest.raises(LoadError, match=r"needs 36"):
        Shards(model)


def test_trailing_bytes_after_the_tensors_are_refused(model: Path) -> None:
    path = model / "model.safetensors"
    path.write_bytes(path.read_bytes() + b"\0" * 8)
    with pytest.raises(LoadError, match="data section"):
        Shards(model)


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd"])
def test_an_index_may_name_only_shards_inside_the_model_folder(model: Path, shard: str) -> None:
    _write(model.parent / "outside.safetensors", {"c.weight": torch.ones(2)})
    index = {"metadata": {}, "weight_map": {"a.weight": "model.safetensors", "c.weight": shard}}
    (model / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(LoadError, match="outside the model folder"):
        Shards(model)


def test_a_tensor_named_in_two_shards_is_refused(model: Path) -> None:
    _write(model / "other.safetensors", {"a.weight": torch.zeros(2, 3)})
    with pytest.raises(LoadError, match=r"'a\.weight' is also in"):
        Shards(model)
