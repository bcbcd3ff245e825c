"""Streaming rewrites of checkpoints larger than memory: resident-set growth and throughput.

Two checkpoints of random weights, written in shards by this script (nothing is downloaded):

* ``llama``: TinyLlama-1.1B-shaped (22 layers, d 2048, GQA 32/4 heads, vocab 32000), bfloat16,
  about 2.2 GB, through ``canonicalize,fold-ln,l1quant(bits=4),vocab-trim``;
* ``gpt2-xl``: GPT-2-XL-shaped (48 layers, d 1600, vocab 50257), bfloat16, about 3.1 GB, through
  ``prernorm,fold-ln``.

Each rewrite runs in its own process (so one's allocations do not hide the other's), streamed
(``rewriter.rewrite_checkpoint``) and in memory (``from_pretrained``, ``trace``, the pipeline,
``write_checkpoint``), interleaved over ``--repeats`` rounds; medians are reported. Measured per
process, from after the imports: resident-set growth (kernel high-water mark) and wall time.
Targets (issue 14): streamed growth <= 2 x the largest tensor + 300 MB; throughput (checkpoint
bytes over the streamed run's wall time) >= 200 MB/s. The two outputs are compared tensor by
tensor (bit identity). ``--small`` runs the same pipelines on tiny shapes in seconds.

    .venv/bin/python benchmarks/bench_stream.py [--small] [--repeats 1] [--only llama]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import parse, write

MB = 1e6
CASES: dict[str, dict[str, Any]] = {
    "llama": {
        "config": {
            "model_type": "llama",
            "architectures": ["LlamaForCausalLM"],
            "vocab_size": 32000,
            "hidden_size": 2048,
            "intermediate_size": 5632,
            "num_hidden_layers": 22,
            "num_attention_heads": 32,
            "num_key_value_heads": 4,
            "max_position_embeddings": 2048,
            "tie_word_embeddings": False,
            "bos_token_id": 1,
            "eos_token_id": 2,
        },
        "small": {
            "vocab_size": 1000,
            "hidden_size": 64,
            "intermediate_size": 176,
            "num_hidden_layers": 2,
        },
        "passes": "canonicalize,fold-ln,l1quant(bits=4),vocab-trim",
    },
    "gpt2-xl": {
        "config": {
            "model_type": "gpt2",
            "architectures": ["GPT2LMHeadModel"],
            "vocab_size": 50257,
            "n_embd": 1600,
            "n_layer": 48,
            "n_head": 25,
            "n_positions": 1024,
        },
        "small": {
            "vocab_size": 1000,
            "n_embd": 64,
            "n_layer": 2,
            "n_head": 4,
            "bos_token_id": 0,
            "eos_token_id": 0,
        },
        "passes": "prernorm,fold-ln",
    },
}
DTYPE = torch.bfloat16
SHARD_BYTES = 1_000_000_000


def make_checkpoint(directory: Path, config_dict: dict[str, Any], seed: int = 0) -> int:
    """Random weights for ``config_dict`` in safetensors shards (one tensor in memory at a
    time, plus one shard's worth); returns the checkpoint's bytes."""
    import transformers
    from safetensors.torch import save_file

    config = transformers.AutoConfig.for_model(**config_dict, dtype="bfloat16")
    cls = getattr(transformers, config_dict["architectures"][0])
    with torch.device("meta"):
        model = cls(config)
    named = dict(model.named_parameters())  # ties appear once
    persistent = set(model.state_dict())
    named.update({n: b for n, b in model.named_buffers() if n in persistent})
    generator = torch.Generator().manual_seed(seed)
    directory.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = total = 0
    files: list[str] = []
    weight_map: dict[str, str] = {}

    def flush() -> None:
        name = f"model-{len(files) + 1:05d}.safetensors"
        save_file(shards[-1], str(directory / name), metadata={"format": "pt"})
        files.append(name)
        weight_map.update({key: name for key in shards[-1]})
        shards[-1] = {}

    for name, meta in named.items():
        if meta.dim() == 1 and name.endswith("weight"):  # norm gains: around 1
            value = 1 + 0.1 * torch.randn(meta.shape, generator=generator)
        else:
            value = 0.02 * torch.randn(meta.shape, generator=generator)
        value = value.to(meta.dtype if not meta.is_floating_point() else DTYPE)
        nbytes = value.numel() * value.element_size()
        if shards[-1] and size + nbytes > SHARD_BYTES:
            flush()
            size = 0
        shards[-1][name] = value
        size += nbytes
        total += nbytes
    flush()
    config.save_pretrained(directory)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return total


def _calibration(vocab: int) -> torch.Tensor:
    """A corpus of ids for vocab-trim: the lower quarter of the vocabulary, every id present."""
    keep = max(32, vocab // 4 // 32 * 32)
    ids = torch.arange(keep).repeat(2)
    order = torch.randperm(ids.numel(), generator=torch.Generator().manual_seed(0))
    return ids[order].view(-1, 32)  # rows of 32 tokens (l1quant measures on one batch)


def worker(mode: str, checkpoint: Path, passes: str, out: Path) -> dict[str, Any]:
    """One rewrite in this process; the resident set is measured from after the imports."""
    import transformers

    import rewriter
    from rewriter.checkpoint import ResidentPeak

    config = json.loads((checkpoint / "config.json").read_text())
    cls = getattr(transformers, config["architectures"][0])  # imports the model code now
    ctx = rewriter.PassContext(seed=0, calibration=_calibration(config["vocab_size"]))
    start = time.perf_counter()
    if mode == "stream":
        run = rewriter.rewrite_checkpoint(checkpoint, passes, out, ctx=ctx, progress=False)
        seconds = time.perf_counter() - start
        return {
            "seconds": seconds,
            "rss_growth": run.rss_growth,
            "largest_tensor": run.largest_tensor,
            "phase_seconds": run.seconds,
            "bytes_read": run.written.bytes_read,
            "bytes_written": run.written.bytes_written,
        }
    with ResidentPeak() as peak:
        model = cls.from_pretrained(checkpoint, dtype=DTYPE).eval()
        ids = torch.randint(0, 8, (2, 8))
        gm = rewriter.trace(model, (ids,), dynamic_shapes="auto")
        ctx = rewriter.PassContext(
            seed=0, calibration=ctx.calibration, measure_error=False, progress=False
        )
        result = rewriter.Pipeline.run(rewriter.Pipeline.parse(passes), gm, ctx)
        written = rewriter.write_checkpoint(result.graph_module, out, progress=False)
        rewriter.save(result.graph_module, out / "model.pt2")  # the same deliverables
    return {
        "seconds": time.perf_counter() - start,
        "rss_growth": peak.growth,
        "bytes_written": written.bytes_written,
    }


def _spawn(mode: str, checkpoint: Path, passes: str, out: Path) -> dict[str, Any]:
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, __file__, "--worker", mode, str(checkpoint), passes, str(out)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{mode} worker failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def identical(a: Path, b: Path) -> tuple[int, list[str]]:
    """Tensors compared and the names that differ (bitwise), streaming both through mmaps."""
    from rewriter.checkpoint import Shards

    left, right = Shards(a), Shards(b)
    differ = sorted(set(left.entries) ^ set(right.entries))
    for key in sorted(set(left.entries) & set(right.entries)):
        x, y = left.view(key), right.view(key)
        same = x.dtype == y.dtype and x.shape == y.shape
        if same and x.numel():
            flat_x, flat_y = x.reshape(-1), y.reshape(-1)
            step = 1 << 24
            same = all(
                torch.equal(flat_x[i : i + step], flat_y[i : i + step])
                for i in range(0, flat_x.numel(), step)
            )
        left.release(key)
        right.release(key)
        if not same:
            differ.append(key)
    return len(left.entries), differ


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="tiny shapes, seconds")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--only", choices=sorted(CASES), help="run one case")
    parser.add_argument("--keep", type=Path, help="directory for the checkpoints (kept)")
    args = parse(parser)  # --quick: the --small shapes
    args.small = args.small or args.quick
    root = args.keep or Path(tempfile.mkdtemp(prefix="bench-stream-"))
    results: dict[str, Any] = {}
    try:
        for name, case in CASES.items():
            if args.only and name != args.only:
                continue
            config = {**case["config"], **(case["small"] if args.small else {})}
            checkpoint = root / f"{name}{'-small' if args.small else ''}"
            if not (checkpoint / "config.json").exists():
                started = time.perf_counter()
                size = make_checkpoint(checkpoint, config)
                print(
                    f"{name}: wrote {size / MB:.0f} MB of random weights in "
                    f"{time.perf_counter() - started:.0f}s",
                    flush=True,
                )
            size = sum(p.stat().st_size for p in checkpoint.glob("*.safetensors"))
            runs: dict[str, list[dict[str, Any]]] = {"stream": [], "memory": []}
            for _ in range(args.repeats):
                for mode in runs:
                    runs[mode].append(
                        _spawn(mode, checkpoint, case["passes"], root / f"out-{mode}")
                    )
            count, differ = identical(root / "out-stream", root / "out-memory")
            stream, memory = runs["stream"], runs["memory"]

            def median(rows: list[dict[str, Any]], key: str) -> float:
                return statistics.median(r[key] for r in rows)

            largest = stream[0]["largest_tensor"]
            growth = median(stream, "rss_growth")
            budget = 2 * largest + 300 * 2**20
            throughput = size / median(stream, "seconds")
            # Weight throughput: the phases that touch weights (the passes and the writing);
            # tracing the architecture and saving the graph cost the same for any weights.
            weight_seconds = statistics.median(
                r["phase_seconds"]["passes"] + r["phase_seconds"]["write"] for r in stream
            )
            weight_throughput = size / weight_seconds
            entry = {
                "passes": case["passes"],
                "checkpoint_bytes": size,
                "largest_tensor_bytes": largest,
                "stream": stream,
                "memory": memory,
                "stream_rss_growth_bytes": growth,
                "memory_rss_growth_bytes": median(memory, "rss_growth"),
                "rss_target_bytes": budget,
                "rss_target_met": growth <= budget,
                "throughput_mb_s": throughput / MB,
                "weight_throughput_mb_s": weight_throughput / MB,
                "throughput_target_met": throughput >= 200 * MB,
                "weight_throughput_target_met": weight_throughput >= 200 * MB,
                "stream_phase_seconds": {
                    phase: statistics.median(r["phase_seconds"][phase] for r in stream)
                    for phase in stream[0]["phase_seconds"]
                },
                "stream_over_memory_time": median(stream, "seconds") / median(memory, "seconds"),
                "stream_over_memory_rss": growth / max(median(memory, "rss_growth"), 1),
                "tensors_compared": count,
                "tensors_differing": differ,
            }
            results[name] = entry
            print(
                f"{name} ({case['passes']}, {size / MB:.0f} MB, largest tensor "
                f"{largest / MB:.0f} MB):\n"
                f"  streamed: {median(stream, 'seconds'):.1f}s "
                + " ".join(f"{k} {v:.1f}s" for k, v in entry["stream_phase_seconds"].items())
                + f"; {throughput / MB:.0f} MB/s end to end, {weight_throughput / MB:.0f} MB/s "
                f"in the weight phases (target 200: "
                f"{'met' if entry['weight_throughput_target_met'] else 'MISSED'}), "
                f"resident set +{growth / MB:.0f} MB (target <= {budget / MB:.0f}: "
                f"{'met' if entry['rss_target_met'] else 'MISSED'})\n"
                f"  in memory: {median(memory, 'seconds'):.1f}s, resident set "
                f"+{median(memory, 'rss_growth') / MB:.0f} MB\n"
                f"  ratios stream/memory: time {entry['stream_over_memory_time']:.2f}, "
                f"memory {entry['stream_over_memory_rss']:.3f}; "
                f"{count - len(differ)}/{count} tensors bit-identical",
                flush=True,
            )
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    name = "bench_stream_small" if args.small else "bench_stream"
    print(f"wrote {write(name, {'cases': results})}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        mode, checkpoint, passes, out = sys.argv[2:6]
        print(json.dumps(worker(mode, Path(checkpoint), passes, Path(out))))
    else:
        main()
