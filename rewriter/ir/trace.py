"""Tracing: the one entry point from an ``nn.Module`` to the rewriter's IR.

A model is traced once with ``torch.export.export(..., strict=False)`` in eval mode and unlifted
into a plain ``torch.fx.GraphModule``: ATen ops, weights as ``get_attr`` nodes, ``node.meta["val"]``
fake tensors and ``nn_module_stack`` provenance. Three things make the result safe to rewrite:

* the caller's model is never touched: its train/eval flags are restored and the graph's weights
  are clones (``ep.module()`` would otherwise share the caller's ``Parameter`` objects), with ties
  preserved by tensor identity;
* non-tensor keyword arguments (``use_cache=False`` for Hugging Face models) are bound into the
  graph, so the graph's inputs are exactly its tensors;
* what the export knew (input names, dynamic dimensions and their ranges, the model's config) is
  kept in :class:`TraceInfo` at ``gm.meta["rewriter.trace"]`` for verification and backends.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.fx
from torch.export import Dim

from rewriter.errors import TraceError
from rewriter.ir.tensors import owner_of

__all__ = ["TRACE_INFO_KEY", "TraceInfo", "eval_mode", "max_positions", "trace", "trace_info"]

TRACE_INFO_KEY = "rewriter.trace"

# Token-model convention for ``dynamic_shapes="auto"``: dim 0 is the batch, dim 1 the sequence.
_AUTO_DIM_NAMES = ("batch", "seq")


@dataclasses.dataclass
class TraceInfo:
    """What the tracer knew about the model and its inputs; kept on the graph it produced."""

    input_names: tuple[str, ...]
    """Graph input names, in call order (positional arguments first, then keyword arguments)."""
    num_positional: int
    """How many of ``input_names`` are passed positionally."""
    example_inputs: tuple[torch.Tensor, ...]
    """The example tensors the graph was traced with, in ``input_names`` order."""
    bound_kwargs: dict[str, Any]
    """Non-tensor keyword arguments baked into the graph (``use_cache=False``)."""
    dynamic_shapes: Any
    """The ``dynamic_shapes`` spec given to ``torch.export`` (named ``Dim`` objects), or None."""
    dim_ranges: dict[str, tuple[int, int | None]]
    """Named dynamic dimensions and their (min, max) ranges as the export proved them."""
    dynamic_dims: dict[str, dict[int, str]]
    """Per input, which dims are dynamic and the name of each."""
    model_class: str
    """Qualified class name of the traced model."""
    model_type: str | None
    """Hugging Face ``config.model_type`` (``"gpt2"``, ``"llama"``...), if any."""
    config: dict[str, Any] | None
    """The Hugging Face config as a dict, if the model has one."""
    dtype: torch.dtype
    """The model's floating-point dtype (that of its first floating parameter)."""
    max_positions: int | None
    """Longest sequence the model accepts, from its config, if it says."""

    def call_inputs(
        self, inputs: Sequence[torch.Tensor]
    ) -> tuple[tuple[torch.Tensor, ...], dict[str, torch.Tensor]]:
        """Split flat inputs (``input_names`` order) into the graph's ``(args, kwargs)``."""
        inputs = tuple(inputs)
        if len(inputs) != len(self.input_names):
            raise ValueError(
                f"expected {len(self.input_names)} inputs {self.input_names}, got {len(inputs)}"
            )
        args = inputs[: self.num_positional]
        kwargs = dict(zip(self.input_names[self.num_positional :], inputs[self.num_positional :]))
        return args, kwargs

    def seq_limit(self, default: int = 64) -> int:
        """An upper bound for drawing sequence lengths: the config's limit, else ``default``."""
        return min(self.max_positions or default, default)


def trace_info(gm: torch.fx.GraphModule) -> TraceInfo | None:
    """The :class:`TraceInfo` recorded on ``gm`` by :func:`trace`, or None for foreign graphs."""
    info = getattr(gm, "meta", {}).get(TRACE_INFO_KEY)
    return info if isinstance(info, TraceInfo) else None


def trace(
    model: torch.nn.Module,
    example_inputs: Sequence[Any] | torch.Tensor = (),
    *,
    kwargs: Mapping[str, Any] | None = None,
    dynamic_shapes: Any = None,
) -> torch.fx.GraphModule:
    """Trace ``model`` into a GraphModule of ATen ops, leaving the model untouched.

    ``dynamic_shapes`` takes what ``torch.export`` takes, and also two shorthands: ``"auto"``
    makes dims 0 and 1 of every tensor input dynamic, named ``batch`` and ``seq``; and dim names as
    strings (``{"input_ids": {0: "batch", 1: "seq"}}``), one shared ``Dim`` per name, with ranges
    the model needs (``seq <= n_positions``) found by the export and applied.

    Example::

        >>> model = GPT2LMHeadModel(GPT2Config(n_layer=2)).eval()
        >>> gm = rewriter.trace(model, (input_ids,), dynamic_shapes="auto")
        >>> gm(input_ids).logits.shape
        torch.Size([2, 10, 50257])
    """
    if not isinstance(model, torch.nn.Module):
        raise TraceError(f"trace() takes an nn.Module, got {type(model).__name__}")
    args = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    tensor_kwargs, bound_kwargs = _split_kwargs(model, dict(kwargs or {}))
    _check_inputs_are_tensors(args, tensor_kwargs)
    input_names = _input_names(model, args, tensor_kwargs, bound_kwargs)
    spec, requested = _normalize_dynamic_shapes(dynamic_shapes, input_names, args, tensor_kwargs)

    with eval_mode(model), _bound_forward(model, bound_kwargs):
        ep, spec = _export_with_fixes(model, args, tensor_kwargs, spec)

    gm = _plain_graph_module(ep)
    _clone_weights(gm)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    _check_dynamic_dims_survived(requested, input_names, placeholders)
    info = TraceInfo(
        input_names=input_names,
        num_positional=len(args),
        example_inputs=tuple(args) + tuple(tensor_kwargs.values()),
        bound_kwargs=bound_kwargs,
        dynamic_shapes=spec,
        dim_ranges=_dim_ranges(ep, requested, input_names, placeholders),
        dynamic_dims=requested,
        model_class=f"{type(model).__module__}.{type(model).__qualname__}",
        model_type=getattr(getattr(model, "config", None), "model_type", None),
        config=_config_dict(model),
        dtype=_model_dtype(model),
        max_positions=max_positions(model),
    )
    gm.meta[TRACE_INFO_KEY] = info
    return gm


# --- inputs -------------------------------------------------------------------------------------


def _split_kwargs(
    model: torch.nn.Module, kwargs: dict[str, Any]
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
    bound = {k: v for k, v in kwargs.items() if not isinstance(v, torch.Tensor) and v is not None}
    # A Hugging Face model with a KV cache returns cache objects export cannot flatten; a traced
    # graph is a full-sequence forward unless the caller asks otherwise.
    config = getattr(model, "config", None)
    if "use_cache" not in kwargs and hasattr(config, "use_cache"):
        if "use_cache" in inspect.signature(model.forward).parameters:
            bound["use_cache"] = False
    return tensors, bound


def _check_inputs_are_tensors(args: tuple[Any, ...], kwargs: dict[str, torch.Tensor]) -> None:
    for i, a in enumerate(args):
        if not isinstance(a, torch.Tensor):
            raise TraceError(
                f"positional input {i} is a {type(a).__name__}, not a tensor: pass non-tensor "
                "settings as keyword arguments (kwargs=...), where they are bound into the graph"
            )


def _input_names(
    model: torch.nn.Module,
    args: tuple[torch.Tensor, ...],
    kwargs: dict[str, torch.Tensor],
    bound: dict[str, Any],
) -> tuple[str, ...]:
    try:
        params = [
            p.name
            for p in inspect.signature(model.forward).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name not in bound
        ]
    except (TypeError, ValueError):
        params = []
    names = [params[i] if i < len(params) else f"arg{i}" for i in range(len(args))]
    return (*names, *kwargs.keys())


def _normalize_dynamic_shapes(
    dynamic_shapes: Any,
    input_names: tuple[str, ...],
    args: tuple[torch.Tensor, ...],
    kwargs: dict[str, torch.Tensor],
) -> tuple[Any, dict[str, dict[int, str]]]:
    """Turn the shorthands into named ``Dim`` objects; return the spec and the dynamic dims."""
    if dynamic_shapes is None:
        return None, {}
    tensors = dict(zip(input_names, (*args, *kwargs.values())))
    per_input = _per_input(dynamic_shapes, input_names, tensors)
    dims: dict[str, Dim] = {}
    requested: dict[str, dict[int, str]] = {}
    spec: dict[str, dict[int, Any]] = {}
    for name, axes in per_input.items():
        tensor = tensors[name]
        for axis, dim in axes.items():
            if not isinstance(axis, int) or not -tensor.dim() <= axis < tensor.dim():
                raise TraceError(f"dynamic_shapes: input '{name}' has no dim {axis}")
            axis = axis % tensor.dim()
            dim_name = dim if isinstance(dim, str) else getattr(dim, "__name__", f"{name}_{axis}")
            _check_not_special(name, axis, dim_name, tensor.shape[axis])
            spec.setdefault(name, {})[axis] = (
                dims.setdefault(dim, Dim(dim)) if isinstance(dim, str) else dim
            )
            requested.setdefault(name, {})[axis] = dim_name
    if isinstance(dynamic_shapes, (list, tuple)) and len(args) == len(input_names):
        return tuple(spec.get(n) for n in input_names), requested
    return {n: spec.get(n) for n in input_names}, requested


def _per_input(
    dynamic_shapes: Any, input_names: tuple[str, ...], tensors: dict[str, torch.Tensor]
) -> dict[str, dict[Any, Any]]:
    if isinstance(dynamic_shapes, str):
        if dynamic_shapes != "auto":
            raise TraceError(f"dynamic_shapes={dynamic_shapes!r}: the only string form is 'auto'")
        return {
            name: {d: _AUTO_DIM_NAMES[d] for d in range(min(t.dim(), 2))}
            for name, t in tensors.items()
        }
    if isinstance(dynamic_shapes, Mapping):
        per_input = {k: dict(v) if v is not None else {} for k, v in dynamic_shapes.items()}
    elif isinstance(dynamic_shapes, (list, tuple)):
        per_input = {
            n: dict(v) if v is not None else {} for n, v in zip(input_names, dynamic_shapes)
        }
    else:
        raise TraceError(
            f"dynamic_shapes must be a dict, a tuple or 'auto', got {dynamic_shapes!r}"
        )
    unknown = set(per_input) - set(input_names)
    if unknown:
        raise TraceError(
            f"dynamic_shapes names inputs {sorted(unknown)} that the model call does not have "
            f"(inputs: {list(input_names)})"
        )
    return per_input


def _check_not_special(name: str, axis: int, dim_name: str, size: int) -> None:
    if size in (0, 1):
        raise TraceError(
            f"input '{name}' dim {axis} is marked dynamic ('{dim_name}') but the example has size "
            f"{size}. torch.export treats sizes 0 and 1 as special and specializes them, so the "
            f"graph would only accept size {size}. Trace with an example of size >= 2 in that "
            "dim; the graph then accepts sizes from 1 up."
        )


# --- export ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode for the block, then restore each one's own flag."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in flags:
            m.training = training


@contextlib.contextmanager
def _bound_forward(model: torch.nn.Module, bound: dict[str, Any]) -> Iterator[None]:
    """Bind non-tensor kwargs by shadowing ``forward`` on the instance, restored afterwards."""
    if not bound:
        yield
        return
    had_instance_forward = "forward" in vars(model)
    previous = vars(model).get("forward")
    model.forward = functools.partial(model.forward, **bound)  # type: ignore[method-assign]
    try:
        yield
    finally:
        if had_instance_forward:
            model.forward = previous  # type: ignore[method-assign]
        else:
            del model.forward


_SUGGESTED_FIX = re.compile(r"^\s*(\w+)\s*=\s*Dim\('(\w+)'(.*)\)\s*$", re.MULTILINE)
_SUGGESTED_STATIC = re.compile(r"^\s*(\w+)\s*=\s*(\d+)\s*$", re.MULTILINE)


def _export_with_fixes(
    model: torch.nn.Module,
    args: tuple[torch.Tensor, ...],
    kwargs: dict[str, torch.Tensor],
    spec: Any,
) -> tuple[torch.export.ExportedProgram, Any]:
    """Export; when the model bounds a named dim (``seq <= n_positions``), apply the bound.

    Returns the program and the spec that worked (re-exports of the graph need the same one).
    """
    for _ in range(4):
        try:
            ep = torch.export.export(model, args, kwargs=kwargs, dynamic_shapes=spec, strict=False)
            return ep, spec
        except Exception as error:
            fixes = _bound_fixes(error)
            if not fixes or spec is None:
                raise _explain_export_error(error, model) from error
            spec = _apply_bound_fixes(spec, fixes)
    raise TraceError("torch.export kept asking for different dim bounds; give explicit Dims")


def _bound_fixes(error: Exception) -> dict[str, dict[str, int]]:
    text = str(error)
    if "Constraints violated" not in text or "Suggested fixes" not in text:
        return {}
    if _SUGGESTED_STATIC.search(text.split("Suggested fixes", 1)[1]):
        return {}  # the model specialized a dim: explained by _explain_export_error
    fixes: dict[str, dict[str, int]] = {}
    for _, name, rest in _SUGGESTED_FIX.findall(text):
        bounds = dict(re.findall(r"(min|max)=(\d+)", rest))
        fixes[name] = {k: int(v) for k, v in bounds.items()}
    return fixes


def _apply_bound_fixes(spec: Any, fixes: dict[str, dict[str, int]]) -> Any:
    rebuilt: dict[str, Dim] = {}

    def fix(dim: Any) -> Any:
        name = getattr(dim, "__name__", None)
        if name not in fixes:
            return dim
        if name not in rebuilt:
            rebuilt[name] = Dim(name, **fixes[name])
        return rebuilt[name]

    if isinstance(spec, dict):
        return {k: ({a: fix(d) for a, d in v.items()} if v else v) for k, v in spec.items()}
    return tuple(({a: fix(d) for a, d in v.items()} if v else v) for v in spec)


def _explain_export_error(error: Exception, model: torch.nn.Module) -> TraceError:
    text = str(error)
    where = _user_frame(text)
    name = type(model).__name__
    if isinstance(error, TraceError):
        return error
    if "data-dependent" in text or type(error).__name__ == "GuardOnDataDependentSymNode":
        return TraceError(
            f"cannot trace {name}: its forward branches on the values of a tensor "
            f"(data-dependent control flow){where}. A graph fixes one path for all inputs; "
            "rewrite that branch with torch.where / torch.cond, or move it out of forward."
        )
    if "Constraints violated" in text:
        detail = text.split("Suggested fixes", 1)[0].strip().splitlines()
        return TraceError(
            f"cannot trace {name} with these dynamic shapes: "
            + " ".join(line.strip(" -") for line in detail[1:3])
        )
    first = text.strip().splitlines()[0] if text.strip() else type(error).__name__
    return TraceError(f"cannot trace {name}: {type(error).__name__}: {first}{where}")


def _user_frame(text: str) -> str:
    match = re.search(
        r"The following call raised this error:\s*\n\s*File \"([^\"]+)\", line (\d+)"
        r"[^\n]*\n\s*(.+)",
        text,
    )
    if not match:
        return ""
    file, line, code = match.groups()
    return f" at {file}:{line} (`{code.strip()}`)"


# --- the unlifted graph ---------------------------------------------------------------------------


def _plain_graph_module(ep: torch.export.ExportedProgram) -> torch.fx.GraphModule:
    """A plain GraphModule (no export hooks) with its own module hierarchy and pytree calling."""
    unlifted = ep.module()
    gm = torch.fx.GraphModule(unlifted, unlifted.graph)
    gm.meta["range_constraints"] = dict(ep.range_constraints)
    return gm


def _clone_weights(gm: torch.fx.GraphModule) -> None:
    """Replace every tensor attribute by a private clone; one clone per tensor keeps ties tied."""
    clones: dict[int, torch.Tensor] = {}
    for target in _tensor_attribute_paths(gm):
        owner, field = owner_of(gm, target)
        tensor = getattr(owner, field)
        clone = clones.get(id(tensor))
        if clone is None:
            data = tensor.detach().clone()
            clone = (
                torch.nn.Parameter(data, requires_grad=False)
                if isinstance(tensor, torch.nn.Parameter)
                else data
            )
            clones[id(tensor)] = clone
        if isinstance(clone, torch.nn.Parameter):
            owner._parameters[field] = clone
        elif field in owner._buffers:
            owner._buffers[field] = clone
        else:
            setattr(owner, field, clone)


def _tensor_attribute_paths(gm: torch.fx.GraphModule) -> list[str]:
    paths = [name for name, _ in gm.named_parameters(remove_duplicate=False)]
    paths += [name for name, _ in gm.named_buffers(remove_duplicate=False)]
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.target not in paths:
            owner, field = owner_of(gm, node.target)
            if isinstance(getattr(owner, field, None), torch.Tensor):
                paths.append(node.target)
    return paths


def _check_dynamic_dims_survived(
    requested: dict[str, dict[int, str]],
    input_names: tuple[str, ...],
    placeholders: list[torch.fx.Node],
) -> None:
    by_name = dict(zip(input_names, placeholders))
    for name, axes in requested.items():
        val = by_name[name].meta.get("val")
        for axis, dim_name in axes.items():
            if val is not None and isinstance(val.shape[axis], int):
                raise TraceError(
                    f"input '{name}' dim {axis} ('{dim_name}') was marked dynamic, but the "
                    f"model's code fixed it to {val.shape[axis]}; the graph would accept only that "
                    "size. Mark it static, or change the code that depends on its exact value."
                )


def _dim_ranges(
    ep: torch.export.ExportedProgram,
    requested: dict[str, dict[int, str]],
    input_names: tuple[str, ...],
    placeholders: list[torch.fx.Node],
) -> dict[str, tuple[int, int | None]]:
    by_name = dict(zip(input_names, placeholders))
    ranges: dict[str, tuple[int, int | None]] = {}
    constraints = {str(k): v for k, v in ep.range_constraints.items()}
    for name, axes in requested.items():
        shape = by_name[name].meta["val"].shape
        for axis, dim_name in axes.items():
            expr = shape[axis]
            vr = constraints.get(str(expr.node.expr)) if isinstance(expr, torch.SymInt) else None
            if vr is None:
                continue
            lower = max(_finite(vr.lower) or 1, 1)
            upper = _finite(vr.upper)
            old = ranges.get(dim_name)
            if old is not None:
                lower = max(lower, old[0])
                upper = (
                    upper if old[1] is None else (old[1] if upper is None else min(upper, old[1]))
                )
            ranges[dim_name] = (lower, upper)
    return ranges


def _finite(bound: Any) -> int | None:
    try:
        return int(bound)
    except (OverflowError, TypeError, ValueError, AttributeError):
        return None  # sympy / torch infinity


# --- model facts ------------------------------------------------------------------------------


def _config_dict(model: torch.nn.Module) -> dict[str, Any] | None:
    config = getattr(model, "config", None)
    to_dict = getattr(config, "to_dict", None)
    return to_dict() if callable(to_dict) else None


def _model_dtype(model: torch.nn.Module) -> torch.dtype:
    for tensor in (*model.parameters(), *model.buffers()):
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.get_default_dtype()


def max_positions(model: torch.nn.Module) -> int | None:
    """Longest sequence a model accepts, from its Hugging Face config, if it says."""
    config = getattr(model, "config", None)
    for key in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
