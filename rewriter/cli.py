"""The ``rewriter`` command: list passes, rewrite a model, run the demo.

``rewriter passes``
    Every registered pass with its one-line doc and options.
``rewriter run --model MODEL --passes SPEC --out DIR [--backend NAME] [--dialect D]
[--calib TEXT|FILE] [--eval-text FILE] [--force] [--explain] [--stream [--shard-size GB]]``
    Trace MODEL, run the pipeline, write ``model.pt2`` and ``report.json`` (with ``--backend``,
    any backend of the registry, ``rewriter.backends.available()``: its artifact too, checked
    against the graph where it runs here: ``model.onnx`` in ONNX Runtime, ``model.mlir`` in
    dialect D, run on this CPU when D is linalg-on-tensors, the ``hls/`` project in g++ C
    simulation, the ``triton/`` lowering in this process), print the report
    table (``--explain``: then each rule table's statistics); after ``vocab-trim`` the rebuilt
    tokenizer goes to ``tokenizer/``. MODEL is
    ``tiny-gpt2`` (the embedded model), a local Hugging Face directory, a config ``.json`` (random
    weights), or ``package.module:factory``, which imports and runs that code (a factory returns
    a model or ``(model, tokenizer)``). Remote code in Hugging Face configs is refused.
    With ``--stream`` MODEL is a safetensors directory rewritten without loading it: sharded
    safetensors and a weightless ``model.pt2`` go to DIR (``rewriter.load(pt2, DIR)`` binds
    them), with the resident-set growth reported next to the largest tensor; ``--backend onnx``
    adds ``model.onnx`` with external data.
``rewriter demo [--out DIR]``
    ``make demo``: the embedded model through the default pipeline, verified against the
    original with hypothesis-drawn inputs, exported to ONNX Runtime and checked, with time,
    rewrites, error and perplexity per pass; then greedy samples with a KV cache from the model
    and from its rewrite; artifacts in ``out/demo`` (replaced on each run).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["DEFAULT_PIPELINE", "main"]

DEFAULT_PIPELINE = "canonicalize,prernorm,fold-ln"
"""The demo's pipeline; passes join it as they land."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rewriter", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("passes", help="list passes, their one-line docs and options")

    run = commands.add_parser("run", help="trace a model, run a pipeline, write the artifacts")
    run.add_argument(
        "--model", required=True, help="tiny-gpt2 | HF directory | config.json | module:factory"
    )
    run.add_argument("--passes", required=True, help='pipeline spec, e.g. "canonicalize"')
    run.add_argument("--out", required=True, type=Path, help="output directory")
    run.add_argument(
        "--backend",
        choices=_backend_names(),
        help="also export with this backend (rewriter.backends' registry), and check the result "
        "against the graph where it runs here",
    )
    run.add_argument(
        "--dialect",
        default="linalg-on-tensors",
        choices=["linalg-on-tensors", "tosa", "stablehlo", "torch"],
        help="MLIR dialect for --backend mlir (static shapes of the example input)",
    )
    run.add_argument("--calib", help="calibration text, or a file holding it")
    run.add_argument("--eval-text", help="file with evaluation text (perplexity per pass)")
    run.add_argument("--force", action="store_true", help="replace an existing output directory")
    run.add_argument(
        "--explain",
        action="store_true",
        help="after the report, each rule table's statistics: rules that rewrote, matched, and "
        "never matched this graph, with their definition sites",
    )
    run.add_argument("--seq", type=int, default=32, help="example sequence length for tracing")
    run.add_argument(
        "--stream",
        action="store_true",
        help="rewrite a safetensors checkpoint directory shard by shard without loading it",
    )
    run.add_argument(
        "--shard-size", type=float, default=2.0, help="GB per written shard with --stream"
    )

    demo = commands.add_parser("demo", help="the embedded model through the default pipeline")
    demo.add_argument(
        "--out", type=Path, default=Path("out/demo"), help="artifact directory (replaced)"
    )
    demo.add_argument("--pipeline", default=DEFAULT_PIPELINE, help="pipeline spec to run")
    demo.add_argument("--examples", type=int, default=8, help="hypothesis examples for verify")

    args = parser.parse_args(argv)
    from transformers.utils import logging as hf_logging

    from rewriter.errors import RewriterError

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()

    try:
        if args.command == "passes":
            return _passes()
        if args.command == "run":
            return _run(args)
        return _demo(args.out, args.pipeline, args.examples)
    except RewriterError as error:
        print(f"rewriter: error: {error}", file=sys.stderr)
        return 2


def _passes() -> int:
    from rewriter.passes import available, get_pass

    for name in available():
        cls = get_pass(name)
        print(f"{name}: {cls.one_line()}")
        for option in cls.options():
            print(f"    {option.name}: {option.type} = {option.default!r}  {option.doc}")
    return 0


# --- run ------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Loaded:
    model: Any
    tokenizer: Any
    description: str
    eval_text: str | None = None
    calibration_text: str | None = None


def _run(args: argparse.Namespace) -> int:
    import rewriter
    from rewriter.errors import RewriterError

    out: Path = args.out
    if out.exists() and any(out.iterdir()) and not args.force:
        raise RewriterError(f"{out} exists and is not empty; pass --force to replace it")
    rewriter.Pipeline.parse(args.passes)  # a bad spec fails before the model loads
    if args.stream:
        return _run_stream(args)
    loaded = _load_model(args.model)
    calibration = _text_argument(args.calib) if args.calib else loaded.calibration_text
    evaluation = (
        Path(args.eval_text).read_text(encoding="utf-8") if args.eval_text else loaded.eval_text
    )
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    summary = _rewrite(
        loaded,
        args.passes,
        out,
        calibration,
        evaluation,
        args.backend,
        seq=args.seq,
        dialect=args.dialect,
        explain=args.explain,
    )
    print(f"artifacts in {out}/: " + ", ".join(sorted(p.name for p in out.iterdir())))
    return 0 if summary["ok"] else 1


def _run_stream(args: argparse.Namespace) -> int:
    """``--stream``: the checkpoint is traced from its config on the meta device and rewritten
    tensor by tensor from its memory-mapped shards; the resident-set growth is measured from
    here (after the imports) and reported next to the largest tensor."""
    import rewriter
    from rewriter.errors import RewriterError
    from rewriter.ir.weightless import architecture

    source = Path(args.model)
    if not source.is_dir() or not any(source.glob("*.safetensors")):
        raise RewriterError(
            f"--stream needs a Hugging Face directory with safetensors shards; {args.model} is not"
        )
    if args.eval_text:
        raise RewriterError(
            "--eval-text measures perplexity by running the model, which --stream never loads; "
            "evaluate the result with rewriter.load(model.pt2, weights_dir)"
        )
    backend = _backend(args.backend)
    if backend is not None and not backend.streams:
        raise RewriterError(
            f"--stream writes weights and a weightless graph; the {backend.name} backend cannot "
            "keep weights outside its artifact: load them with rewriter.load(model.pt2, "
            "weights_dir) and export from Python"
        )
    config_file = source / "config.json"
    if config_file.exists():
        _refuse_remote_code(json.loads(config_file.read_text()), config_file)
    tokenizer = _local_tokenizer(source)
    calibration = _text_argument(args.calib) if args.calib else None
    out: Path = args.out
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    from rich.console import Console

    console = Console(stderr=True)
    architecture(source)  # imports the model's code before the memory baseline
    ctx = rewriter.PassContext(calibration=calibration, tokenizer=tokenizer, seed=0)
    with _step(console, f"streaming {source} through {args.passes}"):
        run = rewriter.rewrite_checkpoint(
            source,
            args.passes,
            out,
            ctx=ctx,
            seq=args.seq,
            shard_bytes=int(args.shard_size * 1e9),
        )
    print(run.result.report.table())
    if args.explain:
        print(run.result.report.explain())
    print(run.summary())
    summary: dict[str, Any] = {
        "model": str(source),
        "pipeline": args.passes,
        "ok": True,
        "stream": run.to_dict(),
    }
    trimmed = rewriter.vocab.vocab_map(run.result.graph_module)
    if trimmed is not None:
        summary["vocab"] = {"kept": trimmed.size, "of": trimmed.original_size, "ids": trimmed.ids}
        if trimmed.tokenizer is not None:
            _save_tokenizer(trimmed.tokenizer, out / "tokenizer")
            summary["vocab"]["tokenizer"] = str(out / "tokenizer")
    if backend is not None:
        with _step(console, f"binding the weights, exporting with {backend.name}, checking"):
            gm = rewriter.load(out / "model.pt2", out)
            summary[backend.name] = _export_and_check(backend, gm, None, out, {"large": True})
        summary["ok"] = summary[backend.name].get("ok", True)
    summary["report"] = run.result.report.to_dict()
    (out / "report.json").write_text(json.dumps(summary, indent=2, default=str))
    print(f"artifacts in {out}/: " + ", ".join(sorted(p.name for p in out.iterdir())))
    print(f"load with: rewriter.load('{out / 'model.pt2'}', '{out}')")
    return 0 if summary["ok"] else 1


def _local_tokenizer(path: Path) -> Any:
    import transformers

    names = ("tokenizer.json", "tokenizer_config.json", "vocab.json")
    if any((path / name).exists() for name in names):
        return transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    return None


def _text_argument(value: str) -> str:
    path = Path(value)
    return path.read_text(encoding="utf-8") if path.is_file() else value


def _load_model(spec: str) -> _Loaded:
    from rewriter.errors import RewriterError

    if spec == "tiny-gpt2":
        from rewriter import zoo

        model, tokenizer = zoo.tiny_gpt2()
        return _Loaded(
            model, tokenizer, "tiny-gpt2 (embedded)", zoo.eval_text(), zoo.calibration_text()
        )
    path = Path(spec)
    if path.is_dir():
        return _load_directory(path)
    if path.suffix == ".json" and path.is_file():
        return _load_config(path)
    if ":" in spec and not path.exists():
        module_name, _, factory_name = spec.partition(":")
        factory = getattr(importlib.import_module(module_name), factory_name)
        made = factory()
        model, tokenizer = made if isinstance(made, tuple) else (made, None)
        return _Loaded(model.eval(), tokenizer, f"{spec}()")
    raise RewriterError(
        f"--model {spec!r} is not tiny-gpt2, a Hugging Face directory, a config .json or "
        "package.module:factory"
    )


def _refuse_remote_code(config: dict[str, Any], where: Path) -> None:
    from rewriter.ir.weightless import refuse_remote_code

    refuse_remote_code(config, where)


def _model_class(config: Any) -> Any:
    from rewriter.ir.weightless import architecture

    return architecture(config)[1]


def _instantiate(cls: Any, config: Any) -> Any:
    """A randomly initialised model of ``cls`` (a concrete class or an Auto class)."""
    return cls.from_config(config) if cls.__name__.startswith("Auto") else cls(config)


def _load_directory(path: Path) -> _Loaded:
    import transformers

    config_file = path / "config.json"
    if config_file.exists():
        _refuse_remote_code(json.loads(config_file.read_text()), config_file)
    config = transformers.AutoConfig.from_pretrained(
        path, local_files_only=True, trust_remote_code=False
    )
    cls = _model_class(config)
    has_weights = any(path.glob("*.safetensors")) or any(path.glob("*.bin"))
    if has_weights:
        model = cls.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    else:
        model = _instantiate(cls, config)
    tokenizer = _local_tokenizer(path)
    state = "pretrained weights" if has_weights else "random weights (no weights in the directory)"
    return _Loaded(model.eval(), tokenizer, f"{cls.__name__} from {path} ({state})")


def _load_config(path: Path) -> _Loaded:
    import transformers

    data = json.loads(path.read_text())
    _refuse_remote_code(data, path)
    config = transformers.AutoConfig.for_model(**data) if "model_type" in data else None
    if config is None:
        from rewriter.errors import RewriterError

        raise RewriterError(f"{path} has no model_type; it is not a Hugging Face config")
    cls = _model_class(config)
    model = _instantiate(cls, config)
    return _Loaded(model.eval(), None, f"{cls.__name__} from {path} (random weights)")


def _example_ids(loaded: _Loaded, seq: int) -> Any:
    import torch

    from rewriter.ir.trace import max_positions
    from rewriter.pipeline.metrics import encode

    limit = max_positions(loaded.model)
    seq = min(seq, limit) if limit else seq
    if loaded.tokenizer is not None and loaded.eval_text:
        ids = encode(loaded.tokenizer, loaded.eval_text[: 20 * seq])[: 2 * seq]
        if ids.numel() == 2 * seq:
            return ids.view(2, seq)
    vocab = getattr(getattr(loaded.model, "config", None), "vocab_size", None) or 100
    return torch.randint(0, vocab, (2, seq), generator=torch.Generator().manual_seed(0))


@contextmanager
def _step(console: Any, text: str) -> Iterator[None]:
    start = time.perf_counter()
    with console.status(text):
        yield
    console.print(f"{text} done in {time.perf_counter() - start:.1f}s")


def _rewrite(
    loaded: _Loaded,
    spec: str,
    out: Path,
    calibration: str | None,
    evaluation: str | None,
    backend: str | None,
    *,
    seq: int = 32,
    examples: int = 0,
    dialect: str = "linalg-on-tensors",
    explain: bool = False,
) -> dict[str, Any]:
    """Trace, run the pipeline, verify, save, optionally export; print and write the report."""
    from rich.console import Console

    import rewriter

    console = Console(stderr=True)
    pipeline = rewriter.Pipeline.parse(spec)  # fail on a bad spec before any work
    ids = _example_ids(loaded, seq)
    with _step(console, f"tracing {loaded.description}"):
        gm = rewriter.trace(loaded.model, (ids,), dynamic_shapes="auto")
    ctx = rewriter.PassContext(
        calibration=calibration,
        evaluation=evaluation if loaded.tokenizer is not None else None,
        tokenizer=loaded.tokenizer,
        seed=0,
    )
    with _step(console, f"running {pipeline}"):
        result = rewriter.Pipeline.run(pipeline, gm, ctx)
    print(result.report.table())
    if explain:
        print(result.report.explain())
    summary: dict[str, Any] = {"model": loaded.description, "pipeline": str(pipeline), "ok": True}
    final = rewriter.verify.compare(loaded.model, result.graph_module, (ids,))
    summary["error_vs_model"] = final.to_dict()
    all_exact = all(r.exact for r in result.report.records)
    if examples and all_exact:
        with _step(console, f"verifying against the model on {examples} hypothesis-drawn inputs"):
            rewriter.verify.assert_equivalent(
                loaded.model, result.graph_module, max_examples=examples
            )
        summary["hypothesis_examples"] = examples
    print(f"whole pipeline vs the original model: {final}")
    if all_exact and not final.ok:
        summary["ok"] = False
    with _step(console, "saving model.pt2"):
        rewriter.save(result.graph_module, out / "model.pt2")
    trimmed = rewriter.vocab.vocab_map(result.graph_module)
    if trimmed is not None:
        summary["vocab"] = {"kept": trimmed.size, "of": trimmed.original_size, "ids": trimmed.ids}
        if trimmed.tokenizer is not None:
            _save_tokenizer(trimmed.tokenizer, out / "tokenizer")
            summary["vocab"]["tokenizer"] = str(out / "tokenizer")
            print(f"rebuilt tokenizer ({trimmed.describe()}) in {out / 'tokenizer'}")
    target = _backend(backend)
    if target is not None:
        options = {"dialect": dialect} if "dialect" in target.options else {}
        with _step(console, f"exporting with {target.name} ({target.summary}) and checking"):
            summary[target.name] = _export_and_check(
                target, result.graph_module, (ids,), out, options
            )
        summary["ok"] = summary["ok"] and summary[target.name].get("ok", True)
    summary["report"] = result.report.to_dict()
    (out / "report.json").write_text(json.dumps(summary, indent=2, default=str))
    (out / "graph.txt").write_text(rewriter.format_graph(result.graph_module))
    return summary


def _backend_names() -> list[str]:
    from rewriter import backends

    return backends.available()


def _backend(name: str | None) -> Any:
    if name is None:
        return None
    from rewriter import backends

    return backends.get_backend(name)


def _export_and_check(
    backend: Any, gm: Any, inputs: Any, out: Path, options: dict[str, Any]
) -> dict[str, Any]:
    """Export ``gm`` with ``backend`` into ``out`` and check it where it runs here: the
    backend's part of report.json (``check`` is None, with ``unchecked`` saying why, where the
    artifact cannot run on this machine)."""
    exported = backend.export(gm, inputs, out, **options)
    entry: dict[str, Any] = {"path": str(exported.path), **exported.info}
    checkable, why = backend.checkable(exported)
    if not checkable:
        entry.update(check=None, unchecked=why)
        print(f"{backend.name}: wrote {exported.path}; not checked here ({why})")
        return entry
    check = backend.check(gm, exported, inputs)
    entry.update(check=check.to_dict(), ok=check.ok)
    print(f"{backend.label or backend.name} vs the graph: {check}")
    return entry


def _save_tokenizer(tokenizer: Any, directory: Path) -> None:
    """A Hugging Face tokenizer directory, or tokenizer.json for a bare ``tokenizers`` one."""
    directory.mkdir(parents=True, exist_ok=True)
    if hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(directory)
    else:
        tokenizer.save(str(directory / "tokenizer.json"))


# --- demo -----------------------------------------------------------------------------------------


def _demo(out: Path, spec: str, examples: int) -> int:
    import torch

    from rewriter import zoo

    torch.manual_seed(0)
    model, tokenizer = zoo.tiny_gpt2()
    metrics = zoo.metrics()
    print(
        f"embedded model: GPT-2 style, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
        f"parameters, trained on Python docstrings; held-out perplexity "
        f"{metrics['held_out_perplexity']:.1f} "
        f"(bigram baseline {metrics['bigram_held_out_perplexity']:.1f})"
    )
    loaded = _Loaded(
        model, tokenizer, "tiny-gpt2 (embedded)", zoo.eval_text(), zoo.calibration_text()
    )
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    summary = _rewrite(
        loaded, spec, out, loaded.calibration_text, loaded.eval_text, "onnx", examples=examples
    )
    summary["samples"] = _samples(loaded, spec)
    (out / "report.json").write_text(json.dumps(summary, indent=2, default=str))
    print(f"artifacts in {out}/: " + ", ".join(sorted(p.name for p in out.iterdir())))
    return 0 if summary["ok"] else 1


DEMO_PROMPTS = ("def read_config(path):\n    ", "Return the number of")


def _samples(loaded: _Loaded, spec: str, new_tokens: int = 16) -> list[dict[str, Any]]:
    """Greedy continuations of a few prompts by the model and by its rewrite, decoded with a KV
    cache (the rewrite runs on the model's step graph, cut into prefill and decode graphs)."""
    import torch

    import rewriter
    from rewriter import deploy

    ids = torch.tensor(loaded.tokenizer.encode(loaded.calibration_text[:2000])[:16]).view(2, 8)
    step = deploy.trace_causal_lm(loaded.model, ids)
    ctx = rewriter.PassContext(
        calibration=loaded.calibration_text, tokenizer=loaded.tokenizer, measure_error=False
    )
    rewritten = rewriter.Pipeline.parse(spec).run(step, ctx).graph_module
    before = deploy.generate(deploy.split(step), loaded.tokenizer, DEMO_PROMPTS, new_tokens)
    after = deploy.generate(deploy.split(rewritten), loaded.tokenizer, DEMO_PROMPTS, new_tokens)
    rows = []
    for i, prompt in enumerate(DEMO_PROMPTS):
        same = bool(torch.equal(before.tokens[i], after.tokens[i]))
        rows.append(
            {
                "prompt": prompt,
                "original": before.texts[i] if before.texts else "",
                "rewritten": after.texts[i] if after.texts else "",
                "same_tokens": same,
            }
        )
        print(f"prompt    {prompt!r}")
        print(f"original  {rows[-1]['original']!r}")
        print(f"rewritten {rows[-1]['rewritten']!r}  ({'same tokens' if same else 'differs'})")
    return rows


if __name__ == "__main__":
    sys.exit(main())
