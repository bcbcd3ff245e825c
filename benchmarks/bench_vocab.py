"""vocab-trim: parameters, ONNX size and LM-head latency against the keep-set size.

Three measurements, all in one run:

* the embedded model trimmed on growing prefixes of its calibration text (the rebuilt tokenizer
  encodes each prefix identically; how much held-out text still encodes identically; perplexity of
  the trimmed graph vs the original renormalized over the kept ids, which must agree);
* GPT-2 small (vocabulary 50257, width 768, 12 layers, 124M parameters, random weights) trimmed
  to keep-sets of 2k..40k ids drawn from a Zipf distribution (how natural text uses a
  vocabulary): parameters, bytes, and the ONNX file size of the whole model;
* ONNX Runtime latency of the LM head alone (768 -> vocabulary) at T=256 before and after,
  interleaved, medians.

    .venv/bin/python benchmarks/bench_vocab.py [--repeats 7] [--skip-onnx]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import warnings
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _common import interleaved, parse, pick, write

import rewriter
from rewriter import vocab, zoo
from rewriter.pipeline.metrics import perplexity_of_ids
from rewriter.verify.families import ModelSpec

onnx = rewriter.backends.onnx
GPT2_SMALL = ModelSpec(
    "gpt2", layers=12, heads=12, head_dim=64, vocab=50257, max_positions=1024, ffn_mult=4
)
QUICK_MODEL = ModelSpec("gpt2", layers=1, heads=2, head_dim=32, vocab=4000, max_positions=256)


def _quiet(**data: object) -> rewriter.PassContext:
    return rewriter.PassContext(progress=False, measure_error=False, **data)  # type: ignore[arg-type]


def embedded() -> list[dict[str, object]]:
    model, tokenizer = zoo.tiny_gpt2()
    text, held_out = zoo.calibration_text(), zoo.eval_text()[:40_000]
    ids = torch.tensor(tokenizer.encode(text[:2000])[:64]).view(2, 32)
    gm = rewriter.trace(model, (ids,), dynamic_shapes="auto")
    rows = []
    for chars in pick((2_000, 8_000, 32_000, len(text)), (2_000,)):
        part = text[:chars]
        ctx = _quiet(calibration=part, evaluation=held_out, tokenizer=tokenizer)
        result = rewriter.Pipeline.parse("vocab-trim").run(gm, ctx)
        record = result.report.records[0]
        vmap = vocab.vocab_map(result.graph_module)
        old_ids = torch.tensor(tokenizer.encode(part))
        trimmed = perplexity_of_ids(result.graph_module, vmap.graph_ids(old_ids))
        renormalized = perplexity_of_ids(model, old_ids, over=vmap.kept)
        plain = perplexity_of_ids(model, old_ids)
        row = {
            "corpus_chars": chars,
            **{k: v for k, v in record.metrics.items() if k != "ppl"},
            "ppl_trimmed_on_corpus": trimmed,
            "ppl_original_renormalized": renormalized,
            "ppl_original": plain,
            # the held-out text's perplexity per original token (the pipeline's column)
            "heldout_ppl_before": result.report.baseline.get("ppl"),
            "heldout_ppl_after": record.metrics.get("ppl"),
        }
        rows.append(row)
        print(
            f"embedded, corpus {chars:>6} chars: kept {row['vocab_after']}/{row['vocab_before']}, "
            f"params {row['params_after'] / row['params_before']:.3f}x, corpus identical "
            f"{row['corpus_identical']:.0%}, held-out lines identical "
            f"{row['eval_lines_identical']:.0%} (tokens kept {row['eval_token_coverage']:.1%}); "
            f"ppl trimmed {trimmed:.3f} = renormalized {renormalized:.3f} (plain {plain:.3f}); "
            f"held-out ppl per original token {row['heldout_ppl_before']:.2f} -> "
            f"{row['heldout_ppl_after']:.2f}",
            flush=True,
        )
    return rows


def _zipf_keep(size: int, vocab_size: int, seed: int) -> torch.Tensor:
    """``size`` distinct ids, drawn with Zipf-like frequencies over a random rank order."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(vocab_size, generator=generator)
    weights = 1.0 / torch.arange(1, vocab_size + 1, dtype=torch.float64)
    picked = torch.multinomial(weights, size, replacement=False, generator=generator)
    return order[picked].view(1, -1)


def gpt2_small(sizes: list[int], do_onnx: bool) -> list[dict[str, object]]:
    model = GPT2_SMALL.build()
    gm = rewriter.trace(model, GPT2_SMALL.example_inputs(batch=2, seq=16), dynamic_shapes="auto")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        graphs = {"original": gm}
        for size in sizes:
            corpus = _zipf_keep(size, GPT2_SMALL.vocab, seed=size)
            graphs[f"keep{size}"] = (
                rewriter.Pipeline.parse("vocab-trim")
                .run(gm, _quiet(calibration=corpus))
                .graph_module
            )
        base_params = sum(t.numel() for t in gm.parameters())
        base_onnx = None
        for name, graph in graphs.items():
            params = sum(t.numel() for t in graph.parameters())
            vmap = vocab.vocab_map(graph)
            row: dict[str, object] = {
                "graph": name,
                "vocab": vmap.size if vmap else GPT2_SMALL.vocab,
                "params": params,
                "params_ratio": params / base_params,
            }
            if do_onnx:
                path = Path(tmp) / f"{name}.onnx"
                onnx.export(graph, None, path)
                files = [path, *Path(tmp).glob(f"{name}.onnx.data")]
                row["onnx_bytes"] = sum(f.stat().st_size for f in files)
                base_onnx = base_onnx or row["onnx_bytes"]
                row["onnx_ratio"] = row["onnx_bytes"] / base_onnx
            rows.append(row)
            print(
                f"gpt2-small {name:>10}: vocab {row['vocab']:>5}, params {params / 1e6:.1f}M "
                f"({row['params_ratio']:.3f}x)"
                + (
                    f", ONNX {row['onnx_bytes'] / 2**20:.0f} MiB ({row['onnx_ratio']:.3f}x)"
                    if do_onnx
                    else ""
                ),
                flush=True,
            )
    return rows


class _Head(torch.nn.Module):
    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(weight)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(hidden, self.weight)


def head_latency(sizes: list[int], repeats: int, threads: int) -> dict[str, object]:
    width, length = 768, 256
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(GPT2_SMALL.vocab, width, generator=generator) * 0.02
    hidden = torch.randn(1, length, width, generator=generator)
    sessions = {}
    with tempfile.TemporaryDirectory() as tmp:
        for size in [GPT2_SMALL.vocab, *sizes]:
            kept = _zipf_keep(size, GPT2_SMALL.vocab, seed=size).view(-1).sort().values
            head = _Head(weight if size == GPT2_SMALL.vocab else weight[kept]).eval()
            gm = rewriter.trace(head, (hidden,))
            path = Path(tmp) / f"head{size}.onnx"
            onnx.export(gm, None, path)
            sessions[size] = onnx.session(path, threads=threads, spinning=False)
        feed = hidden.numpy()
        names = {size: s.get_inputs()[0].name for size, s in sessions.items()}
        cases = {
            f"vocab{size}": (lambda s=s, n=names[size]: s.run(None, {n: feed}))
            for size, s in sessions.items()
        }
        timing = interleaved(cases, repeats, inner=3)
    base = timing[f"vocab{GPT2_SMALL.vocab}"]["median_s"]
    ratios = {name: t["median_s"] / base for name, t in timing.items()}
    print(
        f"ORT LM head 768->V at T={length}: "
        + ", ".join(
            f"{k} {t['median_s'] * 1e3:.2f} ms ({ratios[k]:.3f}x)" for k, t in timing.items()
        )
    )
    return {"T": length, "width": width, "results": timing, "time_vs_full": ratios}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--skip-onnx", action="store_true", help="no ONNX file sizes")
    args = parse(parser)  # --quick: one corpus, a one-layer model, one keep-set, one repeat
    global GPT2_SMALL
    GPT2_SMALL = pick(GPT2_SMALL, QUICK_MODEL)
    args.repeats = pick(args.repeats, 1)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("REWRITER_NO_PROGRESS", "1")
    sizes = pick([2_000, 10_000, 20_000, 40_000], [2_000])
    data: dict[str, object] = {"embedded": embedded()}
    data["gpt2_small"] = gpt2_small(sizes, not args.skip_onnx)
    data["ort_head_latency"] = head_latency(sizes, args.repeats, args.threads)
    path = write("bench_vocab", data)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
