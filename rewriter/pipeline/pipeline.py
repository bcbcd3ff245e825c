"""Passes, pipelines and their reports.

A pass is a frozen dataclass with a kebab-case ``name``, typed options (each documented with
:func:`option`) and ``run(gm, ctx) -> PassResult``. A :class:`Pipeline` is an ordered tuple of
passes with a text form (``"canonicalize,prernorm,l1quant(bits=4)"``); running it

* never mutates its input: each pass works on a copy (weights are shared copy-on-write),
  so a pass that raises leaves the input, and every earlier result, as it was;
* times each pass, counts its rewrites, and measures the error it introduced against its input
  on the example inputs (exact passes are held to :func:`rewriter.verify.tolerance`);
* wraps a failure in :class:`~rewriter.errors.PassError` naming the pass, the node and its source
  module, and the passes that already ran; with ``reproducer_dir`` it saves the failing input.

``REWRITER_DISABLE=pass-a,pass-b`` skips passes by name (for bisecting a miscompile).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.fx

from rewriter import verify
from rewriter.analysis import vocab
from rewriter.context import PassContext
from rewriter.errors import PassError, PreconditionError, RewriterError, SpecError
from rewriter.ir.graph import copy_graph_module, format_graph, is_weightless
from rewriter.ir.trace import trace_info
from rewriter.pipeline.instruments import Instrument, default_instruments
from rewriter.pipeline.spec import Budget, ParsedStep, parse_pipeline

__all__ = [
    "OptionInfo",
    "Pass",
    "PassRecord",
    "PassResult",
    "Pipeline",
    "PipelineResult",
    "Report",
    "option",
]


def option(default: Any, doc: str) -> Any:
    """A pass option with its documentation (shown by ``rewriter passes``)."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("pass options must have immutable defaults (use a tuple)")
    return dataclasses.field(default=default, metadata={"doc": doc})


@dataclasses.dataclass(frozen=True)
class OptionInfo:
    name: str
    type: str
    default: Any
    doc: str


@dataclasses.dataclass
class PassResult:
    """What a pass returns: the new graph, whether it changed, and what happened."""

    graph_module: torch.fx.GraphModule
    changed: bool
    stats: dict[str, int] = dataclasses.field(default_factory=dict)
    """Rewrites per rule (``{"drop-eval-dropout": 25}``)."""
    notes: list[str] = dataclasses.field(default_factory=list)
    """Lines for the report (``"no LayerNorm: nothing to do"``)."""
    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Measurements the pass made itself (perplexity before/after, bytes saved...)."""
    rules: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    """Per-rule statistics of a rule-table pass (``RuleStats.per_rule``: definition site,
    attempts, matches, rewrites), every rule of its table included."""


@dataclasses.dataclass(frozen=True)
class Pass:
    """Base class of passes. Subclasses are frozen dataclasses with typed options."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    """One line for ``rewriter passes`` (default: the first line of the class docstring)."""
    exact: ClassVar[bool] = True
    """Exact passes must reproduce their input within the tolerance rule."""

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        raise NotImplementedError

    # -- options and text form --
    @classmethod
    def options(cls) -> list[OptionInfo]:
        hints = typing.get_type_hints(cls)
        return [
            OptionInfo(
                f.name, _type_name(hints.get(f.name, Any)), f.default, f.metadata.get("doc", "")
            )
            for f in dataclasses.fields(cls)
        ]

    @classmethod
    def one_line(cls) -> str:
        return cls.summary or (cls.__doc__ or "").strip().splitlines()[0]

    @classmethod
    def from_options(
        cls,
        options: dict[str, Any],
        *,
        spec: str = "",
        positions: dict[str, tuple[int, int]] | None = None,
    ) -> Pass:
        """Build the pass from raw option values, converting each to its declared type."""
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values = {}
        for key, raw in options.items():
            key_position, position = (positions or {}).get(key, (None, None))
            if key not in fields:
                known = ", ".join(fields) or "none"
                raise SpecError(
                    f"pass '{cls.name}' has no option '{key}' (options: {known})",
                    spec,
                    key_position,
                )
            try:
                values[key] = _convert(raw, hints[key])
            except (TypeError, ValueError) as error:
                raise SpecError(
                    f"option '{key}' of '{cls.name}': {error}", spec, position
                ) from None
        return cls(**values)

    def spec(self) -> str:
        """The text form, listing options that differ from their defaults."""
        parts = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value != f.default:
                parts.append(f"{f.name}={_format_value(value)}")
        return f"{self.name}({','.join(parts)})" if parts else self.name


def _type_name(hint: Any) -> str:
    if isinstance(hint, type):
        return hint.__name__
    return str(hint).replace("typing.", "")


def _convert(raw: Any, hint: Any) -> Any:
    """Convert a raw spec value to an option's declared type, or raise ValueError saying why."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return _convert_union(raw, args)
    if origin is typing.Literal:
        if raw not in args:
            raise ValueError(f"{raw!r} is not one of {', '.join(map(repr, args))}")
        return raw
    if origin is tuple:
        items = raw if isinstance(raw, list) else [raw]
        inner = args[0] if args else Any
        return tuple(_convert(item, inner) for item in items)
    if hint is Any:
        return raw
    if hint in _SCALARS:
        accepts, convert, expected = _SCALARS[hint]
        if not accepts(raw):
            raise ValueError(f"expected {expected}, got {raw!r}")
        return convert(raw)
    raise TypeError(f"unsupported option type {hint}")


def _convert_union(raw: Any, options: tuple[Any, ...]) -> Any:
    if raw is None and type(None) in options:
        return None
    errors = []
    for option_type in options:
        if option_type is type(None):
            continue
        try:
            return _convert(raw, option_type)
        except (TypeError, ValueError) as error:
            errors.append(str(error))
    raise ValueError("; ".join(errors))


def _is_number(raw: Any) -> bool:
    return isinstance(raw, (int, float)) and not isinstance(raw, bool)


_SCALARS: dict[Any, tuple[Any, Any, str]] = {
    bool: (lambda r: isinstance(r, bool), bool, "true or false"),
    int: (lambda r: isinstance(r, int) and not isinstance(r, bool), int, "an integer"),
    float: (_is_number, float, "a number"),
    str: (lambda r: isinstance(r, str), str, "a string"),
    Budget: (
        lambda r: isinstance(r, (str, Budget)),
        lambda r: r if isinstance(r, Budget) else Budget.parse(r),
        "a budget like 'ppl+2%'",
    ),
}


def _format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (tuple, list)):
        return "[" + ",".join(_format_value(v) for v in value) + "]"
    if isinstance(value, (Budget, str)):
        text = str(value)
        return text if text.replace("-", "").replace("_", "").isalnum() else f'"{text}"'
    return repr(value)


# --- reports -----------------------------------------------------------------------------------


@dataclasses.dataclass
class PassRecord:
    """One row of a pipeline report."""

    name: str
    spec: str
    seconds: float
    changed: bool
    rewrites: int
    stats: dict[str, int]
    notes: list[str]
    error: verify.ErrorReport | None
    metrics: dict[str, Any]
    exact: bool
    skipped: bool = False
    rules: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    """Per-rule statistics (rule-table passes only): see ``PassResult.rules``."""

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["error"] = self.error.to_dict() if self.error is not None else None
        return data


@dataclasses.dataclass
class Report:
    """Per-pass time, rewrites, error and metrics of a pipeline run."""

    pipeline: str
    records: list[PassRecord] = dataclasses.field(default_factory=list)
    baseline: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Metrics of the pipeline's input graph (``{"ppl": 41.7}`` with evaluation data)."""

    @property
    def seconds(self) -> float:
        return sum(r.seconds for r in self.records)

    def to_dict(self) -> dict[str, Any]:
        return {
            "pipeline": self.pipeline,
            "seconds": self.seconds,
            "baseline": self.baseline,
            "passes": [r.to_dict() for r in self.records],
        }

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, default=_json_default)

    def explain(self) -> str:
        """Per rule-table pass: how many of its rules fired, each rule's attempts, matches and
        rewrites, and the rules that never fired on this graph with their definition sites
        (tinygrad's match statistics; ``rewriter run --explain``)."""
        lines = []
        for record in self.records:
            if not record.rules:
                continue
            fired = [name for name, r in record.rules.items() if r["fired"]]
            lines.append(
                f"{record.spec}: {len(fired)} of {len(record.rules)} rules rewrote this graph"
            )
            for name, r in record.rules.items():
                if r["fired"] or r["matches"]:
                    lines.append(
                        f"  {name:32} fired {r['fired']:4}  matched {r['matches']:4}  tried "
                        f"{r['attempts']:5}  ({r['location']})"
                    )
            idle = [n for n, r in record.rules.items() if not r["fired"] and not r["matches"]]
            if idle:
                lines.append(
                    "  never matched: "
                    + ", ".join(
                        f"{n} ({record.rules[n]['location']}, tried {record.rules[n]['attempts']})"
                        for n in idle
                    )
                )
        return "\n".join(lines) or "no pass of this pipeline applies a rule table"

    def table(self) -> str:
        """The report as a text table (rendered with rich)."""
        from rich.console import Console
        from rich.table import Table

        title = f"pipeline: {self.pipeline}"
        if self.baseline:
            title += (
                "  (input: "
                + ", ".join(f"{k} {_format_metric(v)}" for k, v in self.baseline.items())
                + ")"
            )
        table = Table(title=title)
        for column in ("pass", "time", "rewrites", "max abs err", "status", "notes"):
            table.add_column(column, justify="right" if column in ("time", "rewrites") else "left")
        # Metrics several passes report (perplexity after each pass) get columns; what one pass
        # alone reports goes into its notes cell unless its notes tell it already (report.json
        # has everything), so the table stays readable.
        counts: dict[str, int] = {}
        for r in self.records:
            for k, v in r.metrics.items():
                if _scalar(v):
                    counts[k] = counts.get(k, 0) + 1
        metric_keys = sorted(k for k, n in counts.items() if n > 1 or k == "ppl")
        for key in metric_keys:
            table.add_column(key, justify="right")
        for record in self.records:
            status = "skipped" if record.skipped else _status(record)
            row = [
                record.spec,
                f"{record.seconds * 1000:.0f} ms",
                str(record.rewrites),
                "-" if record.error is None else f"{record.error.max_abs:.2e}",
                status,
                "; ".join(
                    [
                        *record.notes,
                        *(
                            f"{k} {_format_metric(v)}"
                            for k, v in record.metrics.items()
                            if _scalar(v) and k not in metric_keys and not record.notes
                        ),
                    ]
                ),
            ]
            row += [_format_metric(record.metrics.get(k)) for k in metric_keys]
            table.add_row(*row)
        console = Console(width=160, record=True, file=open(os.devnull, "w"))
        console.print(table)
        return console.export_text()


def _status(record: PassRecord) -> str:
    if record.error is None:
        return "changed" if record.changed else "unchanged"
    if record.exact:
        return "exact" if record.error.ok else "NOT EXACT"
    return "approximate"


def _scalar(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _format_metric(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _json_default(value: Any) -> Any:
    if isinstance(value, Budget):
        return str(value)
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return str(value)


# --- pipelines ----------------------------------------------------------------------------------


@dataclasses.dataclass
class PipelineResult:
    graph_module: torch.fx.GraphModule
    report: Report


@dataclasses.dataclass(frozen=True)
class Pipeline:
    """An ordered tuple of passes."""

    passes: tuple[Pass, ...]

    @classmethod
    def parse(cls, spec: str) -> Pipeline:
        """Build a pipeline from its text form, e.g. ``"canonicalize,l1quant(bits=4)"``."""
        from rewriter.passes import get_pass  # the one seam from core to the pass registry

        steps: list[ParsedStep] = parse_pipeline(spec)
        passes = []
        for step in steps:
            try:
                pass_cls = get_pass(step.name)
            except KeyError as error:
                raise SpecError(str(error.args[0]), spec, step.position) from None
            options = {o.key: o.value for o in step.options}
            positions = {o.key: (o.key_position, o.position) for o in step.options}
            passes.append(pass_cls.from_options(options, spec=spec, positions=positions))
        return cls(tuple(passes))

    def __str__(self) -> str:
        return ",".join(p.spec() for p in self.passes)

    def run(
        self,
        gm: torch.fx.GraphModule,
        ctx: PassContext | None = None,
        *,
        instruments: Sequence[Instrument] = (),
    ) -> PipelineResult:
        """Run every pass on a copy of ``gm``; ``gm`` itself is never changed.

        ``instruments`` (:mod:`rewriter.instruments`) run around the pipeline and each pass,
        after the built-in ones (the vocabulary bookkeeping and the perplexity column)."""
        ctx = ctx or PassContext()
        report = Report(str(self))
        disabled = {
            n.strip() for n in os.environ.get("REWRITER_DISABLE", "").split(",") if n.strip()
        }
        weightless = is_weightless(gm)
        examples = None if weightless else _example_inputs(gm, ctx)
        hooks = [*default_instruments(), *instruments]
        for hook in hooks:
            report.baseline.update(hook.before_pipeline(gm, ctx) or {})
        current = gm
        ran: list[str] = []
        for step in self.passes:
            if step.name in disabled:
                report.records.append(
                    PassRecord(
                        step.name,
                        step.spec(),
                        0.0,
                        False,
                        0,
                        {},
                        ["disabled by REWRITER_DISABLE"],
                        None,
                        {},
                        step.exact,
                        skipped=True,
                    )
                )
                continue
            previous = current
            step_ctx = ctx
            for hook in hooks:
                step_ctx = hook.before_pass(step, current, step_ctx) or step_ctx
            current = self._run_one(step, current, step_ctx, examples, ran, report)
            examples = _carry_examples(examples, previous, current)
            for hook in hooks:
                report.records[-1].metrics.update(
                    hook.after_pass(step, previous, current, report.records[-1]) or {}
                )
            ran.append(step.spec())
        result = PipelineResult(current, report)
        for hook in hooks:
            hook.after_pipeline(result)
        return result

    def _run_one(
        self,
        step: Pass,
        gm: torch.fx.GraphModule,
        ctx: PassContext,
        examples: Sequence[torch.Tensor] | None,
        ran: list[str],
        report: Report,
    ) -> torch.fx.GraphModule:
        work = copy_graph_module(gm)
        start = time.perf_counter()
        try:
            result = step.run(work, ctx)
            if not isinstance(result, PassResult):
                raise TypeError(
                    f"{type(step).__name__}.run returned {type(result).__name__}, not PassResult"
                )
        except Exception as error:
            node = getattr(error, "node", None)
            self._save_reproducer(ctx, gm, step, ran)
            if isinstance(error, PassError):
                raise
            if is_weightless(gm) and "meta" in str(error):
                error = PreconditionError(
                    f"pass '{step.name}' reads weight values or runs the graph, and this graph is "
                    f"weightless (traced on the meta device): run it on a loaded model ({error})"
                )
            raise PassError(step.spec(), error, ran, node) from error
        seconds = time.perf_counter() - start
        out = result.graph_module
        error_report = None
        if examples is not None and result.changed:
            error_report = verify.compare(gm, out, examples)
            if step.exact and not error_report.ok:
                self._save_reproducer(ctx, gm, step, ran)
                raise PassError(
                    step.spec(),
                    RewriterError(f"exact pass changed the graph's outputs: {error_report}"),
                    ran,
                )
            if step.exact and ctx.verify_each:
                verify.assert_equivalent(gm, out, examples)
        report.records.append(
            PassRecord(
                name=step.name,
                spec=step.spec(),
                seconds=seconds,
                changed=result.changed,
                rewrites=sum(result.stats.values()),
                stats=dict(result.stats),
                notes=list(result.notes),
                error=error_report,
                metrics=dict(result.metrics),
                exact=step.exact,
                rules=dict(result.rules),
            )
        )
        if ctx.print_after == "all" or (ctx.print_after == "changed" and result.changed):
            print(f"# graph after {step.spec()}\n{format_graph(out)}")
        return out

    def _save_reproducer(
        self, ctx: PassContext, gm: torch.fx.GraphModule, step: Pass, ran: list[str]
    ) -> None:
        if not ctx.reproducer_dir:
            return
        directory = Path(ctx.reproducer_dir)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "spec.txt").write_text(
            f"failing pass: {step.spec()}\npasses that ran before: {','.join(ran) or 'none'}\n"
        )
        (directory / "input_graph.txt").write_text(format_graph(gm))
        info = trace_info(gm)
        if info is not None:
            try:
                ep = torch.export.export(
                    gm, *_call_args(info), dynamic_shapes=info.dynamic_shapes, strict=False
                )
                torch.export.save(ep, directory / "input.pt2")
            except Exception as error:  # noqa: BLE001 - the reproducer is best effort
                (directory / "input.pt2.error.txt").write_text(str(error))


def _carry_examples(
    examples: Sequence[torch.Tensor] | None,
    before: torch.fx.GraphModule,
    after: torch.fx.GraphModule,
) -> Sequence[torch.Tensor] | None:
    """The example inputs in the ids of ``after`` when a pass changed the vocabulary."""
    old, new = vocab.vocab_map(before), vocab.vocab_map(after)
    if examples is None or vocab.same_vocab(old, new):
        return examples
    info = trace_info(after)
    return vocab.translate_inputs(examples, info.input_names if info else None, old, new)


def _call_args(info: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    args, kwargs = info.call_inputs(info.example_inputs)
    return args, kwargs


def _example_inputs(gm: torch.fx.GraphModule, ctx: PassContext) -> tuple[torch.Tensor, ...] | None:
    if not ctx.measure_error:
        return None
    if ctx.example_inputs is not None:
        return tuple(ctx.example_inputs)
    info = trace_info(gm)
    return info.example_inputs if info is not None else None


def refuse(message: str, node: torch.fx.Node | None = None) -> PreconditionError:
    """The error a pass raises when a precondition does not hold (``raise refuse(...)``)."""
    return PreconditionError(message, node)
