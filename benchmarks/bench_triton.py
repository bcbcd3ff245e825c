"""Triton kernels against their references: each kernel vs the op's torch reference (eager), vs
``torch.compile`` of the reference, and vs the anchor where installed (Liger RMSNorm, fla chunked
linear attention); achieved bandwidth as a fraction of the device's peak for the norms. JSON.

Goals (on a GPU): norms >= 85% of peak bandwidth; ShiftQuant 4-bit decode (M=1) faster than
the fp16 matmul; linear attention at T=8192 faster than SDPA (flash).

Without a GPU it says so and exits 0. ``--interpret`` runs every case at tiny sizes under
``TRITON_INTERPRET=1`` on CPU: it checks the script and the kernels' results, its timings mean
nothing.

    .venv/bin/python benchmarks/bench_triton.py [--repeats 20] [--peak-gbps 4800] [--interpret]
"""

# ruff: noqa: B023 - each case's closures run inside the loop iteration that defines them

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from typing import Any

if "--interpret" in sys.argv or "--quick" in sys.argv:  # before anything imports triton
    os.environ["TRITON_INTERPRET"] = "1"

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _common import parse, write

PEAK_GBPS = {"H200": 4800, "H100": 3350, "A100": 2039, "L40S": 864, "A10": 600, "RTX 4090": 1008}
"""Peak memory bandwidth by device name, GB/s (vendor figures), when the driver does not say."""


def _peak_gbps(override: float | None) -> float | None:
    if override:
        return override
    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    clock, bus = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
    if clock and bus:  # kHz, bits; double data rate
        return 2 * clock * 1e3 * bus / 8 / 1e9
    name = torch.cuda.get_device_name(0)
    return next((v for k, v in PEAK_GBPS.items() if k in name), None)


def _time(fn: Callable[[], Any], repeats: int) -> float:
    """Median seconds per call (CUDA: synchronized; each sample a few calls)."""
    cuda = torch.cuda.is_available()
    for _ in range(3):
        fn()
    samples = []
    inner = 5 if cuda else 1
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        if cuda:
            torch.cuda.synchronize()
        samples.append((time.perf_counter() - start) / inner)
    samples.sort()
    return samples[len(samples) // 2]


def _interleaved(cases: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(max(1, repeats // 5)):
        for name, fn in cases.items():
            times[name].append(_time(fn, 5))
    return {name: sorted(v)[len(v) // 2] for name, v in times.items()}


def _compiled(fn: Callable[..., Any], enabled: bool) -> Callable[..., Any] | None:
    if not enabled:
        return None
    try:
        return torch.compile(fn, dynamic=False)
    except Exception as error:  # noqa: BLE001 - reported, the benchmark goes on
        print(f"  torch.compile unavailable: {error}")
        return None


def _check(got: torch.Tensor, want: torch.Tensor, tol: float, what: str) -> float:
    err = float((got.float() - want.float()).abs().max())
    if err > tol:
        raise SystemExit(f"{what}: kernel differs from the reference by {err:.3g} (> {tol})")
    return err


def bench_norms(device, dtype, sizes, repeats, compile_ref, peak) -> dict[str, Any]:
    from rewriter.backends import triton as backend

    from rewriter.ops import OPS

    results = {}
    for rows, width in sizes:
        x = torch.randn(rows, width, device=device, dtype=dtype)
        w = torch.randn(width, device=device, dtype=dtype)
        b = torch.randn(width, device=device, dtype=dtype)
        moved = 2 * x.numel() * x.element_size() + 2 * width * w.element_size()
        ops = {
            "rms_norm": (
                lambda: backend.rms_norm(x, w, b, 1e-5),
                lambda: torch.nn.functional.rms_norm(x, (width,), w, 1e-5) + b,
            ),
            "crms_norm": (
                lambda: backend.crms_norm(x, 1e-5),
                lambda: OPS["crms_norm"].reference(x, 1e-5),
            ),
            "l1_norm": (
                lambda: backend.l1_norm(x, w, b, 1e-5, True, 1.25),
                lambda: OPS["l1_norm"].reference(x, w, b, 1e-5, True, 1.25),
            ),
        }
        for name, (kernel, reference) in ops.items():
            error = _check(kernel(), reference(), 5e-2 if dtype != torch.float32 else 1e-4, name)
            cases = {"triton": kernel, "reference": reference}
            compiled = _compiled(reference, compile_ref)
            if compiled is not None:
                cases["compiled_reference"] = compiled
            if name == "rms_norm":
                liger = _liger_rms_norm(x, w)
                if liger is not None:
                    cases["liger (no bias)"] = liger
            times = _interleaved(cases, repeats)
            row = {case: {"ms": t * 1e3, "GBps": moved / t / 1e9} for case, t in times.items()}
            if peak:
                for entry in row.values():
                    entry["fraction_of_peak"] = entry["GBps"] / peak
            row["max_abs_error"] = error
            results[f"{name} {rows}x{width}"] = row
            print(
                f"{name:9s} {rows}x{width}: "
                + ", ".join(
                    f"{c} {v['ms']:.3f} ms {v['GBps']:.0f} GB/s"
                    for c, v in row.items()
                    if c != "max_abs_error"
                ),
                flush=True,
            )
    return results


def _liger_rms_norm(x: torch.Tensor, w: torch.Tensor) -> Callable[[], Any] | None:
    if not x.is_cuda:
        return None
    try:
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction
    except ImportError:
        return None
    return lambda: LigerRMSNormFunction.apply(x, w, 1e-5, 0.0, "llama", False)


def bench_shiftquant(device, dtype, sizes, repeats, compile_ref) -> dict[str, Any]:
    from rewriter.backends import triton as backend

    from rewriter.ops import quant

    results = {}
    for m, k, n, bits, group in sizes:
        weight = torch.randn(n, k)
        packed, exponents = quant.quantize_weight(weight, bits, group)
        packed, exponents = packed.to(device), exponents.to(device)
        x = torch.randn(m, k, device=device, dtype=dtype)
        dense = quant.dequantize(packed, exponents, bits, k, dtype)

        def kernel():
            return backend.shiftquant_linear(x, packed, exponents, None, bits, group, k, 0)

        def reference():
            return quant.shiftquant_linear_reference(x, packed, exponents, None, bits, group, k, 0)

        error = _check(
            kernel(), reference(), 5e-2 * k**0.5 if dtype != torch.float32 else 1e-3, "shiftquant"
        )
        cases = {
            "triton": kernel,
            "reference (dequantize + matmul)": reference,
            f"dense {str(dtype).replace('torch.', '')} matmul": lambda: x @ dense.T,
        }
        compiled = _compiled(reference, compile_ref)
        if compiled is not None:
            cases["compiled_reference"] = compiled
        times = _interleaved(cases, repeats)
        row = {case: {"ms": t * 1e3} for case, t in times.items()}
        row["max_abs_error"] = error
        key = f"M={m} K={k} N={n} {bits}-bit group {group}"
        results[key] = row
        print(
            f"shiftquant {key}: "
            + ", ".join(f"{c} {v['ms']:.3f} ms" for c, v in row.items() if c != "max_abs_error"),
            flush=True,
        )
    return results


def bench_linear_attention(
    device, dtype, lengths, heads, dim, repeats, compile_ref
) -> dict[str, Any]:
    from rewriter.backends import triton as backend

    from rewriter.ops import attention

    results = {}
    for length in lengths:
        q, k, v = (torch.randn(1, heads, length, dim, device=device, dtype=dtype) for _ in range(3))
        phi_q = torch.softmax(q.float(), -1).to(dtype)
        phi_k = torch.softmax(k.float(), -1).to(dtype)
        args = (q, k, v, phi_q, phi_k, None, None, None, True, 0, dim**-0.5, 1e-6)

        def kernel():
            return backend.linear_attention(*args)

        def reference():
            return attention.linear_attention_chunked(*args)

        error = _check(
            kernel(), reference(), 2e-2 if dtype != torch.float32 else 1e-4, "linear attention"
        )
        cases = {
            "triton chunked": kernel,
            "reference chunked (torch)": reference,
            "softmax SDPA": lambda: torch.nn.functional.scaled_dot_product_attention(
                q, k, v, is_causal=True
            ),
        }
        compiled = _compiled(reference, compile_ref)
        if compiled is not None:
            cases["compiled_reference"] = compiled
        fla = _fla_linear_attention(phi_q, phi_k, v)
        if fla is not None:
            cases["fla chunk_linear_attn"] = fla
        times = _interleaved(cases, repeats)
        row = {case: {"ms": t * 1e3} for case, t in times.items()}
        row["max_abs_error"] = error
        results[f"T={length}"] = row
        print(
            f"linear attention T={length}: "
            + ", ".join(f"{c} {v['ms']:.3f} ms" for c, v in row.items() if c != "max_abs_error"),
            flush=True,
        )
    # the decoding step against its reference
    state = [
        torch.randn(1, heads, dim, dim, device=device).abs(),
        torch.rand(1, heads, dim, device=device),
    ]
    one = [torch.rand(1, heads, 1, dim, device=device, dtype=dtype) for _ in range(5)]
    step_args = (*one, None, None, None, state, 0, dim**-0.5, 1e-6)
    times = _interleaved(
        {
            "triton decode step": lambda: backend.linear_attention_decode(*step_args),
            "reference decode step": lambda: attention.linear_attention_decode_reference(
                *step_args
            ),
        },
        repeats,
    )
    results["decode step"] = {case: {"ms": t * 1e3} for case, t in times.items()}
    return results


def _fla_linear_attention(phi_q, phi_k, v) -> Callable[[], Any] | None:
    if not v.is_cuda:
        return None
    try:
        from fla.ops.linear_attn import chunk_linear_attn
    except ImportError:
        return None
    # fla takes [B, T, H, K] and the features as q/k; scale 1 and its normalizer
    q, k, vv = (t.transpose(1, 2).contiguous() for t in (phi_q, phi_k, v))
    return lambda: chunk_linear_attn(q, k, vv, scale=1.0, normalize=True)


def goals(results: dict[str, Any]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    fractions = [
        entry["triton"].get("fraction_of_peak")
        for key, entry in results["norms"].items()
        if "triton" in entry
    ]
    if all(f is not None for f in fractions) and fractions:
        found["norms >= 85% of peak bandwidth"] = {
            "min_fraction": min(fractions),
            "met": min(fractions) >= 0.85,
        }
    for key, entry in results["shiftquant"].items():
        if key.startswith("M=1 ") and " 4-bit" in key:
            dense = next(v["ms"] for c, v in entry.items() if c.startswith("dense"))
            found[f"shiftquant 4-bit M=1 faster than the dense matmul ({key})"] = {
                "ratio": entry["triton"]["ms"] / dense,
                "met": entry["triton"]["ms"] < dense,
            }
    longest = max(
        results["linear_attention"], key=lambda k: int(k[2:]) if k.startswith("T=") else -1
    )
    entry = results["linear_attention"][longest]
    found[f"linear attention faster than SDPA at {longest}"] = {
        "ratio": entry["triton chunked"]["ms"] / entry["softmax SDPA"]["ms"],
        "met": entry["triton chunked"]["ms"] < entry["softmax SDPA"]["ms"],
    }
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--peak-gbps", type=float, default=None)
    parser.add_argument(
        "--interpret", action="store_true", help="tiny sizes on CPU, TRITON_INTERPRET=1"
    )
    parser.add_argument(
        "--no-compile", action="store_true", help="skip torch.compile of the references"
    )
    args = parse(parser)  # --quick: the --interpret run with one repeat
    args.interpret = args.interpret or args.quick
    from rewriter.backends import triton as backend

    runs, where = backend.available()
    if not runs:
        print(f"bench_triton: {where}; nothing to measure (use --interpret to check the script)")
        return
    if args.interpret:
        device, dtype, repeats = "cpu", torch.float32, 1 if args.quick else 5
        norm_sizes = [(4, 37), (3, 300)]
        quant_sizes = [(1, 64, 40, 4, 32), (17, 96, 33, 4, 32)]
        lengths, heads, dim = [40, 100], 2, 16
    else:
        device, dtype, repeats = "cuda", torch.float16, args.repeats
        norm_sizes = [(4096, 2048), (4096, 4096), (4096, 8192)]
        quant_sizes = [
            (1, 4096, 4096, 4, 64),
            (16, 4096, 4096, 4, 64),
            (256, 4096, 4096, 4, 64),
            (1, 4096, 4096, 2, 64),
        ]
        lengths, heads, dim = [1024, 4096, 8192], 16, 64
    compile_ref = not args.no_compile and not args.interpret
    peak = _peak_gbps(args.peak_gbps)
    print(f"bench_triton on {where}; peak bandwidth {peak or 'unknown'} GB/s", flush=True)
    results = {
        "norms": bench_norms(device, dtype, norm_sizes, repeats, compile_ref, peak),
        "shiftquant": bench_shiftquant(device, dtype, quant_sizes, repeats, compile_ref),
        "linear_attention": bench_linear_attention(
            device, dtype, lengths, heads, dim, repeats, compile_ref
        ),
    }
    data = {
        "device": where,
        "peak_gbps": peak,
        "interpreted": args.interpret,
        "results": results,
        "goals": goals(results),
    }
    if args.interpret:
        data["note"] = "interpreter timings: the goals are evaluated only to check the script"
    for goal, value in data["goals"].items() if isinstance(data["goals"], dict) else []:
        print(f"goal: {goal}: {value}")
    print(f"wrote {write('bench_triton' + ('_interpreted' if args.interpret else ''), data)}")


if __name__ == "__main__":
    main()
