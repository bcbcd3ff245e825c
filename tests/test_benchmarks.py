"""The fuzz campaign runs a small sample in CI (the full one runs on demand); the mutation
campaign's mutants still apply to the source as it is; every benchmark script imports and has
the ``--quick`` mode that ``make bench-quick`` runs."""

from __future__ import annotations

import json
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


def test_every_mutant_of_the_mutation_campaign_still_applies() -> None:
    # `--list` checks that each mutant's original text occurs exactly once in its file and that
    # its test files exist: a change to a mutated line must update the mutant, or the
    # campaign would silently stop testing that code.
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "mutation.py"), "--list"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    count = int(done.stdout.strip().splitlines()[-1].split()[0])
    assert count >= 40


HELP = r"""
import contextlib, io, json, runpy, sys
found = {}
for path in sys.argv[1:]:
    sys.argv = [path, "--help"]
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            runpy.run_path(path, run_name="__main__")
        code = "no exit"
    except SystemExit as stop:
        code = stop.code
    found[path] = [code, out.getvalue()]
print(json.dumps(found))
"""


def test_every_benchmark_imports_and_has_a_quick_mode() -> None:
    # One process for all (torch is imported once): each script's --help must exit 0 and offer
    # --quick, and quick.py must run every one of them.
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import quick
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    scripts = quick.scripts()
    assert {s.name for s in scripts} >= {
        p.name for p in (ROOT / "benchmarks").glob("*.py") if not p.name.startswith(("_", "quick"))
    }
    env = {**os.environ, "REWRITER_NO_PROGRESS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(
        [sys.executable, "-c", HELP, *map(str, scripts)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    for path, (code, text) in found.items():
        assert code == 0, f"{path} --help: exit {code}"
        assert "--quick" in text, f"{path} has no --quick mode"


def test_triton_benchmark_dry_runs_without_a_gpu_and_checks_itself_interpreted(tmp_path) -> None:
    import importlib.util

    import pytest
    import torch

    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    script = str(ROOT / "benchmarks" / "bench_triton.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if not torch.cuda.is_available():  # the plain run says why it measures nothing, exit 0
        plain = subprocess.run(
            [sys.executable, script], capture_output=True, text=True, env=env, timeout=300
        )
        assert plain.returncode == 0 and "no CUDA device" in plain.stdout, plain.stderr[-2000:]
    # --interpret: every case at tiny sizes, kernels checked against their references
    done = subprocess.run(
        [sys.executable, script, "--interpret", "--repeats", "1"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "linear attention T=" in done.stdout and "goal:" in done.stdout
