"""Weightless graphs: a Hugging Face architecture traced on the meta device, with no weight
materialized, for checkpoints larger than memory.

``trace_weightless(config_or_directory)`` builds the model under ``torch.device("meta")`` and
traces it. Everything the weight-editing passes analyse is graph structure (the residual stream,
readers and writers, vocabulary uses; ties are found by tensor identity and graph structure,
never by ``data_ptr``, which is 0 for every meta tensor), so ``prernorm``, ``fold-ln`` and
``crmsnorm`` rewrite a weightless graph as they rewrite a loaded one: their edits run on meta
tensors and give the right shapes. The pipeline does not compare outputs of weightless graphs
(there are none to compute), and passes that need weight values or activations (quantization,
calibration) refuse, naming themselves. Executing the recorded edits shard by shard over a
safetensors checkpoint is the streaming step (``docs/architecture.md``, "Streaming rewrites").
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.fx

from rewriter.errors import RewriterError
from rewriter.ir.tensors import is_weightless
from rewriter.ir.trace import trace

__all__ = [
    "architecture",
    "config_dtype",
    "is_weightless",
    "refuse_remote_code",
    "trace_weightless",
]


def refuse_remote_code(config: dict[str, Any], where: Any) -> None:
    """Refuse a config that asks for remote code (``auto_map``): rewriter never runs it."""
    if "auto_map" in config:
        raise RewriterError(
            f"{where} asks for remote code (auto_map); rewriter never sets trust_remote_code. "
            "Load the model yourself and pass it as package.module:factory if you trust it."
        )


def architecture(source: Any) -> tuple[Any, type]:
    """The config and model class of ``source`` (importing the model's code, nothing more)."""
    import transformers

    config = _config(source)
    architectures = getattr(config, "architectures", None) or []
    cls = next(
        (getattr(transformers, n) for n in architectures if hasattr(transformers, n)),
        transformers.AutoModelForCausalLM,
    )
    if cls.__name__.startswith("Auto"):
        try:
            cls = transformers.AutoModelForCausalLM._model_mapping[type(config)]
        except KeyError as e:
            raise RewriterError(
                f"{type(config).__name__} has no causal-LM class in transformers"
            ) from e
    return config, cls


def config_dtype(config: Any) -> torch.dtype:
    """The weight dtype a Hugging Face config names (``dtype``/``torch_dtype``), else float32."""
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(value, str):
        value = getattr(torch, value.removeprefix("torch."), None)
    return value if isinstance(value, torch.dtype) else torch.float32


def _config(source: Any) -> Any:
    import transformers

    if isinstance(source, transformers.PretrainedConfig):
        return source
    if isinstance(source, dict):
        refuse_remote_code(source, "the config")
        return transformers.AutoConfig.for_model(**source)
    path = Path(source)
    file = path / "config.json" if path.is_dir() else path
    if not file.exists():
        raise RewriterError(f"{source}: no Hugging Face config (config.json) there")
    data = json.loads(file.read_text())
    refuse_remote_code(data, file)
    if "model_type" not in data:
        raise RewriterError(f"{file} has no model_type; it is not a Hugging Face config")
    return transformers.AutoConfig.for_model(**data)


def trace_weightless(
    source: Any,
    *,
    batch: int = 2,
    seq: int = 8,
    dynamic: bool = True,
    dtype: torch.dtype | None = None,
) -> torch.fx.GraphModule:
    """The graph of a causal LM from its config (a ``PretrainedConfig``, a dict, a
    ``config.json`` or a model directory), traced on the meta device: no weight is read or
    allocated. Example input ids are ``[batch, seq]`` (batch and length stay dynamic).
    ``dtype``: of the weights (default: the config's ``dtype``, else float32), which must be the
    checkpoint's for :func:`rewriter.open_checkpoint`."""
    config, cls = architecture(source)
    dtype = dtype or config_dtype(config)
    # Built as from_pretrained builds it: under the default dtype, so buffers the model computes
    # in float32 on purpose (rotary inv_freq) stay float32 and ties between buffers stay ties.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = cls(config)
    finally:
        torch.set_default_dtype(previous)
    model.eval()
    vocab = int(getattr(config, "vocab_size", 2) or 2)
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
    gm = trace(model, (ids,), dynamic_shapes="auto" if dynamic else None)
    if not is_weightless(gm):
        raise RewriterError("tracing on the meta device produced real tensors")
    return gm
