"""Launch helpers shared by the kernel modules (no kernels here)."""

from __future__ import annotations

import os

import torch

MAX_ROW_BLOCK = 16384
"""A row up to this many elements is normalized from registers in one block; wider rows loop."""


def interpreting() -> bool:
    """Whether Triton runs kernels with its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def row_block(width: int) -> int:
    """The block width for a row of ``width`` elements (at least 16, a power of two)."""
    return max(16, min(next_power_of_2(width), MAX_ROW_BLOCK))


def rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a contiguous ``[rows, width]`` matrix."""
    return x.reshape(-1, x.shape[-1]).contiguous()


def warps(block: int) -> int:
    """Warps for a row kernel of ``block`` columns (as Liger sizes them)."""
    if block >= 8192:
        return 16
    if block >= 2048:
        return 8
    return 4


def configs(gpu: list[dict], interpreted: dict) -> list:
    """Autotune configs: ``gpu`` (each a dict of meta-parameters plus ``num_warps`` /
    ``num_stages``) on a device, the single ``interpreted`` config under the interpreter (a
    single config skips benchmarking, which needs a GPU driver)."""
    import triton

    def make(entry: dict) -> object:
        meta = {k: v for k, v in entry.items() if k not in ("num_warps", "num_stages")}
        return triton.Config(
            meta, num_warps=entry.get("num_warps", 4), num_stages=entry.get("num_stages", 2)
        )

    return [make(interpreted)] if interpreting() else [make(e) for e in gpu]
