"""Deploying causal LMs: a step graph the passes rewrite once, cut into prefill and decode graphs
that share weights, and generation with a cache in torch and ONNX Runtime.

Why one graph first. Prefill (a prompt -> logits and cache) and decode (one token and the cache ->
logits and the new cache) are two computations over the same weights; a pass that ran on each
separately could decide differently (calibration, budgets, fitted maps) or store a weight twice.
So :func:`trace_causal_lm` traces a **step graph**: the model run on a sequence's prefix with a
cache, then on its last token from that cache, in one graph whose interface is a full-sequence
forward (``input_ids, attention_mask, position_ids -> logits``). Every pass, calibration,
verification and training works on it unchanged, and sees both computations. Marker ops
(:mod:`rewriter.ops.deploy`) record where the cut goes: :func:`split` then makes

* a **prefill graph**: ``(input_ids [B, T], attention_mask [B, T], position_ids [B, T]) ->
  (logits [B, T, V], cache...)``, each cache tensor ``[B, heads, T, head_dim]``;
* a **decode graph**: ``(input_ids [B, 1], attention_mask [B, P + 1], position_ids [B, 1],
  cache... [B, heads, P, head_dim]) -> (logits [B, 1, V], cache... [.., P + 1, ..])``,

re-exported with dynamic batch, length and cache length, their weights bound to the same tensors.
:func:`generate` runs them (greedy or sampled, left-padded batches) in torch, and
``rewriter.backends.onnx.export_causal_lm`` gives ONNX Runtime sessions the same loop runs on.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx

from rewriter.errors import RewriterError, TraceError
from rewriter.ir.graph import get_tensor, positions, set_tensor
from rewriter.ir.trace import TRACE_INFO_KEY, trace, trace_info
from rewriter.ops.contract import arguments
from rewriter.ops.deploy import CACHE_KINDS, FIRST_STATE_KIND, cache_point, step_part
from rewriter.pipeline.metrics import encode

__all__ = [
    "STEP_KEY",
    "CausalLMGraphs",
    "GenerationResult",
    "agreement",
    "generate",
    "grows",
    "positions",
    "split",
    "trace_causal_lm",
]

STEP_KEY = "rewriter.step"
"""Meta key of a step graph: the :class:`StepInfo` it was traced with."""

aten = torch.ops.aten


@dataclasses.dataclass(frozen=True)
class StepInfo:
    """Marks a step graph (the cache it carries is read off its ``cache_point`` nodes, which
    passes may change: ``linearize`` turns a layer's keys and values into its state)."""

    model_class: str


class _Step(torch.nn.Module):
    """The model on a sequence's prefix (building a cache), then on its last token from it."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.config = getattr(model, "config", None)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
    ) -> Any:
        first = self.model(
            step_part(input_ids, 0),
            attention_mask=step_part(attention_mask, 0),
            position_ids=step_part(position_ids, 0),
            use_cache=True,
        )
        cache = first.past_key_values
        for index, layer in enumerate(cache.layers):
            layer.keys = cache_point(layer.keys, index, 0)
            layer.values = cache_point(layer.values, index, 1)
        second = self.model(
            step_part(input_ids, 1),
            attention_mask=attention_mask,
            position_ids=step_part(position_ids, 1),
            past_key_values=cache,
            use_cache=True,
        )
        from transformers.modeling_outputs import CausalLMOutput

        return CausalLMOutput(logits=torch.cat([first.logits, second.logits], 1))


def trace_causal_lm(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
) -> torch.fx.GraphModule:
    """The step graph of a Hugging Face causal LM (see the module docstring).

    ``input_ids`` is an example of at least 2 rows and 3 tokens (batch and length stay dynamic).
    The graph's inputs are ``input_ids, attention_mask, position_ids``; it compares with
    ``model(input_ids, attention_mask=..., position_ids=..., use_cache=False)``.

    Example::

        >>> step = rewriter.deploy.trace_causal_lm(model, ids)
        >>> step = rewriter.Pipeline.parse("canonicalize,prernorm,fold-ln").run(step).graph_module
        >>> graphs = rewriter.deploy.split(step)
        >>> rewriter.deploy.generate(graphs, tokenizer, ["def f("], max_new_tokens=20).texts
    """
    if input_ids.dim() != 2 or input_ids.shape[0] < 2 or input_ids.shape[1] < 3:
        raise TraceError(
            "trace_causal_lm needs example input_ids of shape [batch >= 2, length >= 3] "
            f"(sizes 0 and 1 would be specialized), got {tuple(input_ids.shape)}"
        )
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    step = _Step(model)
    gm = trace(
        step,
        (input_ids, attention_mask, positions(attention_mask)),
        dynamic_shapes={
            "input_ids": {0: "batch", 1: "seq"},
            "attention_mask": {0: "batch", 1: "seq"},
            "position_ids": {0: "batch", 1: "seq"},
        },
    )
    _strip_prefix(gm, "model")  # the model's own weight names, not the wrapper's
    info = trace_info(gm)
    assert info is not None
    gm.meta[TRACE_INFO_KEY] = dataclasses.replace(
        info,
        bound_kwargs={"use_cache": False},  # how the original model is compared with it
        num_positional=1,  # the model takes the mask and positions by keyword
        model_class=f"{type(model).__module__}.{type(model).__qualname__}",
    )
    if not gm.graph.find_nodes(op="call_function", target=torch.ops.rewriter.cache_point.default):
        raise TraceError(
            f"{type(model).__name__} returned no key/value cache with use_cache=True: "
            "only models with a Hugging Face Cache can be deployed with a cache"
        )
    gm.meta[STEP_KEY] = StepInfo(info.model_class)
    return gm


# --- the cut --------------------------------------------------------------------------------------


@dataclasses.dataclass
class CausalLMGraphs:
    """A prefill graph and a decode graph that share their weights."""

    prefill: torch.fx.GraphModule
    decode: torch.fx.GraphModule
    cache: tuple[tuple[int, int], ...]
    """(layer, kind) of each cache tensor, in input/output order."""

    @property
    def cache_names(self) -> list[str]:
        return [_cache_name(layer, kind) for layer, kind in self.cache]

    @property
    def vocab(self) -> Any:
        from rewriter.analysis.vocab import vocab_map

        return vocab_map(self.prefill)

    def run_prefill(
        self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        with torch.no_grad():
            out = self.prefill(ids, mask, pos)
        return out[0], list(out[1:])

    def run_decode(
        self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache: list[torch.Tensor]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        with torch.no_grad():
            out = self.decode(ids, mask, pos, *cache)
        return out[0], list(out[1:])


def _cache_name(layer: int, kind: int) -> str:
    return f"past_{layer}_{CACHE_KINDS.get(kind, f'kind{kind}')}"


def grows(kind: int) -> bool:
    """Whether a cache tensor of this kind grows with the context (keys and values, along dim
    2) or has a fixed size (a linearized layer's state)."""
    return kind < FIRST_STATE_KIND


def split(step: torch.fx.GraphModule) -> CausalLMGraphs:
    """Cut a (rewritten) step graph into prefill and decode graphs that share weights."""
    info = step.meta.get(STEP_KEY)
    trace = trace_info(step)
    if not isinstance(info, StepInfo) or trace is None:
        raise RewriterError("split() takes a step graph made by rewriter.deploy.trace_causal_lm")
    prefix_logits, last_logits = _logits_halves(step)
    points = _cache_points(step)
    cache = tuple(sorted(points))
    prefill_outputs = [prefix_logits, *(points[key].args[0] for key in cache)]
    prefill = _cut(step, prefill_outputs, part=0, points=points)
    presents = [_present(points[key]) for key in cache]
    decode = _cut(step, [last_logits, *presents], part=1, points=points)
    return _retrace(step, prefill, decode, cache, trace)


def _logits_halves(step: torch.fx.GraphModule) -> tuple[torch.fx.Node, torch.fx.Node]:
    output = step.graph.output_node()
    value = output.args[0]
    while isinstance(value, (list, tuple, dict)):
        value = next(iter(value.values())) if isinstance(value, dict) else value[0]
    node = value
    if not (
        isinstance(node, torch.fx.Node)
        and node.target == aten.cat.default
        and len(node.args[0]) == 2
    ):
        raise RewriterError(
            "the step graph's logits are no longer the concatenation of its prefix and last-token "
            f"logits (found {getattr(node, 'target', node)}): a pass rewrote the step boundary"
        )
    prefix, last = node.args[0]
    return prefix, last


def _cache_points(step: torch.fx.GraphModule) -> dict[tuple[int, int], torch.fx.Node]:
    found = {}
    for node in step.graph.find_nodes(
        op="call_function", target=torch.ops.rewriter.cache_point.default
    ):
        found[(int(node.args[1]), int(node.args[2]))] = node
    return found


def _present(point: torch.fx.Node) -> torch.fx.Node | tuple[torch.fx.Node, int]:
    """The decode half's updated cache tensor: keys and values concatenate the cache point and
    the new entry; a linearized layer's state is output ``index`` of its decode step (returned
    as ``(step, index)``: the step graph itself does not use it)."""
    for user in point.users:
        if user.target == aten.cat.default and user.args[0][0] is point:
            return user
        if user.target == torch.ops.rewriter.linear_attention_decode.default:
            return user, 1 + list(arguments(user)["state"]).index(point)
    raise RewriterError(
        f"cache tensor {point.args[1:]} is not extended by a concatenation or updated by a "
        "linear-attention decode step in the decode half (a cache layout this split does not "
        "know)"
    )


def _cut(
    step: torch.fx.GraphModule,
    outputs: list[torch.fx.Node | tuple[torch.fx.Node, int]],
    *,
    part: int,
    points: dict[tuple[int, int], torch.fx.Node],
) -> torch.fx.GraphModule:
    """A copy of ``step`` computing only ``outputs``; for decode the cache points become inputs
    after the three token inputs. Its inputs still have the step graph's length (see
    :class:`_Prefill` and :class:`_Decode`, which adapt them)."""
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    stops = set(points.values()) if part == 1 else set()
    needed = _ancestors([o[0] if isinstance(o, tuple) else o for o in outputs], stop=stops)
    for node in step.graph.find_nodes(op="placeholder"):
        env[node] = graph.placeholder(str(node.target))
    if part == 1:
        for key in sorted(points):
            if points[key] in needed:
                env[points[key]] = graph.placeholder(_cache_name(*key))
    for node in step.graph.nodes:
        if node.op == "placeholder" or node not in needed or node in env:
            continue
        env[node] = graph.node_copy(node, lambda n: env[n])
    graph.output(
        tuple(
            graph.call_function(operator.getitem, (env[o[0]], o[1]))
            if isinstance(o, tuple)
            else env[o]
            for o in outputs
        )
    )
    gm = torch.fx.GraphModule(step, graph)
    gm.recompile()
    return gm


def _ancestors(outputs: list[torch.fx.Node], stop: set[torch.fx.Node]) -> set[torch.fx.Node]:
    seen: set[torch.fx.Node] = set()
    stack = list(outputs)
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node in stop:
            continue
        stack.extend(node.all_input_nodes)
    return seen


class _Prefill(torch.nn.Module):
    """The prefill cut on a prompt: one throw-away column appended, which its step parts drop
    (the cut's shape arithmetic is the step graph's, where the prefix is ``length - 1``)."""

    def __init__(self, cut: torch.fx.GraphModule) -> None:
        super().__init__()
        self.cut = cut

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> Any:
        return self.cut(
            torch.cat([input_ids, input_ids[:, -1:]], 1),
            torch.cat([attention_mask, attention_mask[:, -1:]], 1),
            torch.cat([position_ids, position_ids[:, -1:]], 1),
        )


class _DecodeBase(torch.nn.Module):
    """The decode cut on one token: ids and positions left-filled to the mask's length (the
    step parts read the last column only)."""

    def __init__(self, cut: torch.fx.GraphModule) -> None:
        super().__init__()
        self.cut = cut

    def _run(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache: tuple[torch.Tensor, ...],
    ) -> Any:
        fill = attention_mask[:, 1:].to(input_ids.dtype) * 0
        return self.cut(
            torch.cat([fill, input_ids], 1),
            attention_mask,
            torch.cat([fill.to(position_ids.dtype), position_ids], 1),
            *cache,
        )


def _decode_module(cut: torch.fx.GraphModule, cache_names: list[str]) -> torch.nn.Module:
    """A :class:`_DecodeBase` whose forward names every cache input (so the export, the graph
    and ONNX name them too)."""
    if not all(name.isidentifier() for name in cache_names):
        raise ValueError(f"cache names must be identifiers: {cache_names}")
    params = ", ".join(cache_names)
    source = (
        f"def forward(self, input_ids, attention_mask, position_ids, {params}):\n"
        f"    return self._run(input_ids, attention_mask, position_ids, ({params},))\n"
    )
    namespace: dict[str, Any] = {}
    exec(source, namespace)  # generated from the validated names above only
    cls = type("Decode", (_DecodeBase,), {"forward": namespace["forward"]})
    return cls(cut)


def _retrace(
    step: torch.fx.GraphModule,
    prefill: torch.fx.GraphModule,
    decode: torch.fx.GraphModule,
    cache: tuple[tuple[int, int], ...],
    trace_: Any,
) -> CausalLMGraphs:
    """Export both cut graphs again (fresh metadata, dynamic dims), weights shared with ``step``."""
    ids, mask, pos = trace_.example_inputs
    prefill_gm = trace(
        _Prefill(prefill),
        (ids, mask, pos),
        dynamic_shapes={
            "input_ids": {0: "batch", 1: "seq"},
            "attention_mask": {0: "batch", 1: "seq"},
            "position_ids": {0: "batch", 1: "seq"},
        },
    )
    with torch.no_grad():
        caches = prefill_gm(ids, mask, pos)[1:]
    next_ids = ids[:, -1:]
    next_mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    next_pos = positions(next_mask)[:, -1:]
    cache_names = [_cache_name(layer, kind) for layer, kind in cache]
    past = torch.export.Dim("past", min=1)
    batch = torch.export.Dim("batch")
    dynamic = {
        "input_ids": {0: batch},
        "attention_mask": {0: batch, 1: past + 1},
        "position_ids": {0: batch},
        **{
            _cache_name(layer, kind): {0: batch, 2: past} if grows(kind) else {0: batch}
            for layer, kind in cache
        },
    }
    decode_gm = trace(
        _decode_module(decode, cache_names),
        (next_ids, next_mask, next_pos, *caches),
        dynamic_shapes=dynamic,
    )
    for gm in (prefill_gm, decode_gm):
        _strip_prefix(gm, "cut")
        _share_weights(step, gm)
        gm_info = trace_info(gm)
        assert gm_info is not None
        gm.meta[TRACE_INFO_KEY] = dataclasses.replace(
            gm_info,
            model_class=trace_.model_class,
            model_type=trace_.model_type,
            config=trace_.config,
            max_positions=trace_.max_positions,
        )
        for key, value in step.meta.items():  # what passes recorded (vocabulary maps, ...)
            if key not in (TRACE_INFO_KEY, STEP_KEY, "rewriter.store"):
                gm.meta.setdefault(key, value)
    return CausalLMGraphs(prefill_gm, decode_gm, cache)


def _share_weights(step: torch.fx.GraphModule, gm: torch.fx.GraphModule) -> None:
    """Bind ``gm``'s tensors to ``step``'s by name (a trace clones them)."""
    named = [
        *gm.named_parameters(remove_duplicate=False),
        *gm.named_buffers(remove_duplicate=False),
    ]
    for name, _ in named:
        try:
            source = get_tensor(step, name)
        except AttributeError:
            continue
        set_tensor(gm, name, source)


def _strip_prefix(gm: torch.fx.GraphModule, prefix: str) -> None:
    """Move every tensor under ``prefix.`` (a tracing wrapper's attribute) to the root, so the
    graph's weights have the model's own names (what ``save_pretrained`` and checkpoints use)."""
    lead = prefix + "."
    tensors = {
        name: tensor
        for name, tensor in [
            *gm.named_parameters(remove_duplicate=False),
            *gm.named_buffers(remove_duplicate=False),
        ]
        if name.startswith(lead)
    }
    for node in gm.graph.find_nodes(op="get_attr"):
        if str(node.target).startswith(lead):
            node.target = str(node.target)[len(lead) :]
    wrapper = getattr(gm, prefix, None)
    if isinstance(wrapper, torch.nn.Module):
        delattr(gm, prefix)
    for name, tensor in tensors.items():
        set_tensor(gm, name[len(lead) :], tensor)
    for node in gm.graph.nodes:  # module paths too: weights passes add are named after them
        stack = node.meta.get("nn_module_stack")
        if stack:
            node.meta["nn_module_stack"] = {
                key: (_unprefixed(path, prefix), cls) for key, (path, cls) in stack.items()
            }
    gm.recompile()


def _unprefixed(path: str, prefix: str) -> str:
    if path == prefix:
        return ""
    return path[len(prefix) + 1 :] if path.startswith(prefix + ".") else path


# --- generation -----------------------------------------------------------------------------------


@dataclasses.dataclass
class GenerationResult:
    """Generated token ids (the graph's ids), per prompt, and their text when a tokenizer was
    given."""

    tokens: torch.Tensor
    """[batch, new tokens]; finished rows are padded with the pad id."""
    texts: list[str] | None
    prompt_tokens: torch.Tensor
    seconds_prefill: float
    seconds_decode: float


def generate(
    graphs: Any,
    tokenizer: Any = None,
    prompts: Sequence[str] | torch.Tensor | None = None,
    max_new_tokens: int = 32,
    *,
    attention_mask: torch.Tensor | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
) -> GenerationResult:
    """Generate with a prefill and a decode graph (torch :class:`CausalLMGraphs`, or ONNX Runtime
    sessions from ``rewriter.backends.onnx.export_causal_lm``; anything with ``run_prefill``,
    ``run_decode`` and ``vocab``): greedy by default, or sampled (temperature, top-k, top-p).

    ``prompts`` are strings (encoded with ``tokenizer``, left-padded) or a [B, T] id tensor with
    its ``attention_mask``. Rows stop at ``eos_token_id`` (default: the tokenizer's) and are
    padded after it, like Hugging Face ``generate``. A graph whose vocabulary was trimmed takes
    and returns its own ids; its rebuilt tokenizer is used when it has one.
    """
    import time

    vmap = graphs.vocab
    if vmap is not None and vmap.tokenizer is not None:
        tokenizer = vmap.tokenizer
    eos = eos_token_id if eos_token_id is not None else _token_id(tokenizer, "eos_token_id")
    pad = pad_token_id if pad_token_id is not None else _token_id(tokenizer, "pad_token_id")
    pad = pad if pad is not None else (eos if eos is not None else 0)
    # Prompts are padded with a real token (masked out): the pad id, else the tokenizer's EOS.
    candidates = (pad, _token_id(tokenizer, "eos_token_id"))
    fill = next((v for v in candidates if v is not None and v >= 0), 0)
    ids, mask = _encode_prompts(tokenizer, prompts, attention_mask, fill)
    generator = torch.Generator().manual_seed(seed)
    pick = _Picker(do_sample, temperature, top_k, top_p, generator, vmap)

    start = time.perf_counter()
    logits, cache = graphs.run_prefill(ids, mask, positions(mask))
    seconds_prefill = time.perf_counter() - start
    start = time.perf_counter()
    new: list[torch.Tensor] = []
    done = torch.zeros(ids.shape[0], dtype=torch.bool)
    for step in range(max_new_tokens):
        token = pick(logits[:, -1])
        token = torch.where(done, torch.full_like(token, pad), token)
        new.append(token)
        if eos is not None:
            done |= token == eos
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        logits, cache = graphs.run_decode(token[:, None], mask, positions(mask)[:, -1:], cache)
    seconds_decode = time.perf_counter() - start
    tokens = torch.stack(new, 1) if new else ids.new_zeros((ids.shape[0], 0))
    texts = None
    if tokenizer is not None and hasattr(tokenizer, "decode"):
        texts = [tokenizer.decode(row.tolist(), skip_special_tokens=True) for row in tokens]
    return GenerationResult(tokens, texts, ids, seconds_prefill, seconds_decode)


def _token_id(tokenizer: Any, attribute: str) -> int | None:
    value = getattr(tokenizer, attribute, None)
    return value if isinstance(value, int) else None


def _encode_prompts(
    tokenizer: Any, prompts: Any, attention_mask: torch.Tensor | None, pad: int
) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(prompts, torch.Tensor):
        ids = prompts if prompts.dim() == 2 else prompts.view(1, -1)
        mask = attention_mask if attention_mask is not None else torch.ones_like(ids)
        return ids.long(), mask.long()
    if tokenizer is None or prompts is None:
        raise RewriterError("generate() needs prompts as text with a tokenizer, or as token ids")
    texts = [prompts] if isinstance(prompts, str) else prompts
    rows = [encode(tokenizer, text).tolist() for text in texts]
    if any(not row for row in rows):
        raise RewriterError("an empty prompt: every prompt needs at least one token")
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):  # left padding: the last column is every row's last token
        ids[i, width - len(row) :] = torch.tensor(row)
        mask[i, width - len(row) :] = 1
    return ids, mask


class _Picker:
    """Next token from last-position logits: argmax, or a sample after temperature/top-k/top-p.
    Returns the id the graphs take (a trimmed graph's logits index its own ids in either mode)."""

    def __init__(
        self,
        do_sample: bool,
        temperature: float,
        top_k: int,
        top_p: float,
        generator: torch.Generator,
        vmap: Any,
    ) -> None:
        if temperature <= 0:
            raise ValueError("temperature must be > 0 (use do_sample=False for greedy)")
        self.do_sample, self.temperature, self.top_k, self.top_p = (
            do_sample,
            temperature,
            top_k,
            top_p,
        )
        self.generator = generator
        self.back = vmap.kept if vmap is not None and vmap.ids == "original" else None

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        logits = torch.as_tensor(logits).float()
        if not self.do_sample:
            index = logits.argmax(-1)
        else:
            scores = logits / self.temperature
            if self.top_k > 0:
                kth = scores.topk(min(self.top_k, scores.shape[-1]), -1).values[..., -1:]
                scores = scores.masked_fill(scores < kth, -math.inf)
            if self.top_p < 1.0:
                ordered, order = scores.sort(-1, descending=True)
                cumulative = ordered.softmax(-1).cumsum(-1)
                drop = cumulative - ordered.softmax(-1) > self.top_p
                scores = scores.scatter(-1, order, ordered.masked_fill(drop, -math.inf))
            index = torch.multinomial(scores.softmax(-1), 1, generator=self.generator)[:, 0]
        return index if self.back is None else self.back[index]


def agreement(
    reference: Any,
    candidate: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int = 32,
) -> dict[str, Any]:
    """How closely ``candidate`` (an approximate rewrite) generates like ``reference``, greedily.

    Returns the fraction of generated positions with the same token, the mean length of the
    common prefix (generation diverges for good after the first different token), and the
    texts. Tokens are compared as ids of the original vocabulary (a trimmed graph's are mapped
    back).
    """
    first = generate(reference, tokenizer, prompts, max_new_tokens, eos_token_id=-1)
    second = generate(candidate, tokenizer, prompts, max_new_tokens, eos_token_id=-1)
    a, b = _original_tokens(reference, first.tokens), _original_tokens(candidate, second.tokens)
    same = a == b
    prefix = [int(row.long().cumprod(0).sum()) for row in same]
    return {
        "token_agreement": float(same.float().mean()),
        "common_prefix": sum(prefix) / len(prefix),
        "common_prefix_per_prompt": prefix,
        "new_tokens": int(a.shape[1]),
        "reference_texts": first.texts,
        "candidate_texts": second.texts,
    }


def _original_tokens(graphs: Any, tokens: torch.Tensor) -> torch.Tensor:
    vmap = graphs.vocab
    if vmap is None:
        return tokens
    return vmap.original_ids(tokens)
