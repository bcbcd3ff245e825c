"""``l1quant``: L1 normalization and ShiftQuant-style power-of-two group quantization (approximate).

Two rewrites in the spirit of Guo et al. 2024 ("Towards Accurate and Efficient Sub-8-Bit Integer
Training"), whose ShiftQuant quantizes *gradients* during training and whose exact equations
were not available to us. This pass is an inference-time weight quantizer built on the same two
ideas (power-of-two scales, L1 normalization); call it ShiftQuant-style.

**L1 normalization** (``norm=l1``). A LayerNorm divides ``d = x - mean(x)`` by the standard
deviation ``sigma = sqrt(mean d^2 + eps)``; an RMSNorm divides ``x`` by its RMS. Both become
``rewriter::l1_norm``, which divides by ``c * mean|d| + sqrt(eps)`` (centered for LayerNorm,
``d = x`` for RMSNorm), keeping gamma and beta. No square and no square root: an integer datapath
needs only sums, absolute values and one reciprocal per row. For Gaussian rows ``E|d| = sigma
sqrt(2/pi)``, so ``c = sqrt(pi/2)`` (``factor=gaussian``) matches LayerNorm on average (L1BN,
Wu et al. 2018). Transformer residual streams are heavy-tailed (outlier channels), where
``c mean|d|`` underestimates ``sigma``; ``factor=calibrated`` fits ``c`` per norm on calibration
tokens. With ``r_t = sigma_t / mean|d_t|`` per token, the normalized outputs differ by the factor
``1 - r_t / c`` relative to their size, and ``sum_t (1 - r_t / c)^2`` is least at

    c = sum_t r_t^2 / sum_t r_t,

which is what the pass uses. ``sqrt(eps)`` keeps an all-zero row's output equal to LayerNorm's.

**ShiftQuant-style weights** (``bits``, ``group``). Each linear map's weight ``W`` (N x K, every
form: ``nn.Linear``, GPT-2 ``Conv1D``, functional) is cut into groups of ``group`` inputs. A group
``w`` gets one scale ``2^e`` and integers ``q = clamp(round(w / 2^e), -Q, Q)``, ``Q = 2^(b-1) - 1``
(symmetric, no zero point). Any power of two ``2^e0 >= max|w| / Q`` avoids clipping; the smallest
such ``e0`` is where the float absmax scale ``max|w| / Q`` would round up to, which wastes up to
one bit of resolution. So the pass tries ``e0, e0 - 1, ..., e0 - 4`` (smaller scales clip the
group's largest values but resolve the rest more finely) and keeps the one with the least squared
error ``||w - 2^e q||^2``: the constraint to powers of two is paid for with a search that float
absmax round-to-nearest does not do, and on the embedded model the result beats it at every bit
width (README). Storage: ``b``-bit codes packed into bytes plus one int8 exponent per group
(format: :mod:`rewriter.ops.quant`); ``rewriter::shiftquant_linear`` dequantizes exactly.
Multiplying by ``2^e`` is a shift in fixed point: the reason this format suits FPGAs.

**Activations** (``act_bits``): each token is rounded to ``act_bits`` bits with its own
power-of-two scale (the smallest that does not clip), inside the op.

**Budget mode** (``budget="ppl+5%"``): every selected layer starts at ``bits``. Each layer's harm
is measured once (quantizing it alone; harms add in log-perplexity); layers are promoted to
``budget_bits``, most harmful first, until the predicted total fits (a promoted layer's harm is
predicted to shrink by 4x per added bit, the quantization noise power), and the prediction is
confirmed with one evaluation; if it does not hold, more layers are promoted by bisection. That is
``layers + 2 + log2(layers)`` evaluations at most. The report has the bit map.

Selection: ``layers`` (regex, full match on the linear map's source module); the LM head (a map
whose output is a graph output, or that shares its weight with an embedding) is skipped unless
``head=true``. Report per layer: bits, group, relative weight error, relative output error on a
calibration batch, bytes before and after; whole model: perplexity before, with the L1 norms
alone, and after (with evaluation data). On a weightless graph with a checkpoint attached
(streaming, :mod:`rewriter.checkpoint`) the weights are quantized one at a time and nothing that
runs the graph is measured: the report has the weight errors and bytes only.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, ClassVar, Literal

import torch
import torch.fx

from rewriter.analysis.canonicalize import canonicalize
from rewriter.analysis.folding import NormUnit, norm_units
from rewriter.context import PassContext, progress
from rewriter.errors import RewriterError
from rewriter.ir.graph import (
    LinearMap,
    as_linear,
    copy_graph_module,
    feed,
    is_lm_head,
    is_weightless,
    linear_maps,
    module_path,
    weight_name_for,
    with_outputs,
)
from rewriter.ir.store import weights
from rewriter.ops.norms import GAUSSIAN_FACTOR
from rewriter.ops.quant import check_format, quantize_weight, shiftquant_linear_reference
from rewriter.pipeline import Pass, PassResult, option
from rewriter.pipeline.metrics import perplexity_of_ids
from rewriter.pipeline.spec import Budget
from rewriter.pipeline.train import logits_of
from rewriter.rewrite.driver import Rewriter

__all__ = ["L1QuantPass", "is_lm_head", "round_to_nearest_baseline"]

aten = torch.ops.aten
L1_NORM = torch.ops.rewriter.l1_norm.default
SHIFTQUANT = torch.ops.rewriter.shiftquant_linear.default


@dataclasses.dataclass(frozen=True)
class L1QuantPass(Pass):
    """L1 normalization and ShiftQuant-style power-of-two group quantization (2..8 bits)."""

    name: ClassVar[str] = "l1quant"
    exact: ClassVar[bool] = False

    norm: Literal["l1", "keep"] = option(
        "l1", "'l1': LayerNorm / RMSNorm -> rewriter::l1_norm; 'keep': leave norms."
    )
    factor: Literal["gaussian", "calibrated"] = option(
        "gaussian", "The L1 norm's constant: sqrt(pi/2), or fitted per norm on calibration data."
    )
    bits: int = option(4, "Weight bits, 2..8 (0: leave the weights in floating point).")
    group: int = option(64, "Inputs per scale group (a power of two; 32, 64, 128 usual).")
    act_bits: int = option(0, "Quantize each token's activations to this many bits (0: off).")
    layers: str = option(".*", "Linear maps to quantize: regex, full match on the source module.")
    head: bool = option(False, "Quantize the LM head too.")
    budget: Budget | None = option(
        None, "Raise the bits of the most sensitive layers until this holds ('ppl+5%')."
    )
    budget_bits: int = option(8, "Bits a layer is raised to in budget mode.")
    calibration_batches: int = option(4, "Calibration batches for factor=calibrated.")

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        self._check_options()
        # written-out norms (Llama's RMSNorm traces as pow / mean / rsqrt) become single ops first
        canonical = canonicalize(gm).changed if self.norm == "l1" else False
        norms = [u for u in norm_units(gm, frozen=False) if u.kind in ("layer", "rms")]
        norms = norms if self.norm == "l1" else []
        targets = self._select_linears(gm) if self.bits else []
        if not norms and not targets:
            return PassResult(
                gm, changed=canonical, notes=["no norm or linear map to rewrite: nothing to do"]
            )
        if self.budget is not None and not targets:
            raise RewriterError(
                f"pass '{self.name}': budget={self.budget} needs weights to quantize"
            )
        judge = _Judge(gm, ctx, self.name, needs_ppl=self.budget is not None)
        metrics: dict[str, Any] = judge.perplexity("before", gm)
        notes: list[str] = []
        stats: dict[str, int] = {}

        # 1. norms -> rewriter::l1_norm
        if norms:
            factors = self._factors(gm, norms, ctx)
            _replace_norms(gm, norms, factors, self.name)
            stats["l1-norm"] = len(norms)
            metrics["norms"] = {_norm_label(u): {"factor": factors[u.norm.name]} for u in norms}
            metrics.update(judge.perplexity("l1_norm", gm))
            metrics["l1_norm_max_abs_err"] = judge.logits_error(gm)
            targets = self._select_linears(gm) if self.bits else []

        # 2. weights -> rewriter::shiftquant_linear
        if targets:
            cache = _QuantCache(self.group, keep=self.budget is not None)
            bit_map = {_linear_label(t): self.bits for t in targets}
            if self.budget is not None:
                bit_map, budget_metrics = self._within_budget(gm, targets, bit_map, judge, cache)
                metrics.update(budget_metrics)
                notes.append(budget_metrics["budget_note"])
            inputs = judge.linear_inputs(gm, targets)
            per_layer = _quantize(gm, targets, bit_map, self.act_bits, cache, inputs, self.name)
            stats["shiftquant-linear"] = len(targets)
            metrics["layers"] = per_layer
            metrics["bit_map"] = bit_map
            before = sum(v["bytes_before"] for v in per_layer.values())
            after = sum(v["bytes_after"] for v in per_layer.values())
            metrics["weight_bytes_before"], metrics["weight_bytes_after"] = before, after
            metrics["weight_bytes_ratio"] = after / before
            uses = f" ({len(targets)} applications)" if len(targets) != len(bit_map) else ""
            notes.append(
                f"{len(bit_map)} linear maps{uses}: {_bits_summary(bit_map)}, group "
                f"{self.group}: weights {before / 2**20:.2f} -> {after / 2**20:.2f} MiB"
            )
        metrics.update(judge.perplexity("after", gm))
        return PassResult(gm, changed=True, stats=stats, notes=notes, metrics=metrics)

    # -- options and selection --
    def _check_options(self) -> None:
        for label, bits, low in (("bits", self.bits, 0), ("budget_bits", self.budget_bits, 2)):
            if (bits != 0 and not 2 <= bits <= 8) or bits < low:
                raise RewriterError(f"pass '{self.name}': {label}={bits} is not in 2..8")
        if self.bits:
            try:
                check_format(self.bits, self.group)
            except ValueError as error:
                raise RewriterError(f"pass '{self.name}': {error}") from None
        if self.act_bits and not 2 <= self.act_bits <= 8:
            raise RewriterError(f"pass '{self.name}': act_bits={self.act_bits} is not in 2..8")

    def _select_linears(self, gm: torch.fx.GraphModule) -> list[LinearMap]:
        pattern = re.compile(self.layers)
        maps = linear_maps(gm)
        chosen = [
            lin
            for lin in maps
            if pattern.fullmatch(_linear_label(lin)) and (self.head or not is_lm_head(lin))
        ]
        if not chosen and maps and self.layers != ".*":
            names = ", ".join(_linear_label(lin) for lin in maps)
            raise RewriterError(
                f"pass '{self.name}': layers={self.layers!r} selects no linear map (the graph's "
                f"linear maps: {names})"
            )
        return chosen

    # -- L1 norm constants --
    def _factors(
        self, gm: torch.fx.GraphModule, units: list[NormUnit], ctx: PassContext
    ) -> dict[str, float]:
        if self.factor == "gaussian":
            return {u.norm.name: GAUSSIAN_FACTOR for u in units}
        batches = ctx.batches("calibration", limit=self.calibration_batches, pass_name=self.name)
        probe = with_outputs(gm, [u.input for u in units])
        sums = {u.norm.name: [0.0, 0.0] for u in units}
        with torch.no_grad():
            for batch in progress(
                batches,
                total=len(batches),
                description="l1quant: calibration",
                enabled=ctx.progress,
            ):
                for unit, value in zip(units, feed(probe, batch)):
                    ratio = _sigma_over_mad(unit, value)
                    sums[unit.norm.name][0] += float(ratio.pow(2).sum())
                    sums[unit.norm.name][1] += float(ratio.sum())
        return {name: square / linear for name, (square, linear) in sums.items()}

    # -- budget --
    def _within_budget(
        self,
        gm: torch.fx.GraphModule,
        targets: list[LinearMap],
        bit_map: dict[str, int],
        judge: _Judge,
        cache: _QuantCache,
    ) -> tuple[dict[str, int], dict[str, Any]]:
        assert self.budget is not None
        if self.budget.metric != "ppl":
            raise RewriterError(f"pass '{self.name}': budgets are on perplexity ('ppl+5%')")
        original = judge.ppl_of_input
        limit = math.log(self.budget.limit(original))
        start = math.log(judge.ppl(gm))  # with the L1 norms, if any: their cost is fixed
        labels = [_linear_label(t) for t in targets]
        harms: dict[str, float] = {}
        for label in progress(
            labels, total=len(labels), description="l1quant: harm per layer", enabled=judge.show
        ):
            trial = _quantized_copy(gm, {label: self.bits}, cache)
            harms[label] = math.log(judge.ppl(trial)) - start
        evaluations = len(labels) + 2  # and the two baselines
        shrink = 4.0 ** (self.budget_bits - self.bits)
        order = sorted(labels, key=lambda name: -harms[name])
        predicted = start + sum(harms.values())
        count = 0
        while count < len(order) and predicted > limit:
            predicted -= harms[order[count]] * (1 - 1 / shrink)
            count += 1

        def bits_for(promoted: int) -> dict[str, int]:
            raised = set(order[:promoted])
            return {k: (self.budget_bits if k in raised else v) for k, v in bit_map.items()}

        # Confirm the prediction; if it does not hold, find the fewest promotions that do
        # (bisection between the prediction and promoting every layer).
        evaluations += 1
        met, chosen = self._holds(gm, bits_for(count), cache, judge, limit), count
        if not met and count < len(order):
            evaluations += 1
            if self._holds(gm, bits_for(len(order)), cache, judge, limit):
                met, low, high = True, count, len(order)  # fails at low, holds at high
                while high - low > 1:
                    middle = (low + high) // 2
                    evaluations += 1
                    if self._holds(gm, bits_for(middle), cache, judge, limit):
                        high = middle
                    else:
                        low = middle
                chosen = high
        final = bits_for(chosen if met else len(order))
        promoted = [k for k in order if final[k] != bit_map[k]]
        note = (
            f"budget {self.budget}: {len(promoted)} of {len(order)} layers raised to "
            f"{self.budget_bits} bits"
            if met
            else f"budget {self.budget} not met even with every layer at {self.budget_bits} bits"
        )
        return final, {
            "budget_met": met,
            "budget_note": note,
            "promoted": promoted,
            "harms": harms,
            "evaluations": evaluations,
        }

    @staticmethod
    def _holds(
        gm: torch.fx.GraphModule,
        bit_map: dict[str, int],
        cache: _QuantCache,
        judge: _Judge,
        limit: float,
    ) -> bool:
        return math.log(judge.ppl(_quantized_copy(gm, bit_map, cache))) <= limit


# --- L1 norms ------------------------------------------------------------------------------------


def _sigma_over_mad(unit: NormUnit, x: torch.Tensor) -> torch.Tensor:
    """Per token: the norm's own divisor over the mean absolute deviation (float64)."""
    xs = x.detach().to(torch.float64).reshape(-1, x.shape[-1])
    eps = unit.eps if unit.eps is not None else torch.finfo(torch.float32).eps
    d = xs - xs.mean(-1, keepdim=True) if unit.kind == "layer" else xs
    sigma = (d.pow(2).mean(-1) + eps).sqrt()
    mad = d.abs().mean(-1)
    keep = mad > 0
    return sigma[keep] / mad[keep]


def _replace_norms(
    gm: torch.fx.GraphModule, units: list[NormUnit], factors: dict[str, float], pass_name: str
) -> None:
    rw = Rewriter(gm, pass_name=pass_name)
    for unit in units:
        eps = unit.eps if unit.eps is not None else torch.finfo(unit.norm.meta["val"].dtype).eps
        args = (
            unit.input,
            unit.gamma,
            unit.beta,
            math.sqrt(eps),
            unit.kind == "layer",
            factors[unit.norm.name],
        )
        node = rw.call(L1_NORM, args, before=unit.output, rule="l1-norm", meta_from=unit.norm)
        rw.replace(unit.output, node, rule="l1-norm")
    rw.finish(prune_weights=True)


# --- quantizing ----------------------------------------------------------------------------------


class _QuantCache:
    """Packed weights per (layer, bits): budget trials and the final rewrite quantize once.
    Without a budget nothing is kept (a streamed checkpoint's codes go to disk, not here)."""

    def __init__(self, group: int, keep: bool = True) -> None:
        self.group = group
        self.keep = keep
        self.entries: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self.stats: dict[tuple[str, int], dict[str, float]] = {}  # errors: small, always kept

    def get(self, label: str, weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
        key = (label, bits)
        if key in self.entries:
            return self.entries[key]
        self.stats[key] = {}
        value = quantize_weight(weight, bits, self.group, stats=self.stats[key])
        if self.keep:
            self.entries[key] = value
        return value


def _out_in(gm: torch.fx.GraphModule, lin: LinearMap) -> torch.Tensor:
    weight = weights(gm).read(lin.weight_name).detach()
    return weight if lin.layout == "out_in" else weight.t()


def _quantize(
    gm: torch.fx.GraphModule,
    targets: list[LinearMap],
    bit_map: dict[str, int],
    act_bits: int,
    cache: _QuantCache,
    inputs: dict[str, torch.Tensor],
    pass_name: str,
) -> dict[str, dict[str, Any]]:
    rw = Rewriter(gm, pass_name=pass_name)
    report: dict[str, dict[str, Any]] = {}
    for lin in targets:
        label = _linear_label(lin)
        bits = bit_map[label]
        weight = _out_in(gm, lin)
        packed, exponents = cache.get(label, weight, bits)
        bias = None if lin.bias_name is None else weights(gm).read(lin.bias_name).detach()
        report[label] = _layer_report(
            weight,
            packed,
            exponents,
            bias,
            bits,
            cache.group,
            act_bits,
            inputs.get(label),
            cache.stats[(label, bits)],
        )
        packed_node = rw.add_weight(weight_name_for(lin.node, "qweight"), packed, rule="quantize")
        exponent_node = rw.add_weight(
            weight_name_for(lin.node, "qexponent"), exponents, rule="quantize"
        )
        args = (
            lin.input,
            packed_node,
            exponent_node,
            lin.bias,
            bits,
            cache.group,
            lin.in_features,
            act_bits,
        )
        node = rw.call(SHIFTQUANT, args, before=lin.output, rule="quantize", meta_from=lin.node)
        rw.replace(lin.output, node, rule="quantize")
    rw.finish(prune_weights=True)
    return report


def _quantized_copy(
    gm: torch.fx.GraphModule, bit_map: dict[str, int], cache: _QuantCache
) -> torch.fx.GraphModule:
    """A copy of ``gm`` with the layers in ``bit_map`` quantized (budget trials)."""
    trial = copy_graph_module(gm)
    targets = [lin for lin in linear_maps(trial) if _linear_label(lin) in bit_map]
    _quantize(trial, targets, bit_map, 0, cache, {}, "l1quant-trial")
    return trial


def _layer_report(
    weight: torch.Tensor,
    packed: torch.Tensor,
    exponents: torch.Tensor,
    bias: torch.Tensor | None,
    bits: int,
    group: int,
    act_bits: int,
    x: torch.Tensor | None,
    stats: dict[str, float],
) -> dict[str, Any]:
    _rows, cols = weight.shape
    # ||W - W_q||^2 and ||W||^2: the quantizer's own sums (its search computed them already).
    error, norm = stats["squared_error"], stats["squared_norm"]
    entry: dict[str, Any] = {
        "bits": bits,
        "group": group,
        "in_features": cols,
        "weight_rel_err": math.sqrt(error) / max(math.sqrt(norm), 1e-300),
        "bytes_before": weight.numel() * weight.element_size(),
        "bytes_after": packed.numel() + exponents.numel(),
    }
    if x is not None:
        with torch.no_grad():
            reference = torch.nn.functional.linear(x.to(weight.dtype), weight, bias)
            got = shiftquant_linear_reference(
                x.to(weight.dtype), packed, exponents, bias, bits, group, cols, act_bits
            )
        entry["output_rel_err"] = float(
            (got - reference).double().norm() / reference.double().norm().clamp_min(1e-300)
        )
    return entry


# --- measuring -----------------------------------------------------------------------------------


class _Judge:
    """Perplexity on the evaluation data, logits error and layer inputs on a calibration batch."""

    def __init__(
        self, reference: torch.fx.GraphModule, ctx: PassContext, pass_name: str, needs_ppl: bool
    ) -> None:
        if needs_ppl and ctx.evaluation is None:
            raise RewriterError(
                f"pass '{pass_name}' with a budget needs evaluation data: give "
                "PassContext(evaluation=...) (or --eval-text)"
            )
        # A weightless graph (a streamed checkpoint) cannot run: no measurements, only weights.
        runs = not is_weightless(reference)
        self.ids = ctx.evaluation_ids() if ctx.evaluation is not None and runs else None
        self.show = ctx.progress
        self.batch = (
            ctx.batches("calibration", limit=1, pass_name=pass_name)[0]
            if ctx.calibration is not None and runs
            else None
        )
        self.reference_logits = None
        if self.batch is not None:
            with torch.no_grad():
                self.reference_logits = logits_of(feed(reference, self.batch)).float()
        self.ppl_of_input = self.ppl(reference) if self.ids is not None else math.nan

    def ppl(self, gm: torch.fx.GraphModule) -> float:
        assert self.ids is not None
        return perplexity_of_ids(gm, self.ids)

    def perplexity(self, stage: str, gm: torch.fx.GraphModule) -> dict[str, float]:
        if self.ids is None:
            return {}
        value = self.ppl_of_input if stage == "before" else self.ppl(gm)
        return {f"ppl_{stage}": value}

    def logits_error(self, gm: torch.fx.GraphModule) -> float | None:
        if self.batch is None or self.reference_logits is None:
            return None
        with torch.no_grad():
            return float(
                (logits_of(feed(gm, self.batch)).float() - self.reference_logits).abs().max()
            )

    def linear_inputs(
        self, gm: torch.fx.GraphModule, targets: list[LinearMap]
    ) -> dict[str, torch.Tensor]:
        """Each target's input on the calibration batch (for the per-layer output error)."""
        if self.batch is None:
            return {}
        probe = with_outputs(gm, [t.input for t in targets])
        with torch.no_grad():
            values = feed(probe, self.batch)
        return {_linear_label(t): v.detach() for t, v in zip(targets, values)}


# --- baseline ------------------------------------------------------------------------------------


def round_to_nearest_baseline(
    gm: torch.fx.GraphModule, bits: int, group: int, *, layers: str = ".*", head: bool = False
) -> torch.fx.GraphModule:
    """A copy of ``gm`` whose selected weights are float-scale round-to-nearest (dequantized in
    place, same selection rules as the pass): the baseline ShiftQuant-style scales are measured
    against."""
    from rewriter.ops.quant import round_to_nearest

    copy = copy_graph_module(gm)
    pattern = re.compile(layers)
    rw = Rewriter(copy, pass_name="rtn-baseline")
    for lin in linear_maps(copy):
        if not pattern.fullmatch(_linear_label(lin)) or (is_lm_head(lin) and not head):
            continue
        embeddings = [u for u in lin.weight.users if u.target == aten.embedding.default]
        if embeddings:  # a tied head: the embedding keeps the float weight
            mine = [u for u in lin.weight.users if u not in embeddings]
            rw.untie(lin.weight, mine, name_hint=weight_name_for(lin.node, "weight"))
            lin = as_linear(lin.node) or lin
        fake = round_to_nearest(_out_in(copy, lin), bits, group)
        rw.store.write(lin.weight_name, fake if lin.layout == "out_in" else fake.t(), note="rtn")
    rw.finish(prune_weights=True)
    return copy


# --- helpers -------------------------------------------------------------------------------------


def _linear_label(lin: LinearMap) -> str:
    return lin.path


def _norm_label(unit: NormUnit) -> str:
    return module_path(unit.norm) or unit.norm.name


def _bits_summary(bit_map: dict[str, int]) -> str:
    counts: dict[int, int] = {}
    for bits in bit_map.values():
        counts[bits] = counts.get(bits, 0) + 1
    return " + ".join(f"{n} at {b} bits" for b, n in sorted(counts.items()))
