"""Kernel tests: they need the Triton interpreter flag set before anything imports a kernel
(``make test`` runs this folder in its own pytest process with ``TRITON_INTERPRET=1``), or a GPU."""

from __future__ import annotations

import importlib.util
import os

import pytest


def _reason() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return None
    import torch

    if torch.cuda.is_available():
        return None
    return (
        "Triton kernel tests run in their own process with TRITON_INTERPRET=1 "
        "(make test does that) or on a GPU"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = _reason()
    if reason is None:
        return
    for item in items:
        if "tests/triton" in str(item.path).replace(os.sep, "/"):
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture
def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
