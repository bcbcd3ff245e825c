"""linearize: attention time and peak memory against sequence length, softmax vs linear.

One attention layer of GPT-2 small's shape (batch 1, 12 heads, head dim 64), causal:

* torch: SDPA (PyTorch's fused CPU kernel) vs ``rewriter::linear_attention`` in its chunked form
  with elu+1 features and with Hedgehog features (feature maps included in the time), and the
  recurrent decoding step per token after T tokens of context;
* ONNX Runtime: the same modules exported (SDPA -> Attention / MatMul-Softmax; linear attention
  through its chunked ONNX translation), dynamic sequence length, up to T = 8192;
* peak memory: growth of the resident set while one call runs (the kernel's peak-RSS mark reset
  just before it), in a fresh process per case (Linux only).

T = 256 .. 16384. Target: at T = 8192 the elu+1 linear form >= 5x faster than causal SDPA in
torch; memory linear in T; decode cost per token independent of T. JSON and a PNG plot.

    python benchmarks/bench_linearize.py [--repeats 3] [--max-length 16384] [--skip-ort]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _common import interleaved, parse, pick, results_dir, write

import rewriter
from rewriter.ops import attention as A

HEADS, DIM = 12, 64


class Softmax(torch.nn.Module):
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)


class Linear(torch.nn.Module):
    def __init__(self, feature_map: str) -> None:
        super().__init__()
        self.feature_map = feature_map
        eye = torch.eye(DIM).expand(HEADS, DIM, DIM).clone()
        self.wq, self.wk = torch.nn.Parameter(eye.clone()), torch.nn.Parameter(eye.clone())

    def phi(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if self.feature_map == "elu":
            return torch.nn.functional.elu(x) + 1
        projected = x @ w
        return torch.cat([projected.softmax(-1), (-projected).softmax(-1)], -1)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.ops.rewriter.linear_attention(
            q,
            k,
            v,
            self.phi(q, self.wq),
            self.phi(k, self.wk),
            None,
            None,
            None,
            True,
            0,
            DIM**-0.5,
            1e-6,
        )


MODULES = {"sdpa": Softmax(), "linear_elu": Linear("elu"), "linear_hedgehog": Linear("hedgehog")}


def _qkv(length: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(length)
    return tuple(torch.randn(1, HEADS, length, DIM, generator=g) for _ in range(3))


def torch_times(lengths: list[int], repeats: int) -> dict[int, dict[str, float]]:
    rows = {}
    with torch.no_grad():
        for length in lengths:
            q, k, v = _qkv(length)
            cases = {name: (lambda m=m, q=q, k=k, v=v: m(q, k, v)) for name, m in MODULES.items()}
            timing = interleaved(cases, repeats)
            rows[length] = {name: t["median_s"] for name, t in timing.items()}
            rows[length]["decode_step"] = _decode_step(length, repeats)
            speed = rows[length]["sdpa"] / rows[length]["linear_elu"]
            print(
                f"torch T={length}: sdpa {rows[length]['sdpa'] * 1e3:.1f} ms, linear elu "
                f"{rows[length]['linear_elu'] * 1e3:.1f} ms ({speed:.1f}x), hedgehog "
                f"{rows[length]['linear_hedgehog'] * 1e3:.1f} ms, decode step "
                f"{rows[length]['decode_step'] * 1e6:.0f} us",
                flush=True,
            )
    return rows


def _decode_step(context: int, repeats: int) -> float:
    """One token of decoding after ``context`` tokens (elu+1 features, no window)."""
    state = A.LinearAttentionState.empty(1, HEADS, DIM, DIM, DIM, 0)
    state.S += torch.rand_like(state.S) * context  # a state that has seen `context` tokens
    state.z += torch.rand_like(state.z) * context
    q, k, v = (torch.randn(1, HEADS, DIM) for _ in range(3))
    phi = torch.nn.functional.elu(q) + 1

    def step() -> None:
        A.linear_attention_step(state, q, k, v, phi, phi, None, None, None, 0, DIM**-0.5, 1e-6)

    return interleaved({"step": step}, repeats, inner=50)["step"]["median_s"]


def ort_times(lengths: list[int], repeats: int) -> dict[str, object]:
    onnx = rewriter.backends.onnx
    rows: dict[int, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        sessions = {}
        for name, module in MODULES.items():
            length = torch.export.Dim("T", min=2, max=1 << 16)
            gm = rewriter.trace(module, _qkv(128), dynamic_shapes=({2: length},) * 3)
            path = onnx.export(gm, None, Path(tmp) / f"{name}.onnx").path
            sessions[name] = onnx.session(path, spinning=False)
        for length in lengths:
            feeds = dict(zip(("q", "k", "v"), (t.numpy() for t in _qkv(length))))
            cases = {}
            for name, s in sessions.items():
                names = [i.name for i in s.get_inputs()]
                feed = dict(zip(names, feeds.values()))
                cases[name] = lambda s=s, feed=feed: s.run(None, feed)
            timing = interleaved(cases, repeats)
            rows[length] = {name: t["median_s"] for name, t in timing.items()}
            print(
                f"ORT T={length}: sdpa {rows[length]['sdpa'] * 1e3:.1f} ms, linear elu "
                f"{rows[length]['linear_elu'] * 1e3:.1f} ms "
                f"({rows[length]['sdpa'] / rows[length]['linear_elu']:.1f}x)",
                flush=True,
            )
    return rows


_MEMORY_PROBE = """
import sys, torch
sys.path.insert(0, {here!r})
import bench_linearize as b

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

name, length = sys.argv[1], int(sys.argv[2])
q, k, v = b._qkv(length)
module = b.MODULES[name]
with torch.no_grad():
    module(q[:, :, :64], k[:, :, :64], v[:, :, :64])
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
    base = status("VmRSS:")
    module(q, k, v)
    peak = status("VmHWM:")
print(peak - base)
"""


def peak_memory(lengths: list[int]) -> dict[int, dict[str, int]]:
    rows: dict[int, dict[str, int]] = {}
    script = _MEMORY_PROBE.format(here=os.path.dirname(os.path.abspath(__file__)))
    for length in lengths:
        rows[length] = {}
        for name in MODULES:
            done = subprocess.run(
                [sys.executable, "-c", script, name, str(length)],
                capture_output=True,
                text=True,
                check=True,
            )
            rows[length][name] = int(done.stdout.strip().splitlines()[-1])
        print(
            f"peak memory T={length}: "
            + ", ".join(f"{n} {b / 2**20:.0f} MiB" for n, b in rows[length].items()),
            flush=True,
        )
    return rows


def plot(data: dict[str, object], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    rows = data["torch"]
    lengths = sorted(rows)
    for name in (*MODULES, "decode_step"):
        left.plot(lengths, [rows[t][name] * 1e3 for t in lengths], "o-", label=f"torch {name}")
    for name in MODULES:
        if "ort" in data:
            ort = data["ort"]
            short = sorted(ort)
            left.plot(short, [ort[t][name] * 1e3 for t in short], "x--", label=f"ORT {name}")
    left.set_xscale("log", base=2)
    left.set_yscale("log")
    left.set_xlabel("sequence length T")
    left.set_ylabel("ms per attention call (decode: per token)")
    left.legend(fontsize=7)
    memory = data["memory"]
    for name in MODULES:
        right.plot(lengths, [memory[t][name] / 2**20 for t in lengths], "o-", label=name)
    right.set_xscale("log", base=2)
    right.set_yscale("log")
    right.set_xlabel("sequence length T")
    right.set_ylabel("peak RSS growth, MiB")
    right.legend(fontsize=7)
    figure.suptitle("causal attention, 12 heads x 64, batch 1, CPU")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-length", type=int, default=16384)
    parser.add_argument("--skip-ort", action="store_true")
    args = parse(parser)
    args.repeats, args.max_length = pick(args.repeats, 1), pick(args.max_length, 256)
    warnings.filterwarnings("ignore")
    lengths = [t for t in (256, 1024, 4096, 8192, 16384) if t <= args.max_length]
    data: dict[str, object] = {"torch": torch_times(lengths, args.repeats)}
    print(json.dumps(data["torch"]), flush=True)
    if not args.skip_ort:
        # ORT's softmax attention materializes T x T scores per head (13 GB at T=16384).
        data["ort"] = ort_times([t for t in lengths if t <= 8192], args.repeats)
    data["memory"] = peak_memory(lengths)
    if 8192 in data["torch"]:
        data["speedup_T8192_elu"] = data["torch"][8192]["sdpa"] / data["torch"][8192]["linear_elu"]
    data["plot"] = plot(data, results_dir() / "bench_linearize.png")
    path = write("bench_linearize", json.loads(json.dumps(data)))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
