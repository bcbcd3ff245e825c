"""Mutation campaign: realistic bugs injected into the exact passes and the analyses they use.

Each mutant (``benchmarks/_mutants.py``) is one source edit a competent engineer could make (an
eps hard-coded, a term dropped, an off-by-one in a row block, a tie missed, a guard that accepts
too much). The campaign applies each to a private copy of the project, runs the test files that
cover it, and counts the mutant *killed* when a test fails (or the run times out), *survived*
when every test passes. It prints the kill rate and the survivors and writes
``benchmarks/results/mutation.json``.

The copy is laid out as the wheel installs it (``passes/`` -> ``rewriter/passes/`` and so on) and
tests run from its root, so ``import rewriter`` finds the copy, not the editable install. The
project's own files are never touched. Before the mutants, the covering test files run once
unmutated in the copy: a campaign whose baseline fails reports nothing.

    python benchmarks/mutation.py                   # every mutant (about an hour on 2 cores)
    python benchmarks/mutation.py --jobs 2          # two copies, two mutants at a time
    python benchmarks/mutation.py --only centering-eps-1e-5,lora-merge-b-rows
    python benchmarks/mutation.py --list            # the mutants and the tests they meet
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from _common import parse, pick, select, write
from _mutants import MUTANTS, Mutant

ROOT = Path(__file__).resolve().parent.parent
# where a repository folder lives in the installed layout
INSTALLED = {
    "passes": "rewriter/passes",
    "backends": "rewriter/backends",
    "kernels": "rewriter/kernels",
}


QUICK_MUTANT = "quant-code-offset-off-by-one"
"""``--quick`` runs this one mutant (tests/test_quant_ops.py kills it in about 6 s)."""


def installed_path(path: str) -> str:
    head, _, rest = path.partition("/")
    return f"{INSTALLED[head]}/{rest}" if head in INSTALLED else path


def stage(directory: Path) -> Path:
    """Copy the project's files (tracked and untracked, not ignored) in the installed layout."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    for name in listed:
        source = ROOT / name
        if not source.is_file():
            continue
        target = directory / installed_path(name)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
    return directory


def check(mutants: list[Mutant]) -> None:
    """Every mutant's original text occurs exactly once, and its tests exist."""
    ids = [m.id for m in mutants]
    duplicated = {i for i in ids if ids.count(i) > 1}
    if duplicated:
        raise SystemExit(f"mutation.py: duplicate mutant ids {sorted(duplicated)}")
    for mutant in mutants:
        text = (ROOT / mutant.path).read_text()
        count = text.count(mutant.original)
        if count != 1:
            raise SystemExit(
                f"mutation.py: mutant {mutant.id}: its original text occurs {count} times in "
                f"{mutant.path} (must be once; the source changed since the mutant was written)"
            )
        missing = [t for t in mutant.tests if not (ROOT / t).is_file()]
        if missing:
            raise SystemExit(f"mutation.py: mutant {mutant.id}: no test file {missing}")


def run_tests(
    directory: Path, tests: tuple[str, ...], timeout: float, seed: int, workers: int = 0
) -> tuple[str, str, float]:
    """``(outcome, first failing test or tail, seconds)`` of the tests in ``directory``."""
    env = dict(
        os.environ,
        PYTHONDONTWRITEBYTECODE="1",
        REWRITER_TEST_THREADS="1",
        HYPOTHESIS_PROFILE="mutation",  # the ci draws, without shrinking a failure
        REWRITER_TEST_SEED=str(seed),  # one seed for the baseline and every mutant
    )
    env.pop("PYTHONPATH", None)
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    if workers > 1:
        command += ["-n", str(workers), "--dist", "loadfile"]
    start = time.perf_counter()
    try:
        done = subprocess.run(
            command, cwd=directory, env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return "timeout", f"no result within {timeout:.0f} s", time.perf_counter() - start
    seconds = time.perf_counter() - start
    output = done.stdout + done.stderr
    if done.returncode == 0:
        return "passed", "", seconds
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", output, re.MULTILINE)
    detail = failed[0] if failed else output.strip().splitlines()[-1] if output.strip() else ""
    return ("failed" if done.returncode == 1 else f"exit {done.returncode}"), detail, seconds


def run_mutant(directory: Path, mutant: Mutant, timeout: float, seed: int) -> dict:
    target = directory / installed_path(mutant.path)
    original = target.read_text()
    target.write_text(original.replace(mutant.original, mutant.mutated, 1))
    try:
        outcome, detail, seconds = run_tests(directory, mutant.tests, timeout, seed)
    finally:
        target.write_text(original)
    status = "survived" if outcome == "passed" else "killed"
    return {
        "id": mutant.id,
        "path": mutant.path,
        "status": status,
        "outcome": outcome,
        "killed_by": detail,
        "seconds": round(seconds, 1),
        "tests": list(mutant.tests),
        "bug": mutant.bug,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", help="comma-separated mutant ids")
    parser.add_argument("--jobs", type=int, default=1, help="copies run side by side")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per mutant")
    parser.add_argument("--list", action="store_true", help="print the mutants and exit")
    parser.add_argument("--no-baseline", action="store_true", help="skip the unmutated run")
    parser.add_argument(
        "--seed", type=int, default=0, help="the tests' draw seed (REWRITER_TEST_SEED), default 0"
    )
    args = parse(parser)  # --quick: one fast mutant, no baseline
    args.only = pick(args.only, QUICK_MUTANT)
    args.no_baseline = pick(args.no_baseline, True)

    mutants = select(MUTANTS, args.only, lambda m: m.id, "mutation.py")
    check(mutants)
    if args.list:
        for m in mutants:
            print(f"{m.id:34s} {m.path:28s} {' '.join(t.removeprefix('tests/') for t in m.tests)}")
            print(f"{'':34s} {m.bug}")
        print(f"{len(mutants)} mutants")
        return

    started = time.perf_counter()
    jobs = max(1, min(args.jobs, len(mutants)))
    with tempfile.TemporaryDirectory(prefix="rewriter-mutation-") as tmp:
        copies = [stage(Path(tmp) / f"copy{i}") for i in range(jobs)]
        if not args.no_baseline:
            tests = tuple(sorted({t for m in mutants for t in m.tests}))
            print(f"baseline: {len(tests)} test files, unmutated ...", flush=True)
            outcome, detail, seconds = run_tests(
                copies[0], tests, args.timeout * 4, args.seed, workers=2
            )
            print(f"baseline: {outcome} in {seconds:.0f} s {detail}", flush=True)
            if outcome != "passed":
                raise SystemExit("mutation.py: the unmutated copy fails its tests; fix that first")

        results: list[dict] = []
        free = list(copies)
        with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
            pending: dict[concurrent.futures.Future, Path] = {}
            queue = list(mutants)
            while queue or pending:
                while queue and free:
                    copy = free.pop()
                    pending[
                        pool.submit(run_mutant, copy, queue.pop(0), args.timeout, args.seed)
                    ] = copy
                done, _ = concurrent.futures.wait(
                    pending, return_when=concurrent.futures.FIRST_COMPLETED
                )
                for future in done:
                    free.append(pending.pop(future))
                    result = future.result()
                    results.append(result)
                    print(
                        f"[{len(results):3d}/{len(mutants)}] {result['status']:8s} "
                        f"{result['id']:34s} {result['seconds']:6.0f} s  {result['killed_by']}",
                        flush=True,
                    )

    killed = [r for r in results if r["status"] == "killed"]
    survivors = [r for r in results if r["status"] == "survived"]
    rate = len(killed) / len(results) if results else 0.0
    wall = time.perf_counter() - started
    busy = sum(r["seconds"] for r in results)
    print(f"\nkilled {len(killed)} of {len(results)} mutants ({100 * rate:.1f}%)")
    print(f"{wall / 60:.1f} min in all ({busy / 60:.1f} mutant-minutes, {jobs} at a time)")
    for r in survivors:
        print(f"  survived: {r['id']} ({r['path']}): {r['bug']}")
    path = write(
        "mutation",
        {
            "killed": len(killed),
            "total": len(results),
            "rate": rate,
            "wall_s": round(wall, 1),
            "mutant_s": round(busy, 1),
            "jobs": jobs,
            "seed": args.seed,
            "mutants": results,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
