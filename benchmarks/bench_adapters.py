"""Adapters on the embedded model: trainable parameters and loss after N steps, per method.

LoRA (r = 1, 4, 8), NOLA, LoRA-XS and LoRA-SB on every linear map but the head, trained with
``rewriter.train`` on the calibration text (same batches, seed, steps and schedule for all; each
method at the learning rate its paper uses for its trainable tensors), then scored on held-out
text. PEFT's LoRA parameter count at the same rank is reported next to ours. JSON and a PNG plot.

    python benchmarks/bench_adapters.py [--steps 100]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _common import parse, pick, results_dir, write

import rewriter
from rewriter import zoo
from rewriter.analysis.adapters import records
from rewriter.ir.graph import is_lm_head, linear_maps
from rewriter.pipeline.metrics import perplexity_of_ids

METHODS = {
    "lora r=1": ("lora(r=1,alpha=2)", 1e-3),
    "lora r=4": ("lora(r=4,alpha=8)", 1e-3),
    "lora r=8": ("lora(r=8,alpha=16)", 1e-3),
    "nola k=l=128": ("nola(k=128,l=128,r=8,alpha=16)", 1e-2),
    "lora-xs r=16": ("lora-xs(r=16,alpha=16)", 2e-3),
    "lora-sb r=16": ("lora-sb(r=16,samples=4)", 2e-3),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    args = parse(parser)
    args.steps = pick(args.steps, 4)
    warnings.filterwarnings("ignore")
    model, tokenizer = zoo.tiny_gpt2()
    ids = tokenizer(zoo.eval_text()[:4000], return_tensors="pt").input_ids[:, :64].view(2, 32)
    gm = rewriter.trace(model, (ids,), dynamic_shapes="auto")
    ctx = rewriter.PassContext(
        calibration=zoo.calibration_text(),
        tokenizer=tokenizer,
        seq_len=128,
        batch_size=8,
        progress=False,
        measure_error=False,
    )
    batches = ctx.batches()
    eval_ids = rewriter.PassContext(
        evaluation=zoo.eval_text(), tokenizer=tokenizer, eval_tokens=pick(None, 2048)
    ).evaluation_ids()
    base = perplexity_of_ids(gm, eval_ids)
    rows = {}
    for label, (spec, lr) in METHODS.items():
        injected = rewriter.Pipeline.parse(spec).run(gm, ctx).graph_module
        trainable = sum(p.numel() for p in injected.parameters() if p.requires_grad)
        start = time.perf_counter()
        report = rewriter.train(
            injected,
            batches,
            steps=args.steps,
            lr=lr,
            seed=0,
            warmup=args.steps // 10,
            schedule="cosine",
            show_progress=False,
        )
        rank = records(injected)[0].rank
        peft = sum(
            rank * (lin.in_features + lin.out_features)
            for lin in linear_maps(gm)
            if not is_lm_head(lin)
        )
        rows[label] = {
            "spec": spec,
            "lr": lr,
            "trainable": trainable,
            "peft_lora_same_rank": peft,
            "loss_first": report.first,
            "loss_last_10": sum(report.losses[-10:]) / 10,
            "curve": report.losses,
            "ppl": perplexity_of_ids(injected, eval_ids),
            "seconds": time.perf_counter() - start,
        }
        print(
            f"{label}: {trainable:,} trainable (PEFT LoRA at r={rank}: {peft:,}), loss "
            f"{report.first:.3f} -> {rows[label]['loss_last_10']:.3f}, held-out ppl "
            f"{rows[label]['ppl']:.2f} (base {base:.2f})",
            flush=True,
        )
    plotted = plot(rows, results_dir() / "bench_adapters.png")
    path = write(
        "bench_adapters", {"base_ppl": base, "steps": args.steps, "methods": rows, "plot": plotted}
    )
    print(f"wrote {path}")


def plot(rows: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    figure, axis = plt.subplots(figsize=(6, 4))
    for label, row in rows.items():
        curve = torch.tensor(row["curve"])
        smooth = curve.unfold(0, 10, 1).mean(-1) if len(curve) >= 10 else curve
        axis.plot(smooth.tolist(), label=f"{label} ({row['trainable']:,})")
    axis.set_xlabel("step")
    axis.set_ylabel("training loss (10-step mean)")
    axis.set_title("adapters on the embedded tiny GPT-2 (trainable parameters)")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    return True


if __name__ == "__main__":
    main()
