"""Generation speed with a KV cache: prefill and decode tokens per second against context length,
torch vs ONNX Runtime, original vs 4-bit (l1quant) vs linearized attention, from the
prefill/decode graphs of :mod:`rewriter.deploy`.

Model: a Llama-shaped causal LM (4 layers, width 256, 8 heads, vocabulary 8192, rotary positions,
random weights), batch 1. For each context length T: prefill of T tokens (tokens/s = T / time),
then 16 decode steps from that context (tokens/s = 16 / time); interleaved rounds, medians; and
the bytes of the cache the decode graph carries. The linearized variant (Hedgehog feature maps,
unfitted: speed does not depend on the fit) caches each layer's fixed-size recurrent state
instead of keys and values. JSON and a PNG plot.

    .venv/bin/python benchmarks/bench_generate.py [--repeats 3] [--contexts 128,512,1024,2048,4096]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _common import parse, pick, results_dir, write

import rewriter
from rewriter import deploy
from rewriter.verify.families import ModelSpec

MODEL = ModelSpec(
    "llama", layers=4, heads=8, head_dim=32, vocab=8192, max_positions=4200, ffn_mult=4
)
DECODE_STEPS = 16
QUICK_MODEL = ModelSpec("llama", layers=1, heads=2, head_dim=16, vocab=256, max_positions=512)


def _variants(threads: int, tmp: Path) -> dict[str, object]:
    model = MODEL.build()
    step = deploy.trace_causal_lm(model, MODEL.example_inputs(batch=2, seq=8)[0])
    ctx = rewriter.PassContext(
        calibration=torch.randint(0, MODEL.vocab, (4, 64)), progress=False, measure_error=False
    )
    quantized = rewriter.Pipeline.parse("canonicalize,l1quant(norm=keep,bits=4)").run(step, ctx)
    linear = rewriter.Pipeline.parse("canonicalize,linearize(fit_steps=0)").run(step, ctx)
    graphs = {
        "original": deploy.split(step),
        "q4": deploy.split(quantized.graph_module),
        "linear": deploy.split(linear.graph_module),
    }
    runners: dict[str, object] = {}
    for name, pair in graphs.items():
        runners[f"torch/{name}"] = pair
        # 4-bit: MatMulNBits with int8 activations (accuracy level 4, the fast path; not
        # bit-exact against torch, so not checked against it)
        level = 4 if name == "q4" else 0
        runners[f"ort/{name}"] = rewriter.backends.onnx.export_causal_lm(
            pair, tmp / name, threads=threads, check=level == 0, accuracy_level=level
        )
        print(f"built {name} (torch and ORT)", flush=True)
    return runners


def _one(runner: object, context: int, generator: torch.Generator) -> tuple[float, float, int]:
    ids = torch.randint(0, MODEL.vocab, (1, context), generator=generator)
    mask = torch.ones_like(ids)
    start = time.perf_counter()
    logits, cache = runner.run_prefill(ids, mask, deploy.positions(mask))  # type: ignore[attr-defined]
    prefill = time.perf_counter() - start
    token = logits[:, -1].argmax(-1, keepdim=True)
    start = time.perf_counter()
    for _ in range(DECODE_STEPS):
        mask = torch.cat([mask, torch.ones_like(token)], 1)
        logits, cache = runner.run_decode(token, mask, deploy.positions(mask)[:, -1:], cache)  # type: ignore[attr-defined]
        token = logits[:, -1].argmax(-1, keepdim=True)
    decode = time.perf_counter() - start
    return context / prefill, DECODE_STEPS / decode, sum(_bytes(c) for c in cache)


def _bytes(value: object) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if hasattr(value, "nbytes"):  # numpy arrays
        return int(value.nbytes)
    return int(value.numpy().nbytes)  # ORT values (IO binding)


def measure(runners: dict[str, object], contexts: list[int], repeats: int) -> dict[str, object]:
    generator = torch.Generator().manual_seed(0)
    results: dict[str, object] = {}
    for context in contexts:
        samples: dict[str, list[tuple[float, float, int]]] = {name: [] for name in runners}
        for runner in runners.values():  # warm-up
            _one(runner, min(context, 64), generator)
        for _ in range(repeats):
            for name, runner in runners.items():
                samples[name].append(_one(runner, context, generator))
        row = {
            name: {
                "prefill_tokens_per_s": statistics.median(s[0] for s in values),
                "decode_tokens_per_s": statistics.median(s[1] for s in values),
                "cache_bytes": values[0][2],
            }
            for name, values in samples.items()
        }
        results[str(context)] = row
        print(
            f"T={context:>5}: "
            + "; ".join(
                f"{name} prefill {v['prefill_tokens_per_s']:.0f}/s decode "
                f"{v['decode_tokens_per_s']:.0f}/s"
                for name, v in row.items()
            ),
            flush=True,
        )
    return results


def plot(results: dict[str, object], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    contexts = [int(c) for c in results]
    names = list(next(iter(results.values())))  # type: ignore[call-overload]
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for axis, key in zip(axes, ("prefill_tokens_per_s", "decode_tokens_per_s")):
        for name in names:
            axis.plot(
                contexts, [results[str(c)][name][key] for c in contexts], marker="o", label=name
            )  # type: ignore[index]
        axis.set_xscale("log", base=2)
        axis.set_xlabel("context length")
        axis.set_ylabel(key.replace("_", " "))
        axis.grid(alpha=0.3)
    axes[0].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--contexts", default="128,512,1024,2048,4096")
    args = parse(parser)
    global MODEL
    MODEL = pick(MODEL, QUICK_MODEL)
    args.repeats, args.contexts = pick(args.repeats, 1), pick(args.contexts, "128")
    warnings.filterwarnings("ignore")
    os.environ.setdefault("REWRITER_NO_PROGRESS", "1")
    contexts = [int(c) for c in args.contexts.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        runners = _variants(args.threads, Path(tmp))
        results = measure(runners, contexts, args.repeats)
    plotted = plot(results, results_dir() / "bench_generate.png")
    data = {
        "model": repr(MODEL),
        "decode_steps": DECODE_STEPS,
        "results": results,
        "plot": plotted,
    }
    path = write("bench_generate", data)
    print(f"wrote {path}" + (" and bench_generate.png" if plotted else " (no plot)"))


if __name__ == "__main__":
    main()
