"""The wheel carries everything `rewriter demo` needs: built, installed into a fresh venv, run.

This is the packaging check CI runs (through `make test`): package data such as the embedded
model must be in the wheel, its declared dependencies must be met by the locked set
(`pip check`), and nothing may import from the source tree.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
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
    work = tmp_path / "elsewhere"
    work.mkdir()
    dist = tmp_path / "dist"
    _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(dist), str(ROOT)],
        tmp_path,
    )
    (wheel,) = dist.glob("rewriter-*.whl")
    fresh = tmp_path / "venv"
    venv.create(fresh, with_pip=True)
    python = fresh / "bin" / "python"
    # The wheel alone goes into the fresh venv; its dependencies are the locked ones this suite
    # runs with, seen through a .pth line (a path entry: the source tree's editable finder, a .pth
    # of its own there, is not run). Installing them again cost about 100 s of copying torch;
    # `pip check` still proves the wheel's declared requirements are met by the lock.
    _run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", str(wheel)], tmp_path)
    # ensurepip's setuptools 65 would hide the locked one (torch requires setuptools >= 77).
    _run([str(python), "-m", "pip", "uninstall", "--quiet", "--yes", "setuptools"], tmp_path)
    site = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], work)
    deps = sysconfig.get_path("purelib")  # this suite's venv
    Path(site.stdout.strip(), "locked-dependencies.pth").write_text(deps + "\n")
    _run([str(python), "-m", "pip", "check"], tmp_path)
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
