"""Fitting parameters of a traced graph.

Exported graphs refuse ``.train()`` in the export's own module class and bake dropout in as
``train=False``, so the usual ``model.train(); loop`` does not apply. :func:`train` is the one
training helper every approximate pass uses (LN-freeze recovery, attention transfer, adapters):
it selects parameters, gives them private copies (graphs produced by a pipeline share weights
with their inputs, copy-on-write), optimises a causal-LM or MSE loss with AdamW, and shows
progress. The graph runs deterministically (no dropout); the seed fixes batch order and any
randomness of the loss.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F

from rewriter.context import progress
from rewriter.errors import RewriterError
from rewriter.ir.graph import feed
from rewriter.ir.store import ModuleStore
from rewriter.ir.trace import trace_info
from rewriter.verify import outputs

__all__ = ["TrainReport", "causal_lm_loss", "forward", "logits_of", "train"]


@dataclasses.dataclass
class TrainReport:
    """Loss per step and the names of the parameters that were trained."""

    losses: list[float]
    params: list[str]

    @property
    def first(self) -> float:
        return self.losses[0]

    @property
    def last(self) -> float:
        return self.losses[-1]


def logits_of(output: Any) -> torch.Tensor:
    """The logits in a model output: ``.logits`` if present, else the first tensor."""
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    tensors = outputs(output)
    if not tensors:
        raise RewriterError("the model returned no tensor")
    return tensors[0]


def causal_lm_loss(
    logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean next-token cross-entropy (positions with ``mask == 0`` as targets are ignored)."""
    targets = ids[:, 1:].clone()
    if mask is not None:
        targets[mask[:, 1:] == 0] = -100
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=-100
    )


def train(
    gm: torch.fx.GraphModule,
    batches: Sequence[Any],
    *,
    steps: int,
    lr: float = 1e-3,
    params: str | Sequence[str] | Callable[[str], bool] | None = None,
    loss: str | Callable[[Any, Any], torch.Tensor] = "causal-lm",
    seed: int = 0,
    weight_decay: float = 0.0,
    grad_clip: float | None = 1.0,
    warmup: int = 0,
    schedule: str = "constant",
    show_progress: bool = True,
    description: str = "training",
) -> TrainReport:
    """Fit parameters of ``gm`` in place and return the loss curve.

    ``params`` selects what trains: a regex (full match on the parameter name), a list of names,
    a predicate, or None for the parameters already marked trainable (adapters). ``batches`` are
    token-id tensors for ``loss="causal-lm"``, ``(inputs, target)`` pairs for ``loss="mse"``, or
    anything a callable ``loss(output, batch)`` understands; they are cycled for ``steps``.
    The learning rate rises linearly over ``warmup`` steps, then stays (``schedule="constant"``)
    or follows a cosine to zero (``"cosine"``): a fresh optimizer on a trained model moves every
    weight by about ``lr`` in its first steps, so fine-tuning a converged model wants both.

    Example::

        >>> report = rewriter.train(gm, ctx.batches(), steps=50, lr=1e-3, params=r".*lora_.*")
        >>> report.first, report.last
        (4.21, 3.87)
    """
    if steps < 1:
        raise ValueError("steps must be >= 1")
    if schedule not in ("constant", "cosine"):
        raise ValueError(f"schedule must be 'constant' or 'cosine', got {schedule!r}")
    if not batches:
        raise RewriterError("train() needs at least one batch")
    names = _select(gm, params)
    store = ModuleStore(gm)
    previous_flags = {name: p.requires_grad for name, p in _named_parameters(gm)}
    for name in names:
        store.own(name)  # a private copy: graphs sharing the old tensor stay unchanged
    trainable = dict(_named_parameters(gm))
    for parameter in trainable.values():
        parameter.requires_grad_(False)
    chosen = list({id(trainable[n]): trainable[n] for n in names}.values())  # ties train once
    for parameter in chosen:
        parameter.requires_grad_(True)
    optimizer = torch.optim.AdamW(chosen, lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, functools.partial(_lr_factor, warmup=warmup, steps=steps, schedule=schedule)
    )
    loss_fn = _loss_function(loss)
    info = trace_info(gm)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(batches), generator=generator).tolist()
    losses: list[float] = []
    dropouts = _switch_train_dropout(gm, True)
    try:
        for step in progress(
            range(steps), total=steps, description=description, enabled=show_progress
        ):
            batch = batches[order[step % len(order)]]
            optimizer.zero_grad(set_to_none=True)
            value = loss_fn(forward(gm, batch, info), batch)
            if not torch.isfinite(value):
                raise RewriterError(f"training diverged at step {step}: loss is {value.item()}")
            value.backward()
            if grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(chosen, grad_clip)
            optimizer.step()
            scheduler.step()
            losses.append(float(value.detach()))
    finally:
        for name, parameter in _named_parameters(gm):
            parameter.requires_grad_(previous_flags.get(name, False))
        if dropouts:
            _switch_train_dropout(gm, False)
    return TrainReport(losses, names)


def _switch_train_dropout(gm: torch.fx.GraphModule, on: bool) -> int:
    """Set the ``train`` flag of dropouts tagged for training (adapter dropout); returns count."""
    count = 0
    for node in gm.graph.nodes:
        if node.meta.get("rewriter.train_dropout"):
            node.args = (node.args[0], node.args[1], on)
            count += 1
    if count:
        gm.recompile()
    return count


def _lr_factor(step: int, *, warmup: int, steps: int, schedule: str) -> float:
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    progress_ = (step - warmup) / max(1, steps - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress_)))


def _named_parameters(gm: torch.fx.GraphModule) -> list[tuple[str, torch.nn.Parameter]]:
    return list(gm.named_parameters(remove_duplicate=False))


def _select(gm: torch.fx.GraphModule, params: Any) -> list[str]:
    all_names = [name for name, p in _named_parameters(gm) if p.is_floating_point()]
    if params is None:
        names = [n for n, p in _named_parameters(gm) if p.requires_grad]
        if not names:
            raise RewriterError(
                "no trainable parameters: pass params= (a regex, a list of names or a predicate)"
            )
        return names
    if isinstance(params, str):
        pattern = re.compile(params)
        names = [n for n in all_names if pattern.fullmatch(n)]
    elif callable(params):
        names = [n for n in all_names if params(n)]
    else:
        unknown = sorted(set(params) - set(all_names))
        if unknown:
            raise RewriterError(f"no parameters named {unknown} in the graph")
        names = list(params)
    if not names:
        raise RewriterError(f"params={params!r} selects no parameter of the graph")
    return names


def _loss_function(loss: Any) -> Callable[[Any, Any], torch.Tensor]:
    if callable(loss):
        return loss
    if loss == "causal-lm":

        def lm(output: Any, batch: Any) -> torch.Tensor:
            ids, mask = _ids_and_mask(batch)
            return causal_lm_loss(logits_of(output), ids, mask)

        return lm
    if loss == "mse":

        def mse(output: Any, batch: Any) -> torch.Tensor:
            return F.mse_loss(logits_of(output).float(), batch[1].float())

        return mse
    raise ValueError(f"loss must be 'causal-lm', 'mse' or a callable, got {loss!r}")


def _ids_and_mask(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, dict):
        return batch["input_ids"], batch.get("attention_mask")
    return batch[0], None


def forward(gm: torch.fx.GraphModule, batch: Any, info: Any = None) -> Any:
    """Run ``gm`` on one training batch as :func:`train` does: a token tensor or a dict (missing
    attention masks and position ids filled in), or a tuple whose first item holds the graph's
    inputs (called by the graph's input names when ``info``, its ``TraceInfo``, is given). Passes
    that fit parameters on calibration batches call this."""
    if isinstance(batch, (dict, torch.Tensor)):
        return feed(gm, batch)  # fills an attention mask / position ids the batch leaves out
    inputs: Iterable[torch.Tensor] = (
        batch[0] if isinstance(batch[0], (tuple, list)) else (batch[0],)
    )
    inputs = tuple(inputs)
    if info is not None and len(inputs) == len(info.input_names):
        args, kwargs = info.call_inputs(inputs)
        return gm(*args, **kwargs)
    return gm(*inputs)
