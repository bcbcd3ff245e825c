"""Normalization costs: one norm op, and GPT-2 small end to end, in ONNX Runtime and torch eager.

(a) LayerNorm vs RMSNorm vs CRMSNorm on [8, 512, 768] (CRMSNorm on 767 columns), each traced and
    lowered by the project (LayerNormalization, RMSNormalization-23, the crms_norm translation).
(b) GPT-2 small shape (12 layers, d=768, random weights), T=256 and T=1024, batch 1: original vs
    prernorm vs prernorm,fold-ln vs crmsnorm, in ORT and in torch eager.
(c) Weight-editing throughput of each pass on GPT-2 small: MB of weights rewritten per second.

Interleaved rounds, medians with min/max, ratios; JSON in benchmarks/results/bench_norm.json.
Targets: RMSNorm op as lowered >= 1.6x LayerNorm in ORT; prernorm end to end >= 0.98x in ORT.

    python benchmarks/bench_norm.py [--repeats 7] [--quick]
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
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from _common import interleaved, parse, pick, write

import rewriter
from rewriter.verify.families import ModelSpec

onnx = rewriter.backends.onnx


class LayerNormOp(torch.nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight, self.bias = (
            torch.nn.Parameter(torch.rand(d) + 0.5),
            torch.nn.Parameter(torch.randn(d)),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, 1e-5)


class RMSNormOp(torch.nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.rand(d) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, 1e-5)


class CRMSNormOp(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.rewriter.crms_norm(x, 1e-5)


def _session_runner(path: Path, inputs: tuple[torch.Tensor, ...], threads: int):
    sess = onnx.session(path, threads=threads, spinning=False)
    feeds = {i.name: t.numpy() for i, t in zip(sess.get_inputs(), inputs)}
    return lambda: sess.run(None, feeds)


def norm_ops(repeats: int, threads: int, work: Path) -> dict[str, object]:
    d = 768
    x = torch.randn(8, 512, d)
    xc = x[..., : d - 1].contiguous()
    cases = {}
    for name, module, inp in (
        ("layer_norm", LayerNormOp(d), x),
        ("rms_norm", RMSNormOp(d), x),
        ("crms_norm", CRMSNormOp(), xc),
    ):
        gm = rewriter.trace(module.eval(), (inp,))
        exported = onnx.export(gm, None, work / f"{name}.onnx")
        cases[f"ort_{name}"] = _session_runner(exported.path, (inp,), threads)
        cases[f"torch_{name}"] = lambda m=module, i=inp: m(i)
    with torch.no_grad():
        results = interleaved(cases, repeats, inner=20)
    ratios = {
        "ort_rms_speedup_over_layer_norm": results["ort_layer_norm"]["median_s"]
        / results["ort_rms_norm"]["median_s"],
        "ort_crms_speedup_over_layer_norm": results["ort_layer_norm"]["median_s"]
        / results["ort_crms_norm"]["median_s"],
        "torch_rms_speedup_over_layer_norm": results["torch_layer_norm"]["median_s"]
        / results["torch_rms_norm"]["median_s"],
        "torch_crms_speedup_over_layer_norm": results["torch_layer_norm"]["median_s"]
        / results["torch_crms_norm"]["median_s"],
    }
    return {"shape": [8, 512, d], "results": results, "ratios": ratios}


PIPELINES = {
    "original": "canonicalize",
    "prernorm": "canonicalize,prernorm",
    "prernorm_fold": "canonicalize,prernorm,fold-ln",
    "crmsnorm": "canonicalize,crmsnorm",
}


def end_to_end(repeats: int, threads: int, work: Path, lengths: list[int]) -> dict[str, object]:
    spec = pick(
        ModelSpec("gpt2", layers=12, heads=12, head_dim=64, vocab=50257, max_positions=1024),
        ModelSpec("gpt2", layers=2, heads=2, head_dim=32, vocab=512, max_positions=512),
    )
    model = spec.build()
    gm = rewriter.trace(model, spec.example_inputs(batch=2, seq=16), dynamic_shapes="auto")
    ctx = rewriter.PassContext(measure_error=False, progress=False)
    graphs, throughput = {}, {}
    for name, pipeline in PIPELINES.items():
        start = time.perf_counter()
        result = rewriter.Pipeline.parse(pipeline).run(gm, ctx)
        graphs[name] = result.graph_module
        seconds = sum(r.seconds for r in result.report.records[1:])
        edited = _edited_bytes(gm, result.graph_module)
        if name != "original":
            throughput[name] = {
                "seconds": seconds,
                "edited_mb": edited / 2**20,
                "mb_per_s": edited / 2**20 / seconds if seconds else None,
                "wall_s": time.perf_counter() - start,
            }
    sessions = {}
    for name, graph in graphs.items():
        exported = onnx.export(graph, None, work / f"gpt2_{name}.onnx")
        sessions[name] = exported.path
    out: dict[str, object] = {"throughput": throughput}
    for length in lengths:
        ids = torch.randint(
            0, spec.vocab, (1, length), generator=torch.Generator().manual_seed(length)
        )
        cases = {}
        for name in graphs:
            cases[f"ort_{name}"] = _session_runner(sessions[name], (ids,), threads)
            cases[f"torch_{name}"] = lambda g=graphs[name], i=ids: g(i)
        with torch.no_grad():
            results = interleaved(cases, repeats)
        ratios = {}
        for runtime in ("ort", "torch"):
            base = results[f"{runtime}_original"]["median_s"]
            for name in PIPELINES:
                if name != "original":
                    ratios[f"{runtime}_{name}_speed_vs_original"] = (
                        base / results[f"{runtime}_{name}"]["median_s"]
                    )
        out[f"T{length}"] = {"results": results, "ratios": ratios}
    return out


def _edited_bytes(before: torch.fx.GraphModule, after: torch.fx.GraphModule) -> int:
    old = {id(t) for t in (*before.parameters(), *before.buffers())}
    return sum(
        t.numel() * t.element_size()
        for t in {id(t): t for t in (*after.parameters(), *after.buffers())}.values()
        if id(t) not in old
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parse(parser)  # --quick: a 2-layer model, T=256 only, 1 repeat
    warnings.filterwarnings("ignore")
    os.environ.setdefault("REWRITER_NO_PROGRESS", "1")
    repeats = 1 if args.quick else args.repeats
    lengths = [256] if args.quick else [256, 1024]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ops = norm_ops(repeats, args.threads, work)
        for name, value in ops["ratios"].items():
            print(f"{name:>40}: {value:.2f}x")
        e2e = end_to_end(repeats, args.threads, work, lengths)
    for key, value in e2e.items():
        if key == "throughput":
            for name, t in value.items():
                rate = f"{t['edited_mb']:.0f} MB in {t['seconds']:.2f}s = {t['mb_per_s']:.0f} MB/s"
                print(f"{name:>16} weight edits: {rate}")
            continue
        for name, ratio in value["ratios"].items():
            print(f"{key:>6} {name:>36}: {ratio:.3f}x")
    targets = {
        "ort_rms_speedup_over_layer_norm >=": 1.6,
        "T256 ort_prernorm_speed_vs_original >=": 0.98,
    }
    path = write(
        "bench_norm",
        {
            "threads": args.threads,
            "repeats": repeats,
            "norm_ops": ops,
            "end_to_end": e2e,
            "targets": targets,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
