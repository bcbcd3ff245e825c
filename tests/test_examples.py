"""Every example runs (each user-visible capability has one)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.py"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_runs(path: Path) -> None:
    env = {**os.environ, "REWRITER_NO_PROGRESS": "1", "PYTHONWARNINGS": "ignore"}
    completed = subprocess.run(
        [sys.executable, str(path)], capture_output=True, text=True, timeout=600, env=env
    )
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-4000:]
