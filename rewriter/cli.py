"""The ``rewriter`` command: list passes, run the demo.

``rewriter passes`` prints every registered pass with its one-line doc and options.
``rewriter demo`` traces a model, runs the default pipeline, verifies the result against the
model with hypothesis-drawn inputs, and prints the report table (``make demo`` runs it).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main"]

DEFAULT_PIPELINE = "canonicalize"
"""The demo's pipeline; later passes join it as they land."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rewriter", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    commands.add_parser("passes", help="list passes, their one-line docs and options")

    demo = commands.add_parser("demo", help="trace, rewrite, verify and report on a demo model")
    demo.add_argument("--out", default="out/demo", help="directory for the artifacts (replaced)")
    demo.add_argument("--pipeline", default=DEFAULT_PIPELINE, help="pipeline spec to run")
    demo.add_argument("--examples", type=int, default=8, help="hypothesis examples for verify")

    args = parser.parse_args(argv)
    if args.command == "passes":
        return _passes()
    return _demo(Path(args.out), args.pipeline, args.examples)


def _passes() -> int:
    from rewriter.passes import available, get_pass

    for name in available():
        cls = get_pass(name)
        print(f"{name}: {cls.one_line()}")
        for option in cls.options():
            print(f"    {option.name}: {option.type} = {option.default!r}  {option.doc}")
    return 0


def _demo(out: Path, spec: str, examples: int) -> int:
    import torch

    import rewriter
    from rewriter.families import ModelSpec
    from rewriter.graph import op_counts

    torch.manual_seed(0)
    model_spec = ModelSpec("llama", layers=4, heads=4, head_dim=32, vocab=2048, max_positions=256)
    model = model_spec.build()
    print(
        f"demo model: LlamaForCausalLM, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
        "parameters (random weights, built from a config)"
    )
    (ids,) = model_spec.example_inputs(batch=2, seq=32)
    start = time.perf_counter()
    gm = rewriter.trace(model, (ids,), dynamic_shapes="auto")
    print(f"traced in {time.perf_counter() - start:.2f}s: {len(gm.graph.nodes)} nodes")

    result = rewriter.Pipeline.parse(spec).run(gm, rewriter.PassContext(seed=0))
    print(result.report.table())
    before, after = op_counts(gm), op_counts(result.graph_module)
    print(
        "ops before -> after: "
        + ", ".join(
            f"{k.removeprefix('aten.')} {before.get(k, 0)}->{after.get(k, 0)}"
            for k in sorted(set(before) | set(after))
            if before.get(k, 0) != after.get(k, 0)
        )
    )

    start = time.perf_counter()
    report = rewriter.verify.assert_equivalent(model, result.graph_module, max_examples=examples)
    print(
        f"verified against the model on the example and {examples} hypothesis-drawn inputs "
        f"in {time.perf_counter() - start:.1f}s: {report}"
    )

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / "report.json").write_text(result.report.to_json())
    (out / "graph_before.txt").write_text(rewriter.format_graph(gm))
    (out / "graph_after.txt").write_text(rewriter.format_graph(result.graph_module))
    (out / "verify.json").write_text(json.dumps(report.to_dict(), indent=2))
    print(f"artifacts in {out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
