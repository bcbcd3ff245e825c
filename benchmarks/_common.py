"""Shared helpers of the benchmark scripts: interleaved timing, medians, JSON output."""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).parent / "results"

QUICK = False
"""Set by :func:`parse` from ``--quick``: tiny sizes and one repeat, so a script runs in about a
minute and cannot rot (``make bench-quick``). Its numbers mean nothing; they go to
``results/quick/`` and never overwrite a real run's."""


def parse(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line, with the ``--quick`` flag every benchmark has."""
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: tiny sizes, one repeat (results/quick/; the numbers mean nothing)",
    )
    args = parser.parse_args(argv)
    global QUICK
    QUICK = args.quick
    return args


def pick(full: Any, quick: Any) -> Any:
    """``full`` in a real run, ``quick`` under ``--quick``."""
    return quick if QUICK else full


def select(items: Sequence[Any], only: str, key: Callable[[Any], str], script: str) -> list[Any]:
    """The items a comma-separated ``--only`` names (all when empty); an unknown name exits."""
    if not only:
        return list(items)
    wanted = set(only.split(","))
    unknown = wanted - {key(item) for item in items}
    if unknown:
        raise SystemExit(f"{script}: no {sorted(unknown)} to run")
    return [item for item in items if key(item) in wanted]


def embedded_graph() -> tuple[Any, Any, Any]:
    """The embedded model, its tokenizer and its canonicalized graph (dynamic batch and
    sequence), traced on held-out text: the start of every embedded-model benchmark."""
    import rewriter
    from rewriter import zoo

    model, tokenizer = zoo.tiny_gpt2()
    ids = tokenizer(zoo.eval_text()[:4000], return_tensors="pt").input_ids[:, :64].view(2, 32)
    gm = rewriter.trace(model, (ids,), dynamic_shapes="auto")
    return model, tokenizer, rewriter.Pipeline.parse("canonicalize").run(gm).graph_module


def held_out_ids(tokenizer: Any) -> torch.Tensor:
    """The embedded model's held-out text as token ids: all 40,875, or 2,048 under --quick."""
    import rewriter
    from rewriter import zoo

    ctx = rewriter.PassContext(
        evaluation=zoo.eval_text(), tokenizer=tokenizer, eval_tokens=pick(None, 2048)
    )
    return ctx.evaluation_ids()


def interleaved(
    cases: dict[str, Callable[[], Any]], repeats: int, inner: int = 1
) -> dict[str, dict[str, float]]:
    """Run every case once per round, ``repeats`` rounds; median and spread in seconds per call.

    ``inner`` calls make one sample (for short ops, so one sample outlasts timer and scheduler
    noise). Each case runs once untimed first (warm-up).
    """
    for fn in cases.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            times[name].append((time.perf_counter() - start) / inner)
    return {
        name: {
            "median_s": statistics.median(values),
            "min_s": min(values),
            "max_s": max(values),
            "runs": len(values),
        }
        for name, values in times.items()
    }


def environment() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "processor": platform.processor(),
    }


def results_dir() -> Path:
    """Where JSON and plots go: ``results/``, or ``results/quick/`` under ``--quick``."""
    path = RESULTS / "quick" if QUICK else RESULTS
    path.mkdir(parents=True, exist_ok=True)
    return path


def write(name: str, data: dict[str, Any]) -> Path:
    path = results_dir() / f"{name}.json"
    record = {"environment": environment(), "quick": QUICK, **data}
    path.write_text(json.dumps(record, indent=2))
    return path
