"""ln-freeze: perplexity vs number of frozen norms on the embedded model, with and without
recovery fine-tuning; ONNX Runtime latency of an LN-free GPT-2 small vs the original.

Norms are frozen least harmful first (each norm's harm measured alone, as budget mode does).
With one norm and with every norm frozen, recovery also runs with the language-modelling loss
(``recover_loss=lm``) against the default distillation; and ``budget='ppl+5%'`` runs as a user
would (no training). Writes benchmarks/results/bench_ln_freeze.json and, with matplotlib,
bench_ln_freeze.png.

    python benchmarks/bench_ln_freeze.py [--recover-steps 60] [--recover-lr 3e-4] [--repeats 7]
        [--skip-latency] [--quick]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import warnings
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _common import embedded_graph, held_out_ids, interleaved, parse, pick, results_dir, write

import rewriter
from rewriter import zoo
from rewriter.pipeline.metrics import perplexity_of_ids
from rewriter.verify.families import ModelSpec

GPT2_SMALL = ModelSpec("gpt2", layers=12, heads=12, head_dim=64, vocab=50257, max_positions=1024)
QUICK_MODEL = ModelSpec("gpt2", layers=2, heads=2, head_dim=32, vocab=512, max_positions=512)


def perplexity_curve(recover_steps: int, recover_lr: float) -> dict[str, object]:
    _, tokenizer, gm = embedded_graph()
    # Pipelines run without evaluation data (each would score the text several times); every
    # graph below is scored once on the whole held-out text.
    ctx = rewriter.PassContext(
        calibration=zoo.calibration_text(),
        tokenizer=tokenizer,
        progress=False,
        measure_error=False,
        seq_len=128,
        seed=0,
    )
    eval_ids = held_out_ids(tokenizer)
    baseline = perplexity_of_ids(gm, eval_ids)
    # Harm of each norm alone, then the order budget mode uses.
    names = [m for m in _norm_modules(gm)]
    harms = {}
    for name in names:
        one = (
            rewriter.Pipeline.parse(f"ln-freeze(norms='{_escape(name)}')").run(gm, ctx).graph_module
        )
        harms[name] = perplexity_of_ids(one, eval_ids) - baseline
    order = sorted(names, key=harms.get)
    rows = [{"frozen": 0, "norms": [], "ppl": baseline, "ppl_recovered": baseline}]
    for count in pick(range(1, len(order) + 1), (1, len(order))):
        chosen = order[:count]
        regex = "|".join(_escape(n) for n in chosen)
        frozen = rewriter.Pipeline.parse(f"ln-freeze(norms='{regex}')").run(gm, ctx).graph_module
        recovered = (
            rewriter.Pipeline.parse(
                f"ln-freeze(norms='{regex}',recover_steps={recover_steps},recover_lr={recover_lr})"
            )
            .run(gm, ctx)
            .graph_module
        )
        rows.append(
            {
                "frozen": count,
                "norms": chosen,
                "ppl": perplexity_of_ids(frozen, eval_ids),
                "ppl_recovered": perplexity_of_ids(recovered, eval_ids),
            }
        )
        line = (
            f"{count} frozen: ppl {rows[-1]['ppl']:.2f}, after {recover_steps} recovery steps "
            f"{rows[-1]['ppl_recovered']:.2f}"
        )
        if count in (1, len(order)):  # the same recovery with the language-modelling loss
            lm = rewriter.Pipeline.parse(
                f"ln-freeze(norms='{regex}',recover_steps={recover_steps},"
                f"recover_lr={recover_lr},recover_loss=lm)"
            ).run(gm, ctx)
            rows[-1]["ppl_recovered_lm"] = perplexity_of_ids(lm.graph_module, eval_ids)
            line += f" (cross-entropy instead: {rows[-1]['ppl_recovered_lm']:.2f})"
        print(f"{line} (original {baseline:.2f})", flush=True)
    budget = _budget_mode(gm, tokenizer)
    return {
        "baseline_ppl": baseline,
        "budget_ppl_5pct": budget,
        "harms": harms,
        "order": order,
        "rows": rows,
        "recover_steps": recover_steps,
        "recover_lr": recover_lr,
        "all_frozen_ce_increase": math.log(rows[-1]["ppl"] / baseline),
        "all_frozen_recovered_ce_increase": math.log(rows[-1]["ppl_recovered"] / baseline),
    }


def _budget_mode(gm: torch.fx.GraphModule, tokenizer: object) -> dict[str, object]:
    """``ln-freeze(budget='ppl+5%')`` as a user runs it: no training, scored on held-out text."""
    ctx = rewriter.PassContext(
        calibration=zoo.calibration_text(),
        evaluation=zoo.eval_text(),
        eval_tokens=pick(None, 2048),
        tokenizer=tokenizer,
        progress=False,
        measure_error=False,
        seq_len=128,
        seed=0,
    )
    result = rewriter.Pipeline.parse("ln-freeze(budget='ppl+5%')").run(gm, ctx)
    metrics = result.report.records[0].metrics
    print(
        f"budget ppl+5%: froze {len(metrics['frozen'])} of {len(_norm_modules(gm))} norms, "
        f"perplexity "
        f"{metrics['ppl_before']:.2f} -> {metrics['ppl_frozen']:.2f}",
        flush=True,
    )
    return {
        "frozen": metrics["frozen"],
        "ppl_before": metrics["ppl_before"],
        "ppl_frozen": metrics["ppl_frozen"],
    }


def _norm_modules(gm: torch.fx.GraphModule) -> list[str]:
    from rewriter.analysis.folding import norm_units
    from rewriter.ir.graph import module_path

    return [module_path(u.norm) for u in norm_units(gm, frozen=False)]


def _escape(name: str) -> str:
    return name.replace(".", r"\.")


def latency(repeats: int, threads: int) -> dict[str, object]:
    spec = GPT2_SMALL
    model = spec.build()
    gm = rewriter.trace(model, spec.example_inputs(batch=2, seq=16), dynamic_shapes="auto")
    calibration = torch.randint(0, spec.vocab, (8, 128), generator=torch.Generator().manual_seed(1))
    ctx = rewriter.PassContext(calibration=calibration, progress=False, measure_error=False)
    graphs = {
        "original": rewriter.Pipeline.parse("canonicalize").run(gm, ctx).graph_module,
        "ln_free": rewriter.Pipeline.parse("canonicalize,ln-freeze,fold-ln")
        .run(gm, ctx)
        .graph_module,
    }
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        sessions = {}
        for name, graph in graphs.items():
            path = rewriter.backends.onnx.export(graph, None, Path(tmp) / f"{name}.onnx").path
            sessions[name] = rewriter.backends.onnx.session(path, threads=threads, spinning=False)
        for length in (1, 256):
            ids = torch.randint(0, spec.vocab, (1, length)).numpy()
            cases = {
                name: (lambda s=s, ids=ids: s.run(None, {"input_ids": ids}))
                for name, s in sessions.items()
            }
            timing = interleaved(cases, repeats, inner=20 if length == 1 else 1)
            results[f"T{length}"] = {
                "results": timing,
                "ln_free_speed_vs_original": timing["original"]["median_s"]
                / timing["ln_free"]["median_s"],
            }
            print(
                f"T={length}: LN-free "
                f"{results[f'T{length}']['ln_free_speed_vs_original']:.3f}x the original's speed"
            )
    return results


def plot(curve: dict[str, object], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = curve["rows"]
    figure, axis = plt.subplots(figsize=(6, 4))
    axis.plot([r["frozen"] for r in rows], [r["ppl"] for r in rows], "o-", label="frozen")
    axis.plot(
        [r["frozen"] for r in rows],
        [r["ppl_recovered"] for r in rows],
        "s-",
        label=f"frozen + {curve['recover_steps']} recovery steps",
    )
    axis.axhline(curve["baseline_ppl"], color="gray", linestyle="--", label="original")
    axis.set_xlabel("norms frozen (least harmful first)")
    axis.set_ylabel("held-out perplexity")
    axis.set_title("ln-freeze on the embedded tiny GPT-2")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recover-steps", type=int, default=60)
    parser.add_argument("--recover-lr", type=float, default=3e-4)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--skip-latency", action="store_true", help="perplexity only")
    args = parse(parser)
    global GPT2_SMALL
    GPT2_SMALL = pick(GPT2_SMALL, QUICK_MODEL)
    args.repeats, args.recover_steps = pick(args.repeats, 1), pick(args.recover_steps, 2)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("REWRITER_NO_PROGRESS", "1")
    curve = perplexity_curve(args.recover_steps, args.recover_lr)
    timing = None if args.skip_latency else latency(args.repeats, args.threads)
    plotted = plot(curve, results_dir() / "bench_ln_freeze.png")
    path = write("bench_ln_freeze", {"perplexity": curve, "ort_latency": timing, "plot": plotted})
    print(
        f"wrote {path}" + (" and bench_ln_freeze.png" if plotted else " (no matplotlib: no plot)")
    )


if __name__ == "__main__":
    main()
