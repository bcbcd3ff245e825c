"""Run every benchmark's ``--quick`` mode, one after the other, so the scripts cannot rot.

A quick run uses tiny sizes and one repeat: it checks that each script still imports, builds its
models, runs its passes and backends, and writes its JSON (to ``results/quick/``; the numbers
mean nothing). Prints one line per script with its time and exits 1 if any failed.
``make bench-quick`` runs it.

    .venv/bin/python benchmarks/quick.py [--only bench_l1quant,bench_vocab] [--timeout 900]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
from _common import select  # noqa: E402 - the folder is on the path first


def scripts() -> list[Path]:
    """Every benchmark script: ``bench_*.py``, the fuzz and the mutation campaigns."""
    found = sorted(HERE.glob("bench_*.py"))
    return [*found, HERE / "fuzz_equivalence.py", HERE / "mutation.py"]


def run(script: Path, timeout: float) -> tuple[bool, float, str]:
    env = {**os.environ, "REWRITER_NO_PROGRESS": "1", "PYTHONWARNINGS": "ignore"}
    started = time.perf_counter()
    try:
        done = subprocess.run(
            [sys.executable, str(script), "--quick"],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )
    except subprocess.TimeoutExpired:
        return False, time.perf_counter() - started, f"no result within {timeout:.0f} s"
    seconds = time.perf_counter() - started
    lines = (done.stdout + done.stderr).strip().splitlines()
    if done.returncode != 0:
        return False, seconds, "\n".join(lines[-15:])
    return True, seconds, lines[-1] if lines else ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", help="comma-separated script names (no .py)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per script")
    args = parser.parse_args()
    chosen = select(scripts(), args.only, lambda s: s.stem, "quick.py")
    started = time.perf_counter()
    failed = []
    for script in chosen:
        ok, seconds, detail = run(script, args.timeout)
        status = "ok" if ok else "FAILED"
        print(f"{status:6s} {script.name:24s} {seconds:6.0f} s  {detail}", flush=True)
        if not ok:
            failed.append(script.name)
    total = time.perf_counter() - started
    print(f"{len(chosen) - len(failed)} of {len(chosen)} quick runs passed in {total / 60:.1f} min")
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
