"""l1quant: storage, ONNX Runtime latency, norm-op throughput, and perplexity against bits.

(a) Bytes of the quantized linear weights (packed codes + int8 exponents) vs float32, GPT-2 small
    shape, bits 2..8, groups 32/64/128. Target: <= 0.16x at 4 bits.
(b) ORT latency, GPT-2 small shape (random weights), batch 1, T=1 and T=256: float32 vs 4-bit
    group 64, MatMulNBits at accuracy_level 0 (exact) and 4 (int8 activations), head kept in
    float or quantized. Target: T=1 <= 0.5x float32 at level 4 with the head quantized.
(c) One norm op on [8, 512, 768]: L1 norm (our lowering) vs LayerNormalization in ORT, and the
    same in torch eager.
(d) Perplexity on the embedded model's held-out text against bits 2..8 (group 64, head in
    float): ShiftQuant-style vs float-scale round-to-nearest; the L1 norm alone (gaussian and
    calibrated constants) and combined with 4-bit weights. JSON and a PNG plot.

Interleaved rounds, medians; JSON in benchmarks/results/bench_l1quant.json.

    python benchmarks/bench_l1quant.py [--repeats 7] [--skip-latency]
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
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from _common import embedded_graph, held_out_ids, interleaved, parse, pick, results_dir, write
from rewriter.passes.l1quant import round_to_nearest_baseline

import rewriter
from rewriter import zoo
from rewriter.pipeline.metrics import perplexity_of_ids
from rewriter.verify.families import ModelSpec

onnx = rewriter.backends.onnx
GPT2_SMALL = ModelSpec("gpt2", layers=12, heads=12, head_dim=64, vocab=50257, max_positions=1024)
QUICK_MODEL = ModelSpec("gpt2", layers=2, heads=2, head_dim=32, vocab=512, max_positions=512)


def _gpt2_small() -> torch.fx.GraphModule:
    model = GPT2_SMALL.build()
    gm = rewriter.trace(model, GPT2_SMALL.example_inputs(batch=2, seq=16), dynamic_shapes="auto")
    return rewriter.Pipeline.parse("canonicalize").run(gm).graph_module


def _quiet() -> rewriter.PassContext:
    return rewriter.PassContext(progress=False, measure_error=False)


def storage(gm: torch.fx.GraphModule) -> dict[str, object]:
    rows = {}
    for group in pick((32, 64, 128), (64,)):
        for bits in pick(range(2, 9), (4,)):
            spec = f"l1quant(norm=keep,bits={bits},group={group})"
            metrics = rewriter.Pipeline.parse(spec).run(gm, _quiet()).report.records[0].metrics
            rows[f"b{bits}_g{group}"] = metrics["weight_bytes_ratio"]
    print(f"bytes vs float32 at 4 bits, group 64: {rows['b4_g64']:.4f}x (target <= 0.16)")
    return rows


def latency(gm: torch.fx.GraphModule, repeats: int, threads: int) -> dict[str, object]:
    graphs = {
        "fp32": gm,
        "q4": rewriter.Pipeline.parse("l1quant(norm=keep,bits=4)").run(gm, _quiet()).graph_module,
        "q4_head": rewriter.Pipeline.parse("l1quant(norm=keep,bits=4,head=true)")
        .run(gm, _quiet())
        .graph_module,
    }
    results: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as tmp:
        sessions = {}
        for name, graph in graphs.items():
            levels = (0,) if name == "fp32" else (0, 4)
            for level in levels:
                path = Path(tmp) / f"{name}_{level}.onnx"
                onnx.export(graph, None, path, accuracy_level=level)
                key = name if name == "fp32" else f"{name}_acc{level}"
                sessions[key] = onnx.session(path, threads=threads, spinning=False)
            print(f"exported {name}", flush=True)
        for length in (1, 256):
            ids = torch.randint(0, GPT2_SMALL.vocab, (1, length)).numpy()
            cases = {
                name: (lambda s=s, ids=ids: s.run(None, {"input_ids": ids}))
                for name, s in sessions.items()
            }
            timing = interleaved(cases, repeats, inner=10 if length == 1 else 1)
            base = timing["fp32"]["median_s"]
            ratios = {name: t["median_s"] / base for name, t in timing.items()}
            results[f"T{length}"] = {"results": timing, "time_vs_fp32": ratios}
            print(
                f"T={length}: time vs fp32: "
                + ", ".join(f"{k} {v:.3f}x" for k, v in ratios.items())
            )
    return results


class LayerNormOp(torch.nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.rand(d) + 0.5)
        self.bias = torch.nn.Parameter(torch.randn(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, 1e-5)


class L1NormOp(LayerNormOp):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.rewriter.l1_norm(x, self.weight, self.bias, 3e-3, True, 1.2533)


def norm_ops(repeats: int, threads: int) -> dict[str, object]:
    x = torch.randn(8, 512, 768)
    modules = {"layer_norm": LayerNormOp(768), "l1_norm": L1NormOp(768)}
    results: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as tmp:
        sessions = {}
        for name, module in modules.items():
            gm = rewriter.trace(module, (x,))
            path = onnx.export(gm, None, Path(tmp) / f"{name}.onnx").path
            sessions[name] = onnx.session(path, threads=threads, spinning=False)
        feed = {"x": x.numpy()}
        name_of = {n: s.get_inputs()[0].name for n, s in sessions.items()}
        ort_cases = {
            n: (lambda s=s, n=n: s.run(None, {name_of[n]: feed["x"]})) for n, s in sessions.items()
        }
        ort = interleaved(ort_cases, repeats, inner=5)
    with torch.no_grad():
        torch_cases = {n: (lambda m=m: m(x)) for n, m in modules.items()}
        eager = interleaved(torch_cases, repeats, inner=5)
    for label, timing in (("ort", ort), ("torch", eager)):
        ratio = timing["layer_norm"]["median_s"] / timing["l1_norm"]["median_s"]
        results[label] = {"results": timing, "l1_speed_vs_layer_norm": ratio}
        print(f"{label}: L1 norm runs at {ratio:.2f}x LayerNorm's speed")
    return results


def perplexity_curve() -> dict[str, object]:
    _, tokenizer, gm = embedded_graph()
    ctx = rewriter.PassContext(
        calibration=zoo.calibration_text(), tokenizer=tokenizer, progress=False, measure_error=False
    )
    eval_ids = held_out_ids(tokenizer)
    base = perplexity_of_ids(gm, eval_ids)
    rows = []
    for bits in pick(range(2, 9), (4,)):
        ours = rewriter.Pipeline.parse(f"l1quant(norm=keep,bits={bits})").run(gm, ctx).graph_module
        rtn = round_to_nearest_baseline(gm, bits, 64)
        row = {
            "bits": bits,
            "shiftquant": perplexity_of_ids(ours, eval_ids),
            "float_rtn": perplexity_of_ids(rtn, eval_ids),
        }
        rows.append(row)
        print(
            f"{bits} bits: ShiftQuant-style {row['shiftquant']:.2f}, float RTN "
            f"{row['float_rtn']:.2f} (original {base:.2f})",
            flush=True,
        )
    norms = {}
    for spec in (
        "l1quant(bits=0)",
        "l1quant(bits=0,factor=calibrated)",
        "l1quant(bits=4,factor=calibrated)",
        "l1quant(bits=8,factor=calibrated)",
    ):
        graph = rewriter.Pipeline.parse(spec).run(gm, ctx).graph_module
        norms[spec] = perplexity_of_ids(graph, eval_ids)
        print(f"{spec}: {norms[spec]:.2f}", flush=True)
    four = next(r for r in rows if r["bits"] == 4)
    ratio4 = math.log(four["shiftquant"] / base) / math.log(four["float_rtn"] / base)
    return {"baseline_ppl": base, "rows": rows, "norms": norms, "increase_ratio_4bit": ratio4}


def plot(curve: dict[str, object], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = curve["rows"]
    figure, axis = plt.subplots(figsize=(6, 4))
    bits = [r["bits"] for r in rows]
    axis.plot(bits, [r["shiftquant"] for r in rows], "o-", label="ShiftQuant-style (power-of-two)")
    axis.plot(bits, [r["float_rtn"] for r in rows], "s--", label="float-scale RTN")
    axis.axhline(curve["baseline_ppl"], color="gray", linestyle=":", label="float32")
    axis.set_yscale("log")
    axis.set_xlabel("weight bits (group 64, head in float)")
    axis.set_ylabel("held-out perplexity")
    axis.set_title("l1quant on the embedded tiny GPT-2")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--skip-latency", action="store_true")
    args = parse(parser)
    global GPT2_SMALL
    GPT2_SMALL = pick(GPT2_SMALL, QUICK_MODEL)
    args.repeats = pick(args.repeats, 1)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("REWRITER_NO_PROGRESS", "1")
    data: dict[str, object] = {}
    data["perplexity"] = perplexity_curve()
    gm = _gpt2_small()
    data["bytes_vs_fp32"] = storage(gm)
    data["norm_ops"] = norm_ops(args.repeats, args.threads)
    if not args.skip_latency:
        data["ort_latency"] = latency(gm, args.repeats, args.threads)
    data["plot"] = plot(data["perplexity"], results_dir() / "bench_l1quant.png")
    path = write("bench_l1quant", data)
    print(f"wrote {path}" + (" and bench_l1quant.png" if data["plot"] else " (no plot)"))


if __name__ == "__main__":
    main()
