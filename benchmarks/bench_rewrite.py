"""Trace, canonicalize and pipeline times on GPT-2-small-shaped models (random weights).

Prints ratios measured in one run (interleaved rounds, medians) and writes
benchmarks/results/bench_rewrite.json. Targets: canonicalize <= 0.25x trace time; 24 layers
<= 2.2x the time of 12 layers.

    python benchmarks/bench_rewrite.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _common import interleaved, parse, pick, write

import rewriter
from rewriter.verify.families import ModelSpec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--pipeline", default="canonicalize")
    args = parse(parser)  # --quick: 2 and 4 narrow layers, 1 repeat
    args.repeats = pick(args.repeats, 1)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("REWRITER_NO_PROGRESS", "1")
    torch.set_num_threads(max(1, torch.get_num_threads()))

    models, graphs = {}, {}
    for layers in (12, 24):
        spec = ModelSpec(
            "gpt2",
            layers=pick(layers, layers // 6),
            heads=pick(12, 2),
            head_dim=pick(64, 16),
            vocab=pick(50257, 256),
            max_positions=pick(1024, 256),
        )
        models[layers] = (spec.build(), spec.example_inputs(batch=2, seq=128))
        graphs[layers] = rewriter.trace(*models[layers], dynamic_shapes="auto")
    canonicalize = rewriter.Pipeline.parse("canonicalize")
    pipeline = rewriter.Pipeline.parse(args.pipeline)

    cases = {}
    for layers in (12, 24):
        model, inputs = models[layers]
        gm = graphs[layers]
        cases[f"trace_{layers}"] = lambda m=model, i=inputs: rewriter.trace(
            m, i, dynamic_shapes="auto"
        )
        cases[f"canonicalize_{layers}"] = lambda g=gm: _run_without_check(canonicalize, g)
        cases[f"pipeline_{layers}"] = lambda g=gm: _run_without_check(pipeline, g)
    results = interleaved(cases, args.repeats)
    ratios = {
        "canonicalize_over_trace_12": results["canonicalize_12"]["median_s"]
        / results["trace_12"]["median_s"],
        "canonicalize_over_trace_24": results["canonicalize_24"]["median_s"]
        / results["trace_24"]["median_s"],
        "trace_24_over_12": results["trace_24"]["median_s"] / results["trace_12"]["median_s"],
        "canonicalize_24_over_12": results["canonicalize_24"]["median_s"]
        / results["canonicalize_12"]["median_s"],
        "pipeline_24_over_12": results["pipeline_24"]["median_s"]
        / results["pipeline_12"]["median_s"],
    }
    targets = {
        "canonicalize_over_trace_12": 0.25,
        "canonicalize_over_trace_24": 0.25,
        "trace_24_over_12": 2.2,
        "canonicalize_24_over_12": 2.2,
        "pipeline_24_over_12": 2.2,
    }
    for name, stats in results.items():
        median, low, high = (stats[k] * 1000 for k in ("median_s", "min_s", "max_s"))
        print(f"{name:>18}: median {median:8.1f} ms  (min {low:.1f}, max {high:.1f})")
    for name, value in ratios.items():
        verdict = "ok" if value <= targets[name] else "MISSES"
        print(f"{name:>28}: {value:.3f}  (target <= {targets[name]}: {verdict})")
    path = write(
        "bench_rewrite",
        {"pipeline": args.pipeline, "results": results, "ratios": ratios, "targets": targets},
    )
    print(f"wrote {path}")


def _run_without_check(pipeline: rewriter.Pipeline, gm: torch.fx.GraphModule) -> None:
    # The pipeline's per-pass error check runs the model; time the rewriting alone.
    pipeline.run(gm, rewriter.PassContext(measure_error=False, progress=False))


if __name__ == "__main__":
    main()
