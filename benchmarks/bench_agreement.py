"""Greedy token agreement of approximate rewrites with the original, on the embedded model's
step graph (:func:`rewriter.deploy.agreement`): ``l1quant`` at several widths, with and without
L1 norms, and ``linearize`` variants. Held-out prompts (60-character slices of the evaluation
text), greedy continuation; the fraction of positions with the original's token and the mean
common prefix. JSON.

    .venv/bin/python benchmarks/bench_agreement.py [--prompts 6] [--tokens 24]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _common import parse, pick, write

import rewriter
from rewriter import deploy, zoo

REWRITES = [
    "l1quant(norm=keep,bits=8)",
    "l1quant(norm=keep,bits=4)",
    "l1quant(norm=keep,bits=3)",
    "l1quant(bits=8)",
    "l1quant(bits=4)",
    "linearize(feature_map=elu)",
    "linearize",
    "linearize(window=16)",
    "linearize(window=64)",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=6)
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--rewrites", default=";".join(REWRITES), help="';'-separated specs")
    args = parse(parser)
    args.prompts, args.tokens = pick(args.prompts, 2), pick(args.tokens, 4)
    quick = ["l1quant(norm=keep,bits=4)", "linearize(fit_steps=2)"]
    rewrites = pick(args.rewrites.split(";"), quick)
    warnings.filterwarnings("ignore")
    model, tokenizer = zoo.tiny_gpt2()
    ids = torch.tensor(tokenizer.encode(zoo.calibration_text()[:2000])[:16]).view(2, 8)
    step = deploy.trace_causal_lm(model, ids)
    text = zoo.eval_text()
    prompts = [text[i : i + 60] for i in range(0, 1000 * args.prompts, 1000)]
    ctx = rewriter.PassContext(
        calibration=zoo.calibration_text(), tokenizer=tokenizer, progress=False
    )
    base = deploy.split(step)
    results = {}
    for spec in rewrites:
        start = time.perf_counter()
        out = rewriter.Pipeline.parse(f"canonicalize,{spec}").run(step, ctx).graph_module
        seconds = time.perf_counter() - start
        report = deploy.agreement(base, deploy.split(out), tokenizer, prompts, args.tokens)
        results[spec] = {
            "token_agreement": report["token_agreement"],
            "common_prefix": report["common_prefix"],
            "rewrite_seconds": seconds,
            "sample": report["candidate_texts"][0],
        }
        print(
            f"{spec:32s} agreement {report['token_agreement']:6.1%}  common prefix "
            f"{report['common_prefix']:5.1f} / {args.tokens}  ({seconds:.0f} s)",
            flush=True,
        )
    data = {
        "model": "embedded tiny GPT-2 (rewriter.zoo)",
        "prompts": prompts,
        "new_tokens": args.tokens,
        "reference_sample": report["reference_texts"][0],
        "results": results,
    }
    print(f"wrote {write('bench_agreement', data)}")


if __name__ == "__main__":
    main()
