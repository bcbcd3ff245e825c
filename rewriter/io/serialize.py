"""Saving and loading rewritten graphs.

* :func:`save` / :func:`load`: a ``.pt2`` file through ``torch.export.save`` (the graph is
  re-exported with the dynamic shapes recorded at trace time), with the :class:`TraceInfo` in the
  archive, so a loaded graph verifies and exports like the one saved. Tied tensors are stored
  once. Loading needs only ``import rewriter``: the ``rewriter::`` ops register on import, so a
  user never meets a ``SerializeError`` for an unknown op.
* :func:`save_pretrained`: for rewrites that keep the model's architecture (canonicalize, merged
  adapters, trimmed vocabulary), a Hugging Face ``save_pretrained`` directory, checked by
  reloading it and comparing logits with the graph. Rewrites that change the architecture are
  refused with the measured difference (save those as ``.pt2``).
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.fx
from torch.export import Dim
from torch.utils import _pytree as pytree

from rewriter.analysis.vocab import VOCAB_KEY, VocabMap, vocab_map
from rewriter.checkpoint import bind
from rewriter.errors import RewriterError
from rewriter.io.archive import check_archive, output_type
from rewriter.ir.tensors import alias_groups
from rewriter.ir.trace import TRACE_INFO_KEY, TraceInfo, _plain_graph_module, trace_info
from rewriter.verify import ErrorReport

__all__ = ["load", "save", "save_pretrained"]

_INFO_FILE = "rewriter_trace_info.json"
_EXAMPLES_FILE = "rewriter_example_inputs.b64"
_OUTPUTS_FILE = "rewriter_output_structure.json"
_VOCAB_FILE = "rewriter_vocab.json"


def save(gm: torch.fx.GraphModule, path: str | os.PathLike[str]) -> Path:
    """Save a traced (and rewritten) graph as a ``.pt2`` archive.

    Example::

        >>> rewriter.save(result.graph_module, "out/model.pt2")
        >>> gm = rewriter.load("out/model.pt2")
    """
    info = trace_info(gm)
    if info is None:
        raise RewriterError("save() needs a graph made by rewriter.trace (it records the inputs)")
    args, kwargs = info.call_inputs(info.example_inputs)
    # Model output classes (Hugging Face ModelOutput) have no pytree serialization: the archive
    # holds dicts, and the structure is restored on load.
    flat_outputs, structure = _with_serializable_outputs(gm)
    ep = torch.export.export(
        flat_outputs, args, kwargs=kwargs, dynamic_shapes=info.dynamic_shapes, strict=False
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    extra = {
        _INFO_FILE: json.dumps(_info_to_json(info)),
        _EXAMPLES_FILE: _tensors_to_text(info.example_inputs),
        _OUTPUTS_FILE: json.dumps(structure),
        _VOCAB_FILE: json.dumps(_vocab_to_json(vocab_map(gm))),
    }
    torch.export.save(ep, path, extra_files=extra)
    return path


def load(
    path: str | os.PathLike[str],
    weights: str | os.PathLike[str] | None = None,
    *,
    device: str | torch.device = "cpu",
) -> torch.fx.GraphModule:
    """Load a graph saved by :func:`save` (with its trace information).

    ``weights``: a directory of safetensors written by a streaming rewrite (``rewriter run
    --stream``, :func:`rewriter.checkpoint.write_checkpoint`) to bind to a weightless graph, on
    ``device``.
    """
    gm = _load(path)
    if weights is not None:
        bind(gm, weights, device=device)
    return gm


def _load(path: str | os.PathLike[str]) -> torch.fx.GraphModule:
    import rewriter.ops  # noqa: F401 - registers the rewriter:: ops before deserializing

    check_archive(path, _OUTPUTS_FILE)  # before torch reads it: nothing in it may run code
    extra = {_INFO_FILE: "", _EXAMPLES_FILE: "", _OUTPUTS_FILE: "", _VOCAB_FILE: ""}
    ep = torch.export.load(Path(path), extra_files=extra)
    gm = _plain_graph_module(ep)
    if extra[_OUTPUTS_FILE]:
        _set_out_spec(gm, _spec_from_json(json.loads(extra[_OUTPUTS_FILE])))
    if extra[_INFO_FILE]:
        gm.meta[TRACE_INFO_KEY] = _info_from_json(
            json.loads(extra[_INFO_FILE]), extra[_EXAMPLES_FILE]
        )
    if extra[_VOCAB_FILE]:
        vmap = _vocab_from_json(json.loads(extra[_VOCAB_FILE]))
        if vmap is not None:
            gm.meta[VOCAB_KEY] = vmap
    return gm


def _vocab_to_json(vmap: VocabMap | None) -> dict[str, Any] | None:
    if vmap is None:
        return None
    data = {
        "kept": vmap.kept.tolist(),
        "original_size": vmap.original_size,
        "ids": vmap.ids,
        "token_inputs": list(vmap.token_inputs),
        "vocab_outputs": list(vmap.vocab_outputs),
        "filler": vmap.filler,
        "tokenizer": None,
    }
    if vmap.tokenizer is not None:
        from rewriter.io.tokenizer_trim import backend

        specials = getattr(vmap.tokenizer, "special_tokens_map", None)
        data["tokenizer"] = {
            "json": backend(vmap.tokenizer).to_str(),
            "hf_special_tokens": specials if isinstance(specials, dict) else None,
        }
    return data


def _vocab_from_json(data: dict[str, Any] | None) -> VocabMap | None:
    if not data:
        return None
    tokenizer = None
    if data["tokenizer"] is not None:
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_str(data["tokenizer"]["json"])
        specials = data["tokenizer"]["hf_special_tokens"]
        if specials is not None:
            from transformers import PreTrainedTokenizerFast

            tokenizer = PreTrainedTokenizerFast(tokenizer_object=tokenizer, **specials)
    return VocabMap(
        kept=torch.tensor(data["kept"], dtype=torch.long),
        original_size=data["original_size"],
        ids=data["ids"],
        token_inputs=tuple(data["token_inputs"]),
        vocab_outputs=tuple(data["vocab_outputs"]),
        filler=data["filler"],
        tokenizer=tokenizer,
    )


def _with_serializable_outputs(gm: torch.fx.GraphModule) -> tuple[torch.fx.GraphModule, Any]:
    """A copy whose output spec uses only serializable containers, and the original structure."""
    from rewriter.ir.graph import copy_graph_module

    spec = gm.graph._codegen.pytree_info.out_spec  # type: ignore[attr-defined]
    copy = copy_graph_module(gm)
    _set_out_spec(copy, _plain_spec(spec))
    return copy, _spec_to_json(spec)


def _set_out_spec(gm: torch.fx.GraphModule, spec: pytree.TreeSpec) -> None:
    codegen = gm.graph._codegen
    codegen.pytree_info = codegen.pytree_info._replace(out_spec=spec)  # type: ignore[attr-defined]
    gm.recompile()


def _plain_spec(spec: pytree.TreeSpec) -> pytree.TreeSpec:
    children = [_plain_spec(c) for c in spec.children()]
    if spec.is_leaf():
        return spec
    entry = pytree.SUPPORTED_SERIALIZED_TYPES.get(spec.type)
    if entry is not None and entry.serialized_type_name != pytree.NO_SERIALIZED_TYPE_NAME_FOUND:
        return pytree.TreeSpec(spec.type, spec.context, children)
    if isinstance(spec.context, (list, tuple)) and all(isinstance(k, str) for k in spec.context):
        return pytree.TreeSpec(dict, list(spec.context), children)
    return pytree.TreeSpec(tuple, None, children)


def _spec_to_json(spec: pytree.TreeSpec) -> Any:
    if spec.is_leaf():
        return None
    context = spec.context if _jsonable(spec.context) else None
    return {
        "type": f"{spec.type.__module__}.{spec.type.__qualname__}",
        "context": context,
        "children": [_spec_to_json(c) for c in spec.children()],
    }


def _spec_from_json(data: Any) -> pytree.TreeSpec:
    if data is None:
        return pytree.treespec_leaf()
    cls = output_type(data["type"])  # the allow-list; check_archive already resolved each
    children = [_spec_from_json(c) for c in data["children"]]
    return pytree.TreeSpec(cls, data["context"], children)


def _info_to_json(info: TraceInfo) -> dict[str, Any]:
    data = dataclasses.asdict(info)
    data.pop("example_inputs")
    data.pop("dynamic_shapes")
    data["dtype"] = str(info.dtype).removeprefix("torch.")
    data["dynamic_dims"] = {
        k: {str(a): n for a, n in v.items()} for k, v in info.dynamic_dims.items()
    }
    data["bound_kwargs"] = {k: v for k, v in info.bound_kwargs.items() if _jsonable(v)}
    data["config"] = info.config if _jsonable(info.config) else None
    return data


def _info_from_json(data: dict[str, Any], examples: str) -> TraceInfo:
    dynamic_dims = {k: {int(a): n for a, n in v.items()} for k, v in data["dynamic_dims"].items()}
    ranges = {k: tuple(v) for k, v in data["dim_ranges"].items()}
    return TraceInfo(
        input_names=tuple(data["input_names"]),
        num_positional=data["num_positional"],
        example_inputs=_tensors_from_text(examples),
        bound_kwargs=data["bound_kwargs"],
        dynamic_shapes=_spec_from_dims(
            data["input_names"], data["num_positional"], dynamic_dims, ranges
        ),
        dim_ranges=ranges,  # type: ignore[arg-type]
        dynamic_dims=dynamic_dims,
        model_class=data["model_class"],
        model_type=data["model_type"],
        config=data["config"],
        dtype=getattr(torch, data["dtype"]),
        max_positions=data["max_positions"],
    )


def _spec_from_dims(
    input_names: list[str],
    num_positional: int,
    dynamic_dims: dict[str, dict[int, str]],
    ranges: dict[str, tuple[int, int | None]],
) -> Any:
    if not dynamic_dims:
        return None
    dims: dict[str, Dim] = {}
    for name in {n for axes in dynamic_dims.values() for n in axes.values()}:
        lower, upper = ranges.get(name, (1, None))
        dims[name] = Dim(name, min=max(lower, 1), max=upper) if upper else Dim(name)
    spec = {
        n: ({a: dims[d] for a, d in dynamic_dims[n].items()} if n in dynamic_dims else None)
        for n in input_names
    }
    if num_positional == len(input_names):
        return tuple(spec[n] for n in input_names)
    return spec


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def _tensors_to_text(tensors: tuple[torch.Tensor, ...]) -> str:
    buffer = io.BytesIO()
    torch.save([t.detach().cpu() for t in tensors], buffer)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _tensors_from_text(text: str) -> tuple[torch.Tensor, ...]:
    if not text:
        return ()
    return tuple(torch.load(io.BytesIO(base64.b64decode(text)), weights_only=True))


# --- Hugging Face directories ---------------------------------------------------------------------


def save_pretrained(
    gm: torch.fx.GraphModule,
    directory: str | os.PathLike[str],
    *,
    tokenizer: Any = None,
    config_overrides: dict[str, Any] | None = None,
) -> ErrorReport:
    """Write a Hugging Face ``save_pretrained`` directory for an architecture-preserving rewrite.

    The model class and config come from the trace (``config_overrides`` adjusts them, e.g. a
    new ``vocab_size``); the graph's weights are loaded by name. The directory is reloaded and its
    logits compared with the graph on the example inputs; a mismatch (the rewrite changed the
    architecture) raises before anything is written. Returns the comparison.
    """
    info = trace_info(gm)
    if info is None or info.config is None:
        raise RewriterError("save_pretrained() needs a graph traced from a Hugging Face model")
    vmap = vocab_map(gm)
    if vmap is not None and vmap.ids == "original":
        raise RewriterError(
            "this graph was trimmed with vocab-trim(mode=id-map): it maps the old tokenizer's ids "
            "itself, which no Hugging Face class does; trim with mode=rebuilt to save a "
            "directory, or save it with rewriter.save(gm, 'model.pt2')"
        )
    if tokenizer is None and vmap is not None:
        tokenizer = vmap.tokenizer  # the rebuilt tokenizer goes with the trimmed model
    overrides = dict(config_overrides or {})
    model = _rebuild(info, overrides, gm)
    if "tie_word_embeddings" not in overrides and _untied_by_the_graph(model, gm):
        # An adapter merged into a tied LM head (or any rewrite of one side) gave the head a
        # tensor of its own: the directory says so, or loading it would tie them again.
        overrides["tie_word_embeddings"] = False
        model = _rebuild(info, overrides, gm)
    report = _same_ids_compare(gm, model, info.example_inputs)
    if not report.ok:
        raise RewriterError(
            "this rewrite changed the model's architecture, so a Hugging Face directory cannot "
            f"hold it ({report}); save it with rewriter.save(gm, 'model.pt2') instead"
        )
    directory = Path(directory)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    reloaded = type(model).from_pretrained(directory, local_files_only=True).eval()
    check = _same_ids_compare(gm, reloaded, info.example_inputs)
    if not check.ok:
        raise RewriterError(f"the saved directory does not reload to the same logits: {check}")
    return check


def _same_ids_compare(gm: torch.fx.GraphModule, model: torch.nn.Module, inputs: Any) -> ErrorReport:
    """Compare a graph with a model built for its (possibly trimmed) vocabulary: both take the
    graph's ids, so no vocabulary translation applies."""
    from rewriter.verify import compare_outputs, outputs, run

    info = trace_info(gm)
    return compare_outputs(
        outputs(run(gm, inputs, info)), outputs(run(model, inputs, info)), None, None
    )


def _rebuild(
    info: TraceInfo, overrides: dict[str, Any], gm: torch.fx.GraphModule
) -> torch.nn.Module:
    import importlib

    import transformers

    module_name, _, class_name = info.model_class.rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name)
    config_cls = getattr(cls, "config_class", None) or transformers.AutoConfig
    config = config_cls.from_dict({**info.config, **overrides})
    model = cls(config).to(info.dtype).eval()
    missing: list[str] = []
    with torch.no_grad():
        for names, target in alias_groups(model, persistent=True):
            source = next((t for n in names if (t := _tensor(gm, n)) is not None), None)
            if source is None:
                missing.append(names[0])
                continue
            if target.shape != source.shape:
                raise RewriterError(
                    f"weight '{names[0]}' has shape {tuple(source.shape)} in the graph but "
                    f"{tuple(target.shape)} in {class_name}: pass config_overrides"
                )
            target.copy_(source)
    unexplained = sorted(set(missing) - _config_buffer_names(model))
    if unexplained:
        raise RewriterError(
            f"the graph has no weights named {unexplained[:5]}: the architecture changed"
        )
    return model


def _untied_by_the_graph(model: torch.nn.Module, gm: torch.fx.GraphModule) -> bool:
    """Whether names that ``model`` ties to one tensor hold different values in the graph."""
    for names, _ in alias_groups(model, persistent=True):
        found = [t for n in names if (t := _tensor(gm, n)) is not None]
        if any(t.shape != found[0].shape or not torch.equal(t, found[0]) for t in found[1:]):
            return True
    return False


def _tensor(gm: torch.fx.GraphModule, name: str) -> torch.Tensor | None:
    try:
        return gm.get_parameter(name)
    except AttributeError:
        pass
    try:
        return gm.get_buffer(name)
    except AttributeError:
        return None


def _config_buffer_names(model: torch.nn.Module) -> set[str]:
    """Names of the buffers a model computes from its config (by name: rotary ``inv_freq``,
    ``position_ids``, ...), which a graph may have folded away. (A streamed checkpoint that lacks
    them has their values rebuilt from the config: :mod:`rewriter.checkpoint.attach`.)"""
    return {
        name
        for name, _ in model.named_buffers()
        if name.endswith(("inv_freq", "position_ids", "token_type_ids", "masked_bias"))
    }
