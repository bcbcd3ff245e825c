"""Pipelines: text specs, options, registry, reports, errors, and untouched inputs."""

from __future__ import annotations

import dataclasses
import json
from typing import ClassVar, Literal

import pytest
import torch
from rewriter.passes import get_pass

import rewriter
from rewriter import Budget, Pass, PassContext, PassResult, Pipeline, option
from rewriter.errors import PassError, PreconditionError, SpecError
from rewriter.ir.graph import format_graph
from rewriter.pipeline.spec import parse_pipeline
from rewriter.rewrite.driver import Rewriter
from rewriter.testing import fingerprint, graph_fingerprint, traced
from rewriter.verify.families import ModelSpec

aten = torch.ops.aten


@dataclasses.dataclass(frozen=True)
class ScaleLogitsPass(Pass):
    """Multiply the logits by a factor (a user pass for these tests)."""

    name: ClassVar[str] = "scale-logits"
    exact: ClassVar[bool] = False

    factor: float = option(2.0, "Factor applied to the output.")
    mode: Literal["mul", "add"] = option("mul", "How to apply it.")
    layers: tuple[int, ...] = option((), "Unused; exercises list options.")
    budget: Budget | None = option(None, "Unused; exercises budgets.")

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        rw = Rewriter(gm, pass_name=self.name)
        output = next(iter(gm.graph.find_nodes(op="output")))
        head = next(n for n in reversed(gm.graph.nodes) if n.target == aten.linear.default)
        target = aten.mul.Tensor if self.mode == "mul" else aten.add.Tensor
        scaled = rw.call(target, (head, self.factor), before=output, rule="scale", meta_from=head)
        rw.replace_uses(head, scaled, only=lambda user: user is not scaled, rule="scale")
        rw.finish()
        return PassResult(gm, changed=True, stats=dict(rw.counters))


@dataclasses.dataclass(frozen=True)
class BreakLayerNormPass(Pass):
    """Refuse at the first LayerNorm (a failing pass for these tests)."""

    name: ClassVar[str] = "break-layer-norm"

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        node = next(n for n in gm.graph.nodes if n.target == aten.layer_norm.default)
        node.args = (node.args[0], node.args[1], None, None, 1e-5)  # mutate first, then refuse
        raise PreconditionError("no LayerNorm allowed here", node)


@dataclasses.dataclass(frozen=True)
class SilentlyWrongPass(Pass):
    """An 'exact' pass that changes the outputs: the pipeline must catch it."""

    name: ClassVar[str] = "silently-wrong"

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        norm = next(n for n in gm.graph.nodes if n.target == aten.layer_norm.default)
        norm.args = (*norm.args[:4], 0.5)
        gm.recompile()
        return PassResult(gm, changed=True)


for cls in (ScaleLogitsPass, BreakLayerNormPass, SilentlyWrongPass):
    rewriter.register_pass(cls)


def test_parse_specs_and_round_trip() -> None:
    pipeline = Pipeline.parse(
        ' canonicalize , scale-logits(factor=3, mode="add", layers=[1,2], budget=ppl+2%)'
    )
    assert [p.name for p in pipeline.passes] == ["canonicalize", "scale-logits"]
    scale = pipeline.passes[1]
    assert scale == ScaleLogitsPass(3.0, "add", (1, 2), Budget("ppl", 0.02, True))
    assert Pipeline.parse(str(pipeline)) == pipeline
    assert str(Pipeline.parse("scale-logits(budget='ppl+0.5')").passes[0].budget) == "ppl+0.5"


@pytest.mark.parametrize(
    ("spec", "message", "caret"),
    [
        ("canonicalize,nope", "unknown pass 'nope'", 13),
        ("scale-logits(factr=2)", "has no option 'factr'", 13),
        ("scale-logits(factor=yes)", "expected a number", 20),
        ("scale-logits(mode=div)", "'div' is not one of", 18),
        ("scale-logits(budget=ppl*2)", "budget 'ppl\\*2'", 20),
        ("scale-logits(budget=speed+2%)", "metric 'speed'", 20),
        ("scale-logits(factor=2", "expected '\\)'", 21),
        ("canonicalize,,", "expected a pass name", 13),
        ("Canonicalize", "expected a pass name", 0),
        ("scale-logits(factor=2,factor=3)", "given twice", 22),
        ("", "empty pipeline", 0),
        ("canonicalize extra", "unexpected 'e'", 13),
    ],
)
def test_spec_errors_point_at_the_offending_part(spec: str, message: str, caret: int) -> None:
    with pytest.raises(SpecError, match=message) as info:
        Pipeline.parse(spec)
    assert info.value.position == caret
    if spec:
        assert info.value.args[0].splitlines()[-1] == "  " + " " * caret + "^"


def test_parser_values() -> None:
    (step,) = parse_pipeline("x(a=1,b=-2.5e-3,c=true,d=none,e='q r',f=[1,two],g=all-linear)")
    values = {o.key: o.value for o in step.options}
    assert values == {
        "a": 1,
        "b": -2.5e-3,
        "c": True,
        "d": None,
        "e": "q r",
        "f": [1, "two"],
        "g": "all-linear",
    }


def test_budgets() -> None:
    relative, absolute = Budget.parse("ppl+2%"), Budget.parse("loss + 0.5")
    assert relative.limit(10.0) == pytest.approx(10.2) and relative.allows(10.0, 10.19)
    assert not relative.allows(10.0, 10.21)
    assert absolute.limit(3.0) == 3.5 and str(absolute) == "loss+0.5" and str(relative) == "ppl+2%"


def test_registry_refuses_bad_registrations() -> None:
    with pytest.raises(ValueError, match="built-in"):

        @rewriter.register_pass
        @dataclasses.dataclass(frozen=True)
        class Shadow(Pass):
            name: ClassVar[str] = "canonicalize"

    with pytest.raises(ValueError, match="kebab-case"):

        @rewriter.register_pass
        @dataclasses.dataclass(frozen=True)
        class BadName(Pass):
            name: ClassVar[str] = "Bad_Name"

    with pytest.raises(TypeError):
        rewriter.register_pass(int)
    assert get_pass("scale-logits") is ScaleLogitsPass
    assert "scale-logits" in rewriter.available_passes()


def test_report_has_time_rewrites_error_and_renders() -> None:
    _, gm = traced(ModelSpec("gpt2"))
    result = Pipeline.parse("canonicalize,scale-logits(factor=3)").run(gm)
    canonicalize, scale = result.report.records
    assert canonicalize.rewrites > 0 and canonicalize.error.ok and canonicalize.exact
    assert scale.error.max_abs > 0 and not scale.exact
    table = result.report.table()
    assert (
        "canonicalize" in table and "scale-logits(factor=3.0)" in table and "approximate" in table
    )
    data = json.loads(result.report.to_json())
    assert [p["name"] for p in data["passes"]] == ["canonicalize", "scale-logits"]
    assert data["passes"][0]["error"]["ok"] is True


def test_pipelines_never_touch_their_input_or_the_model() -> None:
    spec = ModelSpec("gpt2", outliers=True)
    model = spec.build()
    model_before = fingerprint(model)
    gm = rewriter.trace(model, spec.example_inputs())
    graph_before = graph_fingerprint(gm)
    result = Pipeline.parse("canonicalize,scale-logits").run(gm)
    assert graph_fingerprint(gm) == graph_before and fingerprint(model) == model_before
    with pytest.raises(PassError):
        Pipeline.parse("canonicalize,break-layer-norm").run(gm)
    assert graph_fingerprint(gm) == graph_before and fingerprint(model) == model_before
    assert result.graph_module is not gm


def test_failure_names_pass_node_module_and_history(tmp_path) -> None:
    _, gm = traced(ModelSpec("gpt2"))
    before = format_graph(gm)
    ctx = PassContext(reproducer_dir=str(tmp_path))
    with pytest.raises(PassError) as info:
        Pipeline.parse("canonicalize,scale-logits(factor=3),break-layer-norm").run(gm, ctx)
    message = str(info.value)
    assert "pass 'break-layer-norm' refused: no LayerNorm allowed here" in message
    assert "transformer.h.0.ln_1: LayerNorm" in message
    assert "passes that already ran: canonicalize, scale-logits(factor=3.0)" in message
    assert format_graph(gm) == before
    assert "break-layer-norm" in (tmp_path / "spec.txt").read_text()
    assert (tmp_path / "input_graph.txt").read_text().count("layer_norm") >= 5
    assert (tmp_path / "input.pt2").exists()


def test_an_exact_pass_that_changes_outputs_is_caught() -> None:
    _, gm = traced(ModelSpec("gpt2"))
    with pytest.raises(PassError, match="exact pass changed the graph's outputs"):
        Pipeline.parse("silently-wrong").run(gm)


def test_verify_each_print_after_and_disable(monkeypatch, capsys) -> None:
    _, gm = traced(ModelSpec("gpt2", layers=1))
    result = Pipeline.parse("canonicalize").run(
        gm, PassContext(verify_each=True, print_after="changed")
    )
    assert "# graph after canonicalize" in capsys.readouterr().out
    assert result.report.records[0].error.ok
    monkeypatch.setenv("REWRITER_DISABLE", "scale-logits")
    result = Pipeline.parse("canonicalize,scale-logits").run(gm)
    assert result.report.records[1].skipped and "REWRITER_DISABLE" in result.report.table()


@pytest.mark.parametrize(
    "spec",
    [
        "canonicalize,prernorm,fold-ln",
        "canonicalize,crmsnorm",
        "lora(r=2)",
        "lora(r=2),merge-adapters",
        "nola(r=2,k=4,l=4),merge-adapters",
        "canonicalize,l1quant(bits=4)",
        "canonicalize,linearize(fit_steps=0)",
        "vocab-trim",
    ],
)
def test_new_tensors_keep_the_model_dtype_and_device(spec: str) -> None:
    # A float64 model stays float64: a new tensor made in float32 (a factor, a folded weight,
    # a scale) would silently round what the pass claims exact. Packed codes and exponents may
    # be integers; nothing may land on another device.
    model_spec = ModelSpec("gpt2", layers=1, vocab=40, tied=False, dtype=torch.float64)
    _, gm = traced(model_spec)
    ctx = PassContext(calibration=torch.randint(0, 40, (4, 8)), progress=False, batch_size=2)
    out = Pipeline.parse(spec).run(gm, ctx).graph_module
    tensors = {**dict(out.named_parameters()), **dict(out.named_buffers())}
    assert tensors
    for name, tensor in tensors.items():
        assert tensor.device.type == "cpu", name
        if tensor.is_floating_point():
            assert tensor.dtype == torch.float64, f"{spec}: {name} is {tensor.dtype}"
        else:
            assert "l1quant" in spec or "vocab-trim" in spec, f"{spec}: {name} is {tensor.dtype}"


def test_instruments_see_every_pass_add_metrics_and_can_adapt_the_context() -> None:
    from rewriter.pipeline.instruments import (
        Instrument,
        Perplexity,
        Vocabulary,
        default_instruments,
    )

    _, gm = traced(ModelSpec("gpt2"))
    calls: list[str] = []
    seen_seeds: list[int] = []

    class Probe(Instrument):
        def before_pipeline(self, gm, ctx):
            calls.append("start")
            return {"nodes": len(gm.graph.nodes)}

        def before_pass(self, step, gm, ctx):
            calls.append(f"before {step.name}")
            first_probe = step.name == "seed-probe" and not seen_seeds
            return dataclasses.replace(ctx, seed=ctx.seed + 1) if first_probe else None

        def after_pass(self, step, before, after, record):
            calls.append(f"after {step.name}")
            assert record.spec == step.spec() and before is not after
            return {"nodes": len(after.graph.nodes)}

        def after_pipeline(self, result):
            calls.append(f"end {len(result.report.records)}")

    @dataclasses.dataclass(frozen=True)
    class SeedProbe(Pass):  # what a pass's context holds after the instruments
        name: ClassVar[str] = "seed-probe"

        def run(self, gm, ctx):
            seen_seeds.append(ctx.seed)
            return PassResult(gm, changed=False)

    before = graph_fingerprint(gm)
    pipeline = Pipeline((get_pass("canonicalize")(), SeedProbe(), ScaleLogitsPass(), SeedProbe()))
    result = pipeline.run(gm, PassContext(seed=7), instruments=[Probe()])
    steps = ["canonicalize", "seed-probe", "scale-logits", "seed-probe"]
    assert calls == ["start", *[f"{w} {n}" for n in steps for w in ("before", "after")], "end 4"]
    assert seen_seeds == [8, 7]  # the replaced context went to that one pass only
    assert result.report.baseline["nodes"] == len(gm.graph.nodes)
    nodes = [r.metrics["nodes"] for r in result.report.records]
    assert nodes[2] == nodes[1] + 1  # scale-logits added its multiplication
    assert graph_fingerprint(gm) == before
    assert [type(i) for i in default_instruments()] == [Vocabulary, Perplexity]
