"""``ln-freeze``: replace normalizers by calibrated constants (approximate), optionally recover.

Math (Baroni et al. 2025, "Transformers Don't Need LayerNorm at Inference Time"; Heimersheim
2024). A LayerNorm ``gamma * (x - mean(x)) / s(x) + beta`` with ``s(x) = sqrt(var(x) + eps)``
becomes the affine map ``(x - mean(x)) * (gamma / sigma) + beta`` where ``sigma`` is a constant:
the per-token ``s(x)`` aggregated over calibration tokens (their mean, as the paper's FakeLN,
or the median). An RMSNorm becomes ``x * (gamma / sigma)`` with ``s(x) = sqrt(mean(x^2) + eps)``.
The frozen norm is an affine map that ``fold-ln`` folds into the linear maps reading it
(centering included), leaving an LN-free graph: ``ln-freeze,fold-ln``.

This changes the model: tokens whose scale differs from the calibrated constant (the first
position, rare high-norm inputs) are mis-scaled by that factor. The paper needs fine-tuning after
each removal to stay close (+0.025 CE on GPT-2 XL after it; "severe" without). So the pass

* measures: perplexity on the evaluation data before, after freezing and after recovery, and
  each norm's own harm when budgets ask for it;
* **budget mode** (``budget="ppl+5%"``): measures each norm's harm once (freezing it alone),
  then freezes norms least harmful first while the predicted cumulative loss (harms add in
  log-perplexity) stays within the budget, confirms the result with one evaluation and backs off
  by bisection if it does not hold: O(n) evaluations;
* **recovery** (``recover_steps=N``): fine-tunes the frozen graph with :func:`rewriter.train` on
  the calibration text (all floating parameters, as the paper); ``aux_weight`` adds the paper's
  idea of an auxiliary loss, here pulling each frozen norm's per-token scale towards its constant.

Selection: ``norms`` (regex, full match on the norm's source module), ``layers`` (block range such
as ``0-3``, by the first number in the module path; the final norm has none). Preconditions:
calibration data in the context (``PassContext(calibration=...)`` / ``--calib``); evaluation data
for budgets. A selection that matches no norm is an error naming the norms there are.

A norm module applied more than once (a shared layer; the prefix and last-token halves of a
``rewriter.deploy`` step graph) is one decision: frozen everywhere or nowhere, with one constant
calibrated over the inputs of all its applications.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from typing import Any, ClassVar, Literal

import torch
import torch.fx

from rewriter.analysis.canonicalize import canonicalize
from rewriter.analysis.folding import NormUnit, norm_module_key, norm_units
from rewriter.context import PassContext, progress
from rewriter.errors import RewriterError
from rewriter.ir.graph import copy_graph_module, feed, module_path, weight_name_for, with_outputs
from rewriter.ir.store import weights as rewriter_store
from rewriter.pipeline import Pass, PassResult, option
from rewriter.pipeline.metrics import perplexity_of_ids
from rewriter.pipeline.spec import Budget
from rewriter.pipeline.train import causal_lm_loss, logits_of, train
from rewriter.rewrite.driver import Rewriter

__all__ = ["FreezeNormPass"]

aten = torch.ops.aten


@dataclasses.dataclass(frozen=True)
class FreezeNormPass(Pass):
    """Replace LayerNorm / RMSNorm normalizers by calibrated constants; budgets and recovery."""

    name: ClassVar[str] = "ln-freeze"
    exact: ClassVar[bool] = False

    norms: str = option("all", "Which norms: 'all', or a regex (full match) on the source module.")
    layers: str = option(
        "", "Only norms of these blocks, e.g. '0-3' (first number in the module path)."
    )
    aggregate: Literal["mean", "median"] = option(
        "mean", "How per-token normalizers become one constant (the paper's FakeLN: mean)."
    )
    calibration_batches: int = option(8, "Calibration batches used to estimate the constants.")
    budget: Budget | None = option(
        None, "Freeze least harmful norms first while this holds ('ppl+5%')."
    )
    recover_steps: int = option(
        0, "Fine-tune the frozen graph this many steps on the calibration text."
    )
    recover_lr: float = option(3e-4, "Learning rate of the recovery fine-tuning.")
    aux_weight: float = option(
        0.0, "Weight of the auxiliary loss pulling per-token scales to the constants."
    )
    per_norm: bool = option(
        True, "With evaluation data, report each norm's perplexity frozen alone (1 eval each)."
    )
    recover_loss: Literal["kd", "lm"] = option(
        "kd",
        "Recovery objective: 'kd' matches the unfrozen graph's next-token distribution, "
        "'lm' is next-token cross-entropy on the calibration text.",
    )

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        canonicalize(gm)  # written-out norms (Llama's RMSNorm) become single ops
        units = self._select(gm)
        if not units:
            return PassResult(
                gm, changed=False, notes=["no LayerNorm or RMSNorm left: nothing to freeze"]
            )
        batches = ctx.batches("calibration", limit=self.calibration_batches, pass_name=self.name)
        if self.budget is not None and ctx.evaluation is None and self.budget.metric != "err":
            raise RewriterError(
                f"pass '{self.name}' with budget={self.budget} needs evaluation data: give "
                "PassContext(evaluation=...) (or --eval-text)"
            )
        sigmas = _calibrate(gm, units, batches, self.aggregate, ctx.progress)
        judge = _Judge(gm, ctx, batches)
        metrics: dict[str, Any] = {}
        notes: list[str] = []
        # One decision per norm module: a module applied more than once (a shared layer, the
        # two halves of a deploy step graph) is frozen everywhere or nowhere, with one constant.
        members = _by_module(units)
        units = [group[0] for group in members.values()]
        chosen = units
        if self.budget is not None:
            chosen, harms, evaluations = self._within_budget(gm, units, sigmas, judge, members)
            metrics["evaluations"] = evaluations
            metrics["per_norm"] = {
                _label(u): {"sigma": sigmas[u.norm], "harm": harms.get(u.norm)} for u in units
            }
            notes.append(f"budget {self.budget}: froze {len(chosen)} of {len(units)} norms")
        else:
            metrics["per_norm"] = {_label(u): {"sigma": sigmas[u.norm]} for u in units}
            if self.per_norm and judge.ids is not None and len(units) > 1:
                for unit in progress(
                    units, total=len(units), description="ln-freeze: each norm", enabled=judge.show
                ):
                    alone = _frozen_copy(gm, members[norm_module_key(unit)], sigmas, self.name)
                    metrics["per_norm"][_label(unit)]["ppl_frozen_alone"] = judge.metric(
                        "ppl", alone
                    )
        if not chosen:
            notes.append("no norm fits the budget: nothing frozen")
            metrics.update(judge.report("before", gm))
            return PassResult(gm, changed=False, notes=notes, metrics=metrics)
        metrics.update(judge.report("before", gm))
        teacher = (
            copy_graph_module(gm) if self.recover_steps and self.recover_loss == "kd" else None
        )
        _freeze(
            gm, [u for head in chosen for u in members[norm_module_key(head)]], sigmas, self.name
        )
        metrics.update(judge.report("frozen", gm))
        metrics["frozen"] = [_label(u) for u in chosen]
        if self.recover_steps > 0:
            report = self._recover(gm, teacher, ctx)
            metrics["recovery_loss_first"], metrics["recovery_loss_last"] = (
                report.first,
                report.last,
            )
            metrics.update(judge.report("recovered", gm))
        stats = {"freeze-norm": len(chosen)}
        return PassResult(gm, changed=True, stats=stats, notes=notes, metrics=metrics)

    # -- selection --
    def _select(self, gm: torch.fx.GraphModule) -> list[NormUnit]:
        units = [u for u in norm_units(gm, frozen=False) if u.kind in ("layer", "rms")]
        if not units:
            return []
        chosen = units
        if self.norms != "all":
            pattern = re.compile(self.norms)
            chosen = [u for u in chosen if pattern.fullmatch(module_path(u.norm) or "")]
        if self.layers:
            low, high = _parse_range(self.layers)
            chosen = [u for u in chosen if (i := _layer_index(u)) is not None and low <= i <= high]
        if not chosen:
            names = ", ".join(sorted({module_path(u.norm) or u.norm.name for u in units}))
            raise RewriterError(
                f"pass '{self.name}': norms={self.norms!r} layers={self.layers!r} select no norm "
                f"(the graph's norms: {names})"
            )
        return chosen

    # -- budget --
    def _within_budget(
        self,
        gm: torch.fx.GraphModule,
        units: list[NormUnit],
        sigmas: dict[torch.fx.Node, float],
        judge: _Judge,
        members: dict[tuple[object, ...], list[NormUnit]],
    ) -> tuple[list[NormUnit], dict[torch.fx.Node, float], int]:
        """Least harmful first; harms add in log-perplexity (loss), are confirmed, then bisected."""
        assert self.budget is not None
        metric = self.budget.metric
        baseline = judge.metric(metric, gm)
        limit = _additive(metric, self.budget.limit(baseline))
        start = _additive(metric, baseline)
        harms: dict[torch.fx.Node, float] = {}
        steps = progress(
            units, total=len(units), description="ln-freeze: harm per norm", enabled=judge.show
        )
        for unit in steps:
            harms[unit.norm] = (
                _additive(
                    metric,
                    judge.metric(
                        metric, _frozen_copy(gm, members[norm_module_key(unit)], sigmas, self.name)
                    ),
                )
                - start
            )
        order = sorted(units, key=lambda u: harms[u.norm])
        count, predicted = 0, start
        while count < len(order) and predicted + harms[order[count].norm] <= limit:
            predicted += harms[order[count].norm]
            count += 1
        evaluations = len(units) + 1
        low, high = 0, count  # the prediction is confirmed, or bisected down until it holds
        while high > low:
            evaluations += 1
            if (
                _additive(
                    metric,
                    judge.metric(
                        metric,
                        _frozen_copy(
                            gm,
                            [u for h in order[:high] for u in members[norm_module_key(h)]],
                            sigmas,
                            self.name,
                        ),
                    ),
                )
                <= limit
            ):
                break
            high = low + (high - low) // 2
        return order[:high], {n: h for n, h in harms.items()}, evaluations

    # -- recovery --
    def _recover(
        self, gm: torch.fx.GraphModule, teacher: torch.fx.GraphModule | None, ctx: PassContext
    ) -> Any:
        batches = ctx.batches("calibration", pass_name=self.name)
        params = [n for n, p in gm.named_parameters() if p.is_floating_point()]
        objective = _objective(teacher)
        if self.aux_weight <= 0:
            return train(
                gm,
                batches,
                steps=self.recover_steps,
                lr=self.recover_lr,
                params=params,
                loss=lambda output, batch: objective(logits_of(output), batch),
                seed=ctx.seed,
                warmup=_warmup(self.recover_steps),
                schedule="cosine",
                show_progress=ctx.progress,
                description="ln-freeze: recovery",
            )
        return _train_with_aux(gm, batches, self, ctx, params, objective)


# --- calibration ---------------------------------------------------------------------------------


def _normalizer(unit: NormUnit, x: torch.Tensor) -> torch.Tensor:
    """Per-token normalizer of the unit's input, in float64: sqrt(var + eps), or the RMS."""
    x = x.detach().to(torch.float64)
    eps = unit.eps if unit.eps is not None else torch.finfo(torch.float32).eps
    moment = x.var(-1, unbiased=False) if unit.kind == "layer" else x.pow(2).mean(-1)
    return (moment + eps).sqrt().reshape(-1)


def _calibrate(
    gm: torch.fx.GraphModule,
    units: list[NormUnit],
    batches: list[torch.Tensor],
    aggregate: str,
    show: bool,
) -> dict[torch.fx.Node, float]:
    probe = with_outputs(gm, [u.input for u in units])
    samples: dict[torch.fx.Node, list[torch.Tensor]] = {u.norm: [] for u in units}
    with torch.no_grad():
        for batch in progress(
            batches, total=len(batches), description="ln-freeze: calibration", enabled=show
        ):
            for unit, value in zip(units, feed(probe, batch)):
                samples[unit.norm].append(_normalizer(unit, value))
    sigmas = {}
    for group in _by_module(units).values():  # one constant per module, over all its inputs
        values = torch.cat([v for unit in group for v in samples[unit.norm]])
        sigma = float(values.mean() if aggregate == "mean" else values.median())
        sigmas.update({unit.norm: sigma for unit in group})
    return sigmas


def _by_module(units: list[NormUnit]) -> dict[tuple[object, ...], list[NormUnit]]:
    """Norm units grouped by the module they apply (in graph order)."""
    groups: dict[tuple[object, ...], list[NormUnit]] = {}
    for unit in units:
        groups.setdefault(norm_module_key(unit), []).append(unit)
    return groups


# --- the rewrite ---------------------------------------------------------------------------------


def _freeze(
    gm: torch.fx.GraphModule,
    units: list[NormUnit],
    sigmas: dict[torch.fx.Node, float],
    pass_name: str,
) -> None:
    rw = Rewriter(gm, pass_name=pass_name)
    scales: dict[tuple[object, ...], torch.fx.Node] = {}  # one stored scale per module
    for unit in units:
        _freeze_one(rw, unit, sigmas[unit.norm], scales)
    rw.finish(prune_weights=True)


def _freeze_one(
    rw: Rewriter, unit: NormUnit, sigma: float, scales: dict[tuple[object, ...], torch.fx.Node]
) -> None:
    norm, x = unit.norm, unit.input
    dtype = norm.meta["val"].dtype
    scale = scales.get(norm_module_key(unit))
    if scale is None:
        if unit.gamma is not None:
            gamma = rw.store.read(str(unit.gamma.target)).to(torch.float64)
        else:
            gamma = torch.ones(unit.width, dtype=torch.float64)
        scale = rw.add_weight(
            weight_name_for(norm, "frozen_scale"), (gamma / sigma).to(dtype), rule="freeze"
        )
        scales[norm_module_key(unit)] = scale
    if unit.kind == "layer":
        mean = rw.call(aten.mean.dim, (x, [-1], True), before=norm, rule="freeze", meta_from=norm)
        x = rw.call(aten.sub.Tensor, (x, mean), before=norm, rule="freeze", meta_from=norm)
    value = rw.call(aten.mul.Tensor, (x, scale), before=norm, rule="freeze", meta_from=norm)
    if unit.kind == "layer" and unit.beta is not None:
        value = rw.call(
            aten.add.Tensor, (value, unit.beta), before=norm, rule="freeze", meta_from=norm
        )
    rw.replace(norm, value, rule="freeze")  # an RMSNorm's beta add now reads the scaled value


# --- measuring -----------------------------------------------------------------------------------


class _Judge:
    """Perplexity (evaluation data) and output error (calibration data) of candidate graphs."""

    def __init__(
        self, reference: torch.fx.GraphModule, ctx: PassContext, batches: list[torch.Tensor]
    ) -> None:
        self.ids = ctx.evaluation_ids() if ctx.evaluation is not None else None
        self.show = ctx.progress
        self.batch = batches[0]
        with torch.no_grad():
            self.reference_logits = logits_of(feed(reference, self.batch)).float()

    def metric(self, name: str, gm: torch.fx.GraphModule) -> float:
        if name == "err":
            with torch.no_grad():
                return float(
                    (logits_of(feed(gm, self.batch)).float() - self.reference_logits).abs().max()
                )
        assert self.ids is not None
        ppl = perplexity_of_ids(gm, self.ids)
        return ppl if name == "ppl" else math.log(ppl)

    def report(self, stage: str, gm: torch.fx.GraphModule) -> dict[str, float]:
        if self.ids is None:
            return {}
        return {f"ppl_{stage}": perplexity_of_ids(gm, self.ids)}


def _additive(metric: str, value: float) -> float:
    """The metric on a scale where the harms of several norms add: log-perplexity for ``ppl``."""
    return math.log(value) if metric == "ppl" else value


def _frozen_copy(
    gm: torch.fx.GraphModule,
    units: list[NormUnit],
    sigmas: dict[torch.fx.Node, float],
    pass_name: str,
) -> torch.fx.GraphModule:
    """A copy of ``gm`` with ``units`` frozen (nodes are found by name: copies keep names)."""
    trial = copy_graph_module(gm)
    by_name = {u.norm.name: u for u in norm_units(trial, frozen=False)}
    chosen = [by_name[u.norm.name] for u in units]
    _freeze(trial, chosen, {by_name[u.norm.name].norm: sigmas[u.norm] for u in units}, pass_name)
    return trial


# --- recovery objectives -------------------------------------------------------------------------


def _objective(
    teacher: torch.fx.GraphModule | None,
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Next-token cross-entropy, or (with a teacher) the KL divergence from the teacher's
    next-token distribution, averaged over tokens.

    Distillation keeps the recovered model close to the original everywhere instead of fitting
    the calibration text: with a few thousand tokens of it, cross-entropy fine-tuning measurably
    drifts a trained model (README, ``bench_ln_freeze``).
    """
    if teacher is None:
        return lambda logits, batch: causal_lm_loss(logits, batch)

    def kd(logits: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target = torch.log_softmax(logits_of(feed(teacher, batch)).float(), -1)
        student = torch.log_softmax(logits.float(), -1)
        width = student.shape[-1]
        return torch.nn.functional.kl_div(
            student.reshape(-1, width),
            target.reshape(-1, width),
            log_target=True,
            reduction="batchmean",
        )

    return kd


# --- recovery with the auxiliary loss ------------------------------------------------------------


def _train_with_aux(
    gm: torch.fx.GraphModule,
    batches: list[torch.Tensor],
    step: FreezeNormPass,
    ctx: PassContext,
    params: list[str],
    objective: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> Any:
    """Recovery with an auxiliary loss: the spread of each frozen norm's per-token scale.

    A frozen norm fits best when every token has the same scale; the loss ``mean((s_t / mean_t
    s_t - 1)^2)`` over tokens (``s_t`` the RMS of the frozen norm's input) pulls them together,
    in the spirit of the paper's auxiliary loss on the scale before the final norm.
    """
    frozen_inputs = [
        n.args[0]
        for n in gm.graph.find_nodes(op="call_function", target=aten.mul.Tensor)
        if isinstance(n.args[1], torch.fx.Node) and str(n.args[1].target).endswith("frozen_scale")
    ]
    output = next(iter(gm.graph.find_nodes(op="output")))
    probe = with_outputs(gm, [_logits_node(output), *frozen_inputs])

    def loss(outputs: Any, batch: torch.Tensor) -> torch.Tensor:
        logits, *inputs = outputs
        spreads = []
        for value in inputs:
            scale = value.float().pow(2).mean(-1).sqrt()
            spreads.append((scale / scale.mean() - 1).pow(2).mean())
        return objective(logits, batch) + step.aux_weight * torch.stack(spreads).mean()

    report = train(
        probe,
        batches,
        steps=step.recover_steps,
        lr=step.recover_lr,
        params=params,
        loss=loss,
        seed=ctx.seed,
        warmup=_warmup(step.recover_steps),
        schedule="cosine",
        show_progress=ctx.progress,
        description="ln-freeze: recovery (aux)",
    )
    store = rewriter_store(gm)
    for name in params:  # the probe trained private copies of the weights: give them to the graph
        store.write(name, probe.get_parameter(name).detach(), note="recovered")
    return report


def _logits_node(output: torch.fx.Node) -> torch.fx.Node:
    leaves = [
        a for a in torch.utils._pytree.tree_leaves(output.args[0]) if isinstance(a, torch.fx.Node)
    ]
    return leaves[0]


# --- helpers -------------------------------------------------------------------------------------


def _warmup(steps: int) -> int:
    """Recovery warms up over a tenth of its steps, then decays on a cosine."""
    return max(1, steps // 10)


def _label(unit: NormUnit) -> str:
    return module_path(unit.norm) or unit.norm.name


def _layer_index(unit: NormUnit) -> int | None:
    path = module_path(unit.norm) or ""
    match = re.search(r"(?:^|\.)(\d+)(?:\.|$)", path)
    return int(match.group(1)) if match else None


def _parse_range(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", text)
    if not match:
        raise RewriterError(f"layers={text!r} is not a block range such as '3' or '0-5'")
    low = int(match.group(1))
    return low, int(match.group(2) or low)
