"""Fuzz campaign: every exact pass on random configs of every family, against the original model.

For each exact pass registered (run after ``canonicalize``), N random model configs per family
(``ModelSpec.sample``: layers, heads, widths, vocabulary, tied heads, biases, outlier channels,
family switches) are built, traced with dynamic batch and sequence, rewritten, and compared with
the unmodified model on the example inputs and on random inputs of other shapes, with the
tolerance rule. Mismatches and crashes are reported with the reproducing spec; configs a pass
refuses by design (a Post-LN model offered to a Pre-LN pass) are counted as refusals.

    python benchmarks/fuzz_equivalence.py --n 1000            # the full campaign
    python benchmarks/fuzz_equivalence.py --n 2 --passes canonicalize   # what CI samples
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
import traceback
import warnings

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _common import parse, pick, write
from rewriter.passes import available, get_pass

import rewriter
from rewriter.errors import PassError, PreconditionError
from rewriter.verify.families import FAMILIES, ModelSpec


def exact_passes() -> list[str]:
    return [name for name in available() if getattr(get_pass(name), "exact", False)]


def trace_one(spec: ModelSpec, rng: random.Random) -> tuple[torch.nn.Module, object]:
    """The model of ``spec`` and its trace, shared by every pass checked on this config
    (pipelines never change their input graph)."""
    model = spec.build()
    gm = rewriter.trace(model, spec.example_inputs(seq=rng.randint(2, 12)), dynamic_shapes="auto")
    return model, gm


def check_one(
    model: torch.nn.Module,
    gm: object,
    spec: ModelSpec,
    pipeline: rewriter.Pipeline,
    rng: random.Random,
    inputs: int,
) -> dict:
    # A token corpus for passes that keep what data uses (vocab-trim): a random part of the
    # vocabulary; inputs outside it are projected onto kept tokens by the comparison.
    corpus = torch.randint(
        0,
        spec.vocab,
        (1, rng.randint(1, 3 * spec.vocab)),
        generator=torch.Generator().manual_seed(rng.randrange(2**31)),
    )
    try:
        ctx = rewriter.PassContext(progress=False, calibration=corpus)
        out = pipeline.run(gm, ctx).graph_module
    except PassError as error:
        if isinstance(error.cause, PreconditionError):
            return {"status": "refused", "reason": str(error.cause)}
        raise
    worst = rewriter.verify.compare(model, out)
    for _ in range(inputs):
        shape = (rng.randint(1, 4), rng.randint(1, min(spec.max_positions, 24)))
        ids = torch.randint(
            0, spec.vocab, shape, generator=torch.Generator().manual_seed(rng.randrange(2**31))
        )
        report = rewriter.verify.compare(model, out, (ids,))
        if not report.ok or report.max_abs > worst.max_abs:
            worst = report
        if not report.ok:
            break
    return {"status": "ok" if worst.ok else "mismatch", "error": worst.to_dict()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000, help="random configs per family and pass")
    parser.add_argument("--passes", default=",".join(exact_passes()), help="exact passes to fuzz")
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--inputs", type=int, default=3, help="random inputs per config")
    parser.add_argument("--seed", type=int, default=0)
    args = parse(parser, argv)  # --quick: one config and input for gpt2 and llama
    args.n, args.inputs = pick(args.n, 1), pick(args.inputs, 1)
    args.families = pick(args.families, "gpt2,llama")
    warnings.filterwarnings("ignore")
    os.environ.setdefault("REWRITER_NO_PROGRESS", "1")
    rng = random.Random(args.seed)
    results: dict[str, dict[str, dict[str, int]]] = {}
    failures = []
    started = time.time()
    pass_names = args.passes.split(",")
    pipelines = {
        name: rewriter.Pipeline.parse(
            "canonicalize" if name == "canonicalize" else f"canonicalize,{name}"
        )
        for name in pass_names
    }
    tally = {
        (name, family): {"ok": 0, "refused": 0, "mismatch": 0, "crash": 0}
        for name in pass_names
        for family in args.families.split(",")
    }
    for family in args.families.split(","):
        for _ in range(args.n):
            spec = ModelSpec.sample(rng, family)
            try:
                traced: tuple | None = trace_one(spec, rng)
            except Exception as error:  # noqa: BLE001 - a crash is a finding, with its spec
                traced, trace_error = None, error
            for pass_name, pipeline in pipelines.items():
                try:
                    if traced is None:
                        raise trace_error
                    outcome = check_one(*traced, spec, pipeline, rng, args.inputs)
                except Exception as error:  # noqa: BLE001 - a crash is a finding, with its spec
                    outcome = {
                        "status": "crash",
                        "reason": f"{type(error).__name__}: {error}",
                        "traceback": traceback.format_exc(limit=4),
                    }
                tally[(pass_name, family)][outcome["status"]] += 1
                if outcome["status"] in ("mismatch", "crash"):
                    failures.append({"pass": pass_name, "spec": repr(spec), **outcome})
                    print(f"FAIL {pass_name} {outcome['status']}: {spec!r}", flush=True)
        for pass_name in pass_names:
            counts = tally[(pass_name, family)]
            results.setdefault(pass_name, {})[family] = counts
            print(f"{pass_name:>14} {family:>9}: {counts}", flush=True)
    path = write(
        "fuzz_equivalence",
        {
            "n_per_family": args.n,
            "seed": args.seed,
            "seconds": round(time.time() - started, 1),
            "results": results,
            "failures": failures,
        },
    )
    print(f"{len(failures)} failures; wrote {path}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
