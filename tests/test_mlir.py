"""MLIR export through torch-mlir: GPT-2 after prernorm, l1quant and linearize in every dialect
(verified modules), linalg-on-tensors executed on CPU equal to the graph; dynamic shapes; the
known limits as clear errors; the CLI."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

import rewriter
from rewriter.errors import LoweringError
from rewriter.verify.families import ModelSpec

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("torch_mlir") is None, reason="torch-mlir is not installed"
)
SPECS = [
    "canonicalize,prernorm",
    "canonicalize,l1quant(bits=4)",
    "canonicalize,linearize(feature_map=elu)",
]


@pytest.fixture(scope="module")
def gpt2():
    config = ModelSpec("gpt2", vocab=64, layers=1, heads=2, head_dim=8, seed=0)
    model = config.build()
    example = config.example_inputs(batch=2, seq=6)  # batch 2: the stock SDPA lowering fails
    gm = rewriter.trace(model, example, dynamic_shapes="auto")
    ctx = rewriter.PassContext(
        calibration=torch.randint(0, 64, (4, 6)), progress=False, batch_size=2
    )
    return {
        spec: rewriter.Pipeline.parse(spec).run(gm, ctx).graph_module for spec in SPECS
    }, example


@pytest.mark.parametrize("spec", SPECS)
def test_every_dialect_and_linalg_runs_equal_to_the_graph(gpt2, spec, tmp_path) -> None:
    from rewriter.backends import mlir

    graphs, example = gpt2
    gm = graphs[spec]
    for dialect in mlir.DIALECTS:
        exported = mlir.export(gm, example, tmp_path / f"{dialect}.mlir", dialect=dialect)
        text = (tmp_path / f"{dialect}.mlir").read_text()
        assert "func.func @main" in text and "rewriter." not in text  # every op decomposed
        marker = {
            "linalg-on-tensors": "linalg.",
            "tosa": "tosa.",
            "stablehlo": "stablehlo.",
            "torch": "torch.aten.",
        }
        assert marker[dialect] in text, dialect
    assert exported.decomposed or spec == "canonicalize,prernorm"
    report = mlir.check(gm, mlir.export(gm, example), example)
    assert report.ok, report


def test_dynamic_shapes_lower_to_linalg_and_the_limits_are_clear_errors(gpt2) -> None:
    from rewriter.backends import mlir

    graphs, example = gpt2
    gm = graphs["canonicalize,prernorm"]
    exported = mlir.export(gm, example, dynamic=True)
    assert "tensor<?x?xi64>" in exported.text  # dynamic batch and length, a verified module
    with pytest.raises(LoweringError, match="dynamic shapes"):  # measured: NaN when run
        mlir.run(exported, [torch.randint(0, 64, (3, 9))])
    for dialect in ("tosa", "stablehlo"):
        with pytest.raises(LoweringError, match=r"static shapes|cumsum"):
            mlir.export(gm, example, dialect=dialect, dynamic=True)
    with pytest.raises(LoweringError, match="unknown dialect"):
        mlir.export(gm, example, dialect="spirv")


def test_cli_run_with_the_mlir_backend(tmp_path) -> None:
    from rewriter.cli import main

    config = tmp_path / "config.json"
    config.write_text(
        json.dumps(
            {
                "model_type": "gpt2",
                "n_layer": 1,
                "n_head": 2,
                "n_embd": 16,
                "vocab_size": 64,
                "n_positions": 32,
            }
        )
    )
    out = tmp_path / "out"
    code = main(
        [
            "run",
            "--model",
            str(config),
            "--passes",
            "canonicalize,prernorm",
            "--out",
            str(out),
            "--backend",
            "mlir",
            "--seq",
            "8",
        ]
    )
    assert code in (0, None)
    summary = json.loads((out / "report.json").read_text())
    assert summary["mlir"]["dialect"] == "linalg-on-tensors" and summary["mlir"]["check"]["ok"]
    assert "func.func @main" in (out / "model.mlir").read_text()
