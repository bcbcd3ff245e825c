"""linearize: held-out perplexity of each attention form on the embedded model, before and after
attention transfer, and the share of the gap to softmax that transfer closes.

Every variant is the embedded model's graph after ``canonicalize,linearize(...)``, calibrated on
its calibration text (seeded) and scored on all held-out tokens. Writes
benchmarks/results/bench_linearize_ppl.json. The README's linearize table is this script's output.

    .venv/bin/python benchmarks/bench_linearize_ppl.py [--steps 100] [--long-steps 300]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(__file__))
from _common import embedded_graph, held_out_ids, parse, pick, write

import rewriter
from rewriter import zoo
from rewriter.pipeline.metrics import perplexity_of_ids


def variants(steps: int, long_steps: int) -> dict[str, str]:
    """Label -> linearize options (the README's rows)."""
    return {
        "elu+1, no training": "feature_map=elu",
        "Hedgehog, unfitted": "fit_steps=0",
        "Hedgehog, fitted": f"fit_steps={steps}",
        "Hedgehog + window 16, unfitted": "window=16,fit_steps=0",
        "Hedgehog + window 16, fitted": f"window=16,fit_steps={steps}",
        "Hedgehog + window 64, fitted": f"window=64,fit_steps={steps}",
        f"Hedgehog, fitted {long_steps} steps": f"fit_steps={long_steps}",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100, help="transfer steps per layer")
    parser.add_argument("--long-steps", type=int, default=300, help="the saturation row")
    args = parse(parser)  # --quick: 2 and 4 steps, 2048 held-out tokens
    args.steps, args.long_steps = pick(args.steps, 2), pick(args.long_steps, 4)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("REWRITER_NO_PROGRESS", "1")
    _, tokenizer, gm = embedded_graph()
    ctx = rewriter.PassContext(
        calibration=zoo.calibration_text(),
        tokenizer=tokenizer,
        progress=False,
        measure_error=False,
        seed=0,
    )
    eval_ids = held_out_ids(tokenizer)
    softmax = perplexity_of_ids(gm, eval_ids)
    print(f"softmax (original): {softmax:.2f} on {eval_ids.numel():,} held-out tokens", flush=True)
    rows: dict[str, dict[str, object]] = {}
    for label, options in variants(args.steps, args.long_steps).items():
        started = time.perf_counter()
        out = rewriter.Pipeline.parse(f"linearize({options})").run(gm, ctx).graph_module
        seconds = time.perf_counter() - started
        rows[label] = {"options": options, "ppl": perplexity_of_ids(out, eval_ids)}
        rows[label]["rewrite_seconds"] = seconds
        print(f"{label}: {rows[label]['ppl']:.2f} ({seconds:.0f} s)", flush=True)

    def closed(unfitted: str, fitted: str) -> float:
        before, after = rows[unfitted]["ppl"], rows[fitted]["ppl"]
        return (before - after) / (before - softmax)  # type: ignore[operator]

    gaps = {
        "Hedgehog, fitted": closed("Hedgehog, unfitted", "Hedgehog, fitted"),
        "Hedgehog + window 16, fitted": closed(
            "Hedgehog, unfitted", "Hedgehog + window 16, fitted"
        ),
        "Hedgehog + window 64, fitted": closed(
            "Hedgehog, unfitted", "Hedgehog + window 64, fitted"
        ),
    }
    for label, share in gaps.items():
        print(f"gap to softmax closed, {label} (from unfitted Hedgehog): {share:.0%}")
    data = {
        "model": "embedded tiny GPT-2 (rewriter.zoo)",
        "held_out_tokens": eval_ids.numel(),
        "steps": args.steps,
        "long_steps": args.long_steps,
        "softmax_ppl": softmax,
        "variants": rows,
        "gap_closed_from_unfitted_hedgehog": gaps,
    }
    print(f"wrote {write('bench_linearize_ppl', data)}")


if __name__ == "__main__":
    main()
