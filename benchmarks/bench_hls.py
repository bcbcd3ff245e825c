"""HLS export: C-simulation error against the graph vs fixed-point width for the tested blocks,
the modelled resources of the norm and linear variants, and the same MLP through hls4ml side by
side. JSON and a PNG plot.

* Error: GPT-2-shaped blocks (1 layer, width 32, 2 heads, 8 tokens) after ``prernorm,fold-ln``,
  ``crmsnorm``, ``l1quant(bits=4)`` and ``linearize(feature_map=elu)``, and a 16-48-5 GELU MLP,
  exported at ``ap_fixed<W,8>`` for W in 12..24 (weights the same width), max abs error of the
  C simulation against the graph's float32 output.
* Resources (modelled from the reuse factor, not synthesized): DSPs and BRAM18 of LayerNorm vs
  RMSNorm vs L1 norm layers, float vs 4-bit ShiftQuant linears, per block.
* hls4ml: the same ReLU MLP (hls4ml's PyTorch frontend has no GELU) through
  ``convert_from_pytorch_model`` + ``compile`` + ``predict`` vs our export + ``csim``: error at
  ``ap_fixed<16,6>`` and wall time.

    .venv/bin/python benchmarks/bench_hls.py [--widths 12,14,16,18,20,22,24]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _common import parse, pick, results_dir, write
from rewriter.backends import hls

import rewriter
from rewriter.verify.families import ModelSpec

BLOCKS = {
    "layernorm (original)": "canonicalize",
    "prernorm,fold-ln (RMSNorm)": "canonicalize,prernorm,fold-ln",
    "crmsnorm": "canonicalize,crmsnorm",
    "l1quant(bits=4) (L1 norm, 4-bit)": "canonicalize,l1quant(bits=4)",
    "linearize(elu)": "canonicalize,linearize(feature_map=elu)",
}


def _blocks() -> dict[str, tuple]:
    config = ModelSpec("gpt2", vocab=64, layers=1, heads=2, head_dim=16, seed=0)
    model = config.build()
    example = config.example_inputs(batch=1, seq=8)
    gm = rewriter.trace(model, example)
    ctx = rewriter.PassContext(
        calibration=torch.randint(0, 64, (4, 8)), progress=False, batch_size=1
    )
    found = {}
    for name, spec in BLOCKS.items():
        out = rewriter.Pipeline.parse(spec).run(gm, ctx).graph_module
        found[name] = (out, example, "transformer.h.0")
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(16, 48), torch.nn.GELU(), torch.nn.Linear(48, 5))
    x = torch.randn(8, 16)
    found["mlp 16-48-5 (GELU)"] = (rewriter.trace(mlp.eval(), (x,)), (x,), None)
    return found


def _error(gm, example, subgraph, precision, directory: Path) -> tuple[float, dict]:
    project = hls.export(gm, example, directory, precision=precision, subgraph=subgraph)
    inputs, wants = hls.port_values(gm, example, project)
    gots = hls.csim(directory, inputs)
    error = max(float((g - w.double()).abs().max()) for g, w in zip(gots, wants))
    return error, project.resources


def _hls4ml_side_by_side(directory: Path) -> dict:
    try:
        import hls4ml
    except ImportError:
        return {"skipped": "hls4ml is not installed"}
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 48), torch.nn.ReLU(), torch.nn.Linear(48, 5))
    model.eval()
    x = torch.randn(64, 16)
    with torch.no_grad():
        want = model(x).double()
    start = time.perf_counter()
    config = hls4ml.utils.config_from_pytorch_model(
        model, (16,), default_precision="ap_fixed<16,6>", default_reuse_factor=1
    )
    theirs = hls4ml.converters.convert_from_pytorch_model(
        model, output_dir=str(directory / "hls4ml"), hls_config=config, backend="Vitis"
    )
    theirs.compile()
    predicted = torch.from_numpy(theirs.predict(x.numpy().astype("float32"))).double()
    hls4ml_seconds = time.perf_counter() - start
    start = time.perf_counter()
    precision = hls.Precision(data="ap_fixed<16,6>", weight="ap_fixed<16,6>")
    hls.export(rewriter.trace(model, (x,)), (x,), directory / "ours", precision=precision)
    (ours,) = hls.csim(directory / "ours", [x])
    our_seconds = time.perf_counter() - start
    return {
        "precision": "ap_fixed<16,6> data and weights",
        "hls4ml": {
            "max_abs_error": float((predicted.reshape(want.shape) - want).abs().max()),
            "seconds": hls4ml_seconds,
        },
        "rewriter": {"max_abs_error": float((ours - want).abs().max()), "seconds": our_seconds},
    }


def plot(errors: dict[str, dict[int, float]], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    figure, axis = plt.subplots(figsize=(7, 4))
    for name, by_width in errors.items():
        widths = sorted(by_width)
        axis.semilogy(widths, [by_width[w] for w in widths], marker="o", label=name)
    axis.axhline(2e-2, color="grey", linestyle="--", linewidth=0.8)
    axis.set_xlabel("ap_fixed<W, 8> width W")
    axis.set_ylabel("max |csim - graph|")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", default="12,14,16,18,20,22,24")
    args = parse(parser)
    warnings.filterwarnings("ignore")
    widths = [int(w) for w in pick(args.widths, "18").split(",")]
    errors: dict[str, dict[int, float]] = {}
    resources: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        blocks = list(_blocks().items())
        for name, (gm, example, subgraph) in pick(blocks, blocks[:1] + blocks[-1:]):
            errors[name] = {}
            for width in widths:
                kind = f"ap_fixed<{width},8>"
                precision = hls.Precision(data=kind, weight=kind)
                directory = root / f"{abs(hash(name))}_{width}"
                error, modelled = _error(gm, example, subgraph, precision, directory)
                errors[name][width] = error
                if width == 18:
                    resources[name] = _summary(modelled)
            print(
                f"{name:34s} " + "  ".join(f"W={w}: {e:.1e}" for w, e in errors[name].items()),
                flush=True,
            )
        side = _hls4ml_side_by_side(root)
    print(f"hls4ml side by side: {side}")
    for name, summary in resources.items():
        print(f"modelled at W=18, reuse 1: {name}: {summary}")
    plotted = plot(errors, results_dir() / "bench_hls.png")
    data = {
        "errors_by_width": errors,
        "modelled_resources_at_18_bits": resources,
        "hls4ml_side_by_side": side,
        "plot": plotted,
    }
    print(f"wrote {write('bench_hls', data)}")


def _summary(resources: dict) -> dict:
    by_kind: dict[str, dict[str, int]] = {}
    for layer in resources["layers"]:
        entry = by_kind.setdefault(layer["kind"], {"layers": 0, "dsp": 0, "bram18": 0})
        entry["layers"] += 1
        entry["dsp"] += layer["dsp"] if isinstance(layer["dsp"], int) else 0
        entry["bram18"] += layer["bram18"]
    keep = ("dense", "shiftquant_dense", "layer_norm", "rms_norm", "crms_norm", "l1_norm")
    return {kind: v for kind, v in by_kind.items() if kind in keep} | {"total": resources["total"]}


if __name__ == "__main__":
    main()
