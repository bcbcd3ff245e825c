"""Every example runs (each user-visible capability has one)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.py"))


NEEDS = {"12_triton": ("triton",), "13_hls": ("hls4ml", "g++"), "14_mlir": ("torch_mlir",)}
"""Examples that need an optional package or tool (skipped with the reason when absent)."""


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_runs(path: Path) -> None:
    for need in NEEDS.get(path.stem, ()):
        found = shutil.which(need) if need == "g++" else importlib.util.find_spec(need)
        if found is None:
            pytest.skip(f"{path.name} needs {need}")
    env = {**os.environ, "REWRITER_NO_PROGRESS": "1", "PYTHONWARNINGS": "ignore"}
    completed = subprocess.run(
        [sys.executable, str(path)], capture_output=True, text=True, timeout=600, env=env
    )
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-4000:]
