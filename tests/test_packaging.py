"""The wheel carries everything `rewriter demo` needs: built, installed into a fresh venv, run.

This is the packaging check CI runs (through `make test`): package data such as the embedded
model must be in the wheel, and nothing may import from the source tree.
"""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
pytestmark = pytest.mark.slow


def _run(args: list[str], cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["REWRITER_NO_PROGRESS"] = "1"
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    assert done.returncode == 0, f"{args}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def test_wheel_installs_into_a_fresh_venv_and_runs_the_demo(tmp_path) -> None:
    if not (ROOT / "rewriter" / "zoo" / "data" / "model.safetensors").exists():
        pytest.skip("the embedded model has not been built")
    dist = tmp_path / "dist"
    _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(dist), str(ROOT)],
        tmp_path,
    )
    (wheel,) = dist.glob("rewriter-*.whl")
    fresh = tmp_path / "venv"
    venv.create(fresh, with_pip=True)
    python = fresh / "bin" / "python"
    _run([str(python), "-m", "pip", "install", "--quiet", "torch==2.13.0"], tmp_path)
    _run([str(python), "-m", "pip", "install", "--quiet", str(wheel)], tmp_path)
    work = tmp_path / "elsewhere"
    work.mkdir()
    where = _run([str(python), "-c", "import rewriter; print(rewriter.__file__)"], work)
    assert str(fresh) in where.stdout  # the installed copy, not the source tree
    # The embedded model and tokenizer (package data) through a pipeline and a saved graph; the
    # demo itself is tested in the source tree (test_cli), so this stays a packaging check.
    done = _run(
        [
            str(fresh / "bin" / "rewriter"),
            "run",
            "--model",
            "tiny-gpt2",
            "--out",
            "out",
            "--passes",
            "canonicalize,prernorm,fold-ln",
            "--seq",
            "16",
        ],
        work,
    )
    assert "fold-ln" in done.stdout and "whole pipeline vs the original model" in done.stdout
    assert (work / "out" / "model.pt2").exists() and (work / "out" / "report.json").exists()
    check = (
        "from rewriter.backends import hls; print(sorted(p.name for p in hls.KERNELS.glob('*.h')))"
    )
    headers = _run([str(python), "-c", check], work)
    assert "rw_common.h" in headers.stdout  # the HLS templates are package data too
