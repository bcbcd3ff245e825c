"""The fuzz campaign runs a small sample in CI (the full one runs on demand)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_fuzz_campaign_sample_finds_no_mismatch() -> None:
    env = {**os.environ, "REWRITER_NO_PROGRESS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "fuzz_equivalence.py"),
            "--n",
            "1",
            "--inputs",
            "2",
            "--seed",
            "7",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "0 failures" in done.stdout
    for family in ("gpt2", "opt", "gpt_neox", "bloom", "llama", "bert", "tenc"):
        assert family in done.stdout
