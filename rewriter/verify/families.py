"""Small models of each architecture family, built from configs, for tests, fuzzing and benchmarks.

A :class:`ModelSpec` is a plain, hashable description (family, sizes, switches, seed) that builds a
real model class: Hugging Face ``GPT2LMHeadModel``, ``OPTForCausalLM``, ``GPTNeoXForCausalLM``,
``BloomForCausalLM``, ``LlamaForCausalLM``, ``BertForMaskedLM``, or a Pre-LN
``nn.TransformerEncoder`` language model. Nothing is downloaded.

Random initialisation is too tame to find numerical mistakes (unit gammas, zero biases, tiny
means), so :meth:`ModelSpec.build` always randomises norm affines and biases, and with
``outliers=True`` it also injects what trained models have: outlier channels with large
activations, per-token offsets along the all-ones direction, and larger weights.
"""

from __future__ import annotations

import dataclasses
import math
import random
from typing import Any

import torch
from torch import nn

__all__ = ["FAMILIES", "Choices", "EncoderLM", "ModelSpec"]

FAMILIES = ("gpt2", "opt", "gpt_neox", "bloom", "llama", "bert", "tenc")
"""The architecture families every exact pass is property-tested on."""


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A small model of one family; hashable, so traced graphs can be cached per spec."""

    family: str
    layers: int = 2
    heads: int = 2
    head_dim: int = 8
    vocab: int = 96
    ffn_mult: int = 2
    tied: bool = True
    bias: bool = True
    seed: int = 0
    outliers: bool = False
    dtype: torch.dtype = torch.float32
    max_positions: int = 64
    options: tuple[tuple[str, Any], ...] = ()
    """Family switches, e.g. ``(("use_parallel_residual", False),)`` or ``(("attn", "eager"),)``;
    ``("eps", 1e-3)`` sets every norm's epsilon (in the config and in each norm module)."""

    @property
    def hidden(self) -> int:
        return self.heads * self.head_dim

    def option(self, key: str, default: Any = None) -> Any:
        return dict(self.options).get(key, default)

    def with_options(self, **options: Any) -> ModelSpec:
        merged = dict(self.options) | options
        return dataclasses.replace(self, options=tuple(sorted(merged.items())))

    def config(self) -> Any:
        """The Hugging Face config (None for ``tenc``)."""
        if self.family not in FAMILIES:
            raise ValueError(f"unknown family '{self.family}' (known: {', '.join(FAMILIES)})")
        if self.family == "tenc":
            return None
        config = _CONFIGS[self.family](self)
        if self.option("eps") is not None and self.family in _EPS_KEYS:
            setattr(config, _EPS_KEYS[self.family], float(self.option("eps")))
        return config

    def build(self) -> nn.Module:
        """The model in eval mode, deterministically initialised from ``seed``."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            if self.family == "tenc":
                model: nn.Module = EncoderLM(self)
            else:
                model = _build_hf(self)
            generator = torch.Generator().manual_seed(self.seed + 1)
            _randomize_affines(model, generator)
            if self.option("eps") is not None:
                _set_norm_eps(model, float(self.option("eps")))
            if self.outliers:
                _inject_outliers(model, generator, self)
        return model.to(self.dtype).eval()

    @classmethod
    def sample(
        cls, rng: random.Random, family: str, *, outliers: bool | None = None, max_layers: int = 3
    ) -> ModelSpec:
        """A random small spec of ``family``, from the distribution ``verify.model_specs`` draws."""
        return cls.draw(_RandomChoices(rng), family, outliers=outliers, max_layers=max_layers)

    @classmethod
    def draw(
        cls, choose: Choices, family: str, *, outliers: bool | None = None, max_layers: int = 3
    ) -> ModelSpec:
        """A spec whose every free choice comes from ``choose`` (random or hypothesis-driven)."""
        heads = choose.choice([1, 2, 4])
        head_dim = choose.choice([4, 8, 16])
        spec = cls(
            family=family,
            layers=choose.integer(1, max_layers),
            heads=heads,
            head_dim=head_dim,
            vocab=choose.integer(16, 160),
            ffn_mult=choose.choice([1, 2, 4]),
            tied=choose.boolean(),
            bias=choose.boolean() if family not in ("gpt2", "bloom", "bert") else True,
            seed=choose.integer(0, 2**16),
            outliers=choose.boolean() if outliers is None else outliers,
        )
        options: dict[str, Any] = {}
        if family == "gpt_neox":
            options["use_parallel_residual"] = choose.boolean()
        if family == "opt":
            options["word_embed_proj_dim"] = choose.choice([spec.hidden, max(4, spec.hidden // 2)])
        if family == "llama":
            options["kv_heads"] = choose.choice([h for h in (1, 2, 4) if heads % h == 0])
        # the norm's epsilon: centering, folding and CRMSNorm must carry it, not assume 1e-5
        options["eps"] = choose.choice(list(RMS_EPS if family == "llama" else LAYER_NORM_EPS))
        return spec.with_options(**options)

    def example_inputs(self, batch: int = 2, seq: int = 8, seed: int = 0) -> tuple[torch.Tensor]:
        """Token ids ``(batch, seq)`` in range."""
        generator = torch.Generator().manual_seed(seed)
        return (torch.randint(0, self.vocab, (batch, seq), generator=generator),)


class Choices:
    """Where a random spec's choices come from (``random.Random`` or a hypothesis draw)."""

    def choice(self, options: list[Any]) -> Any:
        raise NotImplementedError

    def integer(self, low: int, high: int) -> int:
        raise NotImplementedError

    def boolean(self) -> bool:
        raise NotImplementedError


class _RandomChoices(Choices):
    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def choice(self, options: list[Any]) -> Any:
        return self.rng.choice(options)

    def integer(self, low: int, high: int) -> int:
        return self.rng.randint(low, high)

    def boolean(self) -> bool:
        return self.rng.random() < 0.5


def _gpt2(spec: ModelSpec) -> Any:
    from transformers import GPT2Config

    return GPT2Config(
        n_embd=spec.hidden,
        n_layer=spec.layers,
        n_head=spec.heads,
        vocab_size=spec.vocab,
        n_positions=spec.max_positions,
        n_inner=spec.ffn_mult * spec.hidden,
        tie_word_embeddings=spec.tied,
        bos_token_id=0,
        eos_token_id=0,
    )


def _standard(spec: ModelSpec, ffn_key: str = "intermediate_size") -> dict[str, Any]:
    """The config keys most Hugging Face families spell the same way."""
    return {
        "hidden_size": spec.hidden,
        "num_hidden_layers": spec.layers,
        "num_attention_heads": spec.heads,
        ffn_key: spec.ffn_mult * spec.hidden,
        "vocab_size": spec.vocab,
        "max_position_embeddings": spec.max_positions,
        "tie_word_embeddings": spec.tied,
    }


def _opt(spec: ModelSpec) -> Any:
    from transformers import OPTConfig

    return OPTConfig(
        **_standard(spec, ffn_key="ffn_dim"),
        word_embed_proj_dim=spec.option("word_embed_proj_dim", spec.hidden),
        do_layer_norm_before=spec.option("do_layer_norm_before", True),
        enable_bias=spec.bias,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=0,
    )


def _gpt_neox(spec: ModelSpec) -> Any:
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(
        **_standard(spec),
        use_parallel_residual=spec.option("use_parallel_residual", True),
        attention_bias=spec.bias,
        bos_token_id=0,
        eos_token_id=0,
    )


def _bloom(spec: ModelSpec) -> Any:
    from transformers import BloomConfig

    return BloomConfig(
        hidden_size=spec.hidden,
        n_layer=spec.layers,
        n_head=spec.heads,
        vocab_size=spec.vocab,
        apply_residual_connection_post_layernorm=spec.option("post_layernorm", False),
        tie_word_embeddings=spec.tied,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )


def _llama(spec: ModelSpec) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        **_standard(spec),
        num_key_value_heads=spec.option("kv_heads", spec.heads),
        head_dim=spec.head_dim,
        attention_bias=spec.bias,
        mlp_bias=spec.bias,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )


def _bert(spec: ModelSpec) -> Any:
    from transformers import BertConfig

    return BertConfig(**_standard(spec), pad_token_id=0)


_CONFIGS = {
    "gpt2": _gpt2,
    "opt": _opt,
    "gpt_neox": _gpt_neox,
    "bloom": _bloom,
    "llama": _llama,
    "bert": _bert,
}

_CLASSES = {
    "gpt2": "GPT2LMHeadModel",
    "opt": "OPTForCausalLM",
    "gpt_neox": "GPTNeoXForCausalLM",
    "bloom": "BloomForCausalLM",
    "llama": "LlamaForCausalLM",
    "bert": "BertForMaskedLM",
}


def _build_hf(spec: ModelSpec) -> nn.Module:
    import transformers

    transformers.logging.set_verbosity_error()
    config = spec.config()
    attn = spec.option("attn")
    if attn is not None:
        config._attn_implementation = attn
    cls = getattr(transformers, _CLASSES[spec.family])
    return cls(config)


class EncoderLM(nn.Module):
    """Embedding, a Pre-LN ``nn.TransformerEncoder`` with a final LayerNorm, and a linear head."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        d = spec.hidden
        self.embed = nn.Embedding(spec.vocab, d)
        layer = nn.TransformerEncoderLayer(
            d,
            spec.heads,
            dim_feedforward=spec.ffn_mult * d,
            dropout=0.1,
            activation="gelu",
            batch_first=True,
            norm_first=True,
            bias=spec.bias,
        )
        self.encoder = nn.TransformerEncoder(
            layer, spec.layers, norm=nn.LayerNorm(d), enable_nested_tensor=False
        )
        self.head = nn.Linear(d, spec.vocab, bias=spec.bias)
        if spec.tied:
            self.head.weight = self.embed.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(input_ids)))


_NORMS = (nn.LayerNorm,)

# the config key of each family's norm epsilon (OPT and tenc have none: set on the modules)
_EPS_KEYS = {
    "gpt2": "layer_norm_epsilon",
    "gpt_neox": "layer_norm_eps",
    "bloom": "layer_norm_epsilon",
    "llama": "rms_norm_eps",
    "bert": "layer_norm_eps",
}
LAYER_NORM_EPS = (1e-12, 1e-6, 1e-5, 1e-3)
"""LayerNorm epsilons drawn: BERT's 1e-12, the common 1e-5 and 1e-6, and a large 1e-3."""
RMS_EPS = (1e-6, 1e-5)
"""RMSNorm epsilons drawn (Llama's two)."""


def _set_norm_eps(model: nn.Module, eps: float) -> None:
    """Every norm module's epsilon (``eps`` or Hugging Face's ``variance_epsilon``)."""
    for module in model.modules():
        if not _is_norm(module):
            continue
        for attr in ("eps", "variance_epsilon"):
            if hasattr(module, attr):
                setattr(module, attr, eps)


def _is_norm(module: nn.Module) -> bool:
    name = type(module).__name__
    return isinstance(module, _NORMS) or name.endswith(("RMSNorm", "LayerNorm"))


@torch.no_grad()
def _randomize_affines(model: nn.Module, generator: torch.Generator) -> None:
    """Norm gains in U[0.5, 1.5], norm biases N(0, 0.2), linear biases N(0, 0.1)."""
    for module in model.modules():
        weight = getattr(module, "weight", None)
        bias = getattr(module, "bias", None)
        if _is_norm(module):
            if isinstance(weight, torch.Tensor):
                weight.copy_(torch.rand(weight.shape, generator=generator) + 0.5)
            if isinstance(bias, torch.Tensor):
                bias.copy_(0.2 * torch.randn(bias.shape, generator=generator))
        elif isinstance(bias, torch.Tensor) and bias.dim() == 1:
            bias.copy_(0.1 * torch.randn(bias.shape, generator=generator))
    for name, param in model.named_parameters():
        # Fused attention projections in nn.MultiheadAttention are parameters, not modules.
        if name.endswith("in_proj_bias"):
            param.copy_(0.1 * torch.randn(param.shape, generator=generator))


@torch.no_grad()
def _inject_outliers(model: nn.Module, generator: torch.Generator, spec: ModelSpec) -> None:
    """Large weights, per-token offsets and a few outlier channels (as in trained models)."""
    hidden = spec.hidden
    channels = torch.randperm(hidden, generator=generator)[: max(1, hidden // 16)]
    embeddings = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    tables = {id(m.weight) for m in embeddings}  # a tied head is scaled as the embedding it is
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor):
            continue
        if _is_norm(module):
            # Trained norms damp the massive-activation channels rather than amplify them.
            if weight.shape[-1] == hidden:
                weight[..., channels] *= 0.25
        elif weight.dim() == 2 and id(weight) not in tables:
            weight.mul_(3.0)
    for embedding in embeddings:
        table = embedding.weight
        table.add_(torch.randn(table.shape[0], 1, generator=generator))
        if table.shape[1] == hidden:
            table[:, channels] *= 12.0
    scale = math.sqrt(3.0)
    for name, param in model.named_parameters():
        if name.endswith("in_proj_weight"):
            param.mul_(scale)
