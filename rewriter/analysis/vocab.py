"""Vocabularies of traced graphs: which tensors are indexed by token id, and trimmed id maps.

Two things live here, both used by ``vocab-trim`` and by everything that must understand a graph
whose vocabulary was trimmed (verification, perplexity, export, saving):

* :func:`analyze` finds, by graph analysis, every use of the vocabulary: the token-id inputs,
  the tables they index (word embeddings, any other per-token tensor), the LM heads and the
  tensors added to their logits (biases), the graph outputs that are logits, and the other
  readers of token ids (``ids == pad_id`` comparisons). What it does not understand it names.
* :class:`VocabMap` records a trim on the graph (``gm.meta["rewriter.vocab"]``): the kept ids of
  the vocabulary the graph was traced with, and whether the graph's token inputs are the new
  contiguous ids (``ids="new"``, the rebuilt-tokenizer mode) or still the original ids
  (``ids="original"``, the id-map mode). :func:`translate_inputs` and :func:`gather_outputs`
  let two graphs with different vocabularies be compared on the same text.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.fx

import rewriter.ops  # noqa: F401 - the marker ops named below
from rewriter.context import is_text
from rewriter.errors import PreconditionError
from rewriter.ir.graph import as_linear, is_metadata_reader, is_transparent

__all__ = [
    "ID_MAP_KEY",
    "VOCAB_KEY",
    "VocabMap",
    "VocabUse",
    "analyze",
    "from_original",
    "gather_outputs",
    "project",
    "same_vocab",
    "to_original",
    "token_positions",
    "translate_inputs",
    "vocab_map",
]

VOCAB_KEY = "rewriter.vocab"
ID_MAP_KEY = "rewriter.vocab.id_map"
"""Node meta flag of the lookup that maps original ids to rows (``ids="original"`` graphs)."""

aten = torch.ops.aten

_ELEMENTWISE_UNARY = {
    aten.tanh.default,
    aten.neg.default,
    aten.clamp.default,
    aten.abs.default,
}
_ELEMENTWISE_BINARY = {
    aten.add.Tensor,
    aten.sub.Tensor,
    aten.mul.Tensor,
    aten.div.Tensor,
    aten.add.Scalar,
    aten.sub.Scalar,
    aten.mul.Scalar,
    aten.div.Scalar,
}
_ID_COMPARISONS = {aten.eq.Scalar, aten.ne.Scalar}


# --- the id map -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class VocabMap:
    """A trimmed vocabulary, relative to the vocabulary the graph was traced with.

    New id ``i`` is original id ``kept[i]``; ``kept`` is sorted, so the relative order of tokens
    is preserved. Logits outputs are over the kept ids, in new-id order, in both modes.
    """

    kept: torch.Tensor
    """Sorted original ids that remain (int64, one per new id)."""
    original_size: int
    """Size of the vocabulary the graph was traced with."""
    ids: Literal["new", "original"]
    """What the graph's token inputs are: new contiguous ids (the tokenizer was rebuilt) or the
    original ids (the graph maps them to rows itself; removed ids read the ``filler`` row)."""
    token_inputs: tuple[str, ...]
    """Names of the graph inputs that carry token ids."""
    vocab_outputs: tuple[int, ...]
    """Flat positions of the graph outputs whose last dimension is the vocabulary."""
    filler: int
    """Original id that stands in for a removed id when inputs are projected onto the kept set
    (the unknown token when it is kept, else the first kept id)."""
    tokenizer: Any = None
    """The rebuilt tokenizer (``ids="new"``), if the trim had one to rebuild."""

    @property
    def size(self) -> int:
        return int(self.kept.numel())

    def positions(self, original_ids: torch.Tensor) -> torch.Tensor:
        """New ids of original ids (-1 where the id was removed)."""
        table = torch.full((self.original_size,), -1, dtype=torch.long)
        table[self.kept] = torch.arange(self.size)
        return table[original_ids.long()]

    def to_original(self, new_ids: torch.Tensor) -> torch.Tensor:
        """Original ids of new ids (the map back from logits indices)."""
        return self.kept[new_ids.long()]

    def graph_ids(self, original_ids: torch.Tensor) -> torch.Tensor:
        """What the graph takes for original ids (all of which must be kept)."""
        if self.ids == "original":
            return original_ids
        new = self.positions(original_ids)
        if bool((new < 0).any()):
            removed = original_ids[new < 0].unique()[:8].tolist()
            raise ValueError(f"ids {removed} were removed from the vocabulary")
        return new.to(original_ids.dtype)

    def original_ids(self, graph_ids: torch.Tensor) -> torch.Tensor:
        """Original ids of what the graph takes."""
        if self.ids == "original":
            return graph_ids
        return self.to_original(graph_ids).to(graph_ids.dtype)

    def project(self, original_ids: torch.Tensor) -> torch.Tensor:
        """Original ids with every removed id replaced by ``filler``."""
        kept = self.positions(original_ids) >= 0
        return torch.where(kept, original_ids, torch.full_like(original_ids, self.filler))

    def then(self, later: VocabMap) -> VocabMap:
        """This trim followed by ``later`` (whose ``kept`` indexes this map's new ids)."""
        return dataclasses.replace(
            later, kept=self.kept[later.kept], original_size=self.original_size
        )

    def describe(self) -> str:
        return f"{self.size} of {self.original_size} tokens kept (inputs: {self.ids} ids)"


def vocab_map(model: Any) -> VocabMap | None:
    """The trim recorded on a traced graph, or None (an untrimmed graph or a plain module)."""
    meta = getattr(model, "meta", None)
    found = meta.get(VOCAB_KEY) if isinstance(meta, dict) else None
    return found if isinstance(found, VocabMap) else None


def token_positions(names: Sequence[str] | None, *maps: VocabMap | None) -> list[int]:
    """Positions of the token-id inputs among flat inputs named ``names`` (first input if
    unnamed), from whichever map knows them."""
    known = next((m.token_inputs for m in maps if m is not None), ())
    if names is None:
        return [0]
    return [i for i, name in enumerate(names) if name in known]


def to_original(
    inputs: Sequence[torch.Tensor], tokens: Sequence[int], vmap: VocabMap | None
) -> tuple[torch.Tensor, ...]:
    """Flat inputs of a graph with vocabulary ``vmap`` with token ids made original ids."""
    if vmap is None:
        return tuple(inputs)
    return tuple(vmap.original_ids(t) if i in tokens else t for i, t in enumerate(inputs))


def from_original(
    inputs: Sequence[torch.Tensor], tokens: Sequence[int], vmap: VocabMap | None
) -> tuple[torch.Tensor, ...]:
    """Flat inputs with original token ids made the ids a graph with ``vmap`` takes."""
    if vmap is None:
        return tuple(inputs)
    return tuple(vmap.graph_ids(t) if i in tokens else t for i, t in enumerate(inputs))


def project(
    inputs: Sequence[torch.Tensor], tokens: Sequence[int], vmap: VocabMap
) -> tuple[torch.Tensor, ...]:
    """Flat inputs with original token ids, removed ones replaced by ``vmap``'s filler."""
    return tuple(vmap.project(t) if i in tokens else t for i, t in enumerate(inputs))


def translate_inputs(
    inputs: Sequence[torch.Tensor],
    names: Sequence[str] | None,
    source: VocabMap | None,
    target: VocabMap | None,
    *,
    project_removed: bool = True,
) -> tuple[torch.Tensor, ...]:
    """Inputs for a graph with vocabulary ``source`` rewritten for one with ``target``; ids
    ``target`` removed become its filler (``project_removed``) or raise ``ValueError``."""
    if source is None and target is None:
        return tuple(inputs)
    tokens = token_positions(names, target, source)
    original = to_original(inputs, tokens, source)
    if project_removed and target is not None:
        original = project(original, tokens, target)
    return from_original(original, tokens, target)


def gather_outputs(
    outputs: list[torch.Tensor], reference: VocabMap | None, candidate: VocabMap | None
) -> list[torch.Tensor]:
    """The reference's logits restricted to the candidate's vocabulary (the candidate's kept
    ids must all be in the reference's), so the two can be compared element by element."""
    if candidate is None:
        return outputs
    if reference is None:
        index = candidate.kept
    else:
        index = reference.positions(candidate.kept)
        if bool((index < 0).any()):
            raise ValueError("the candidate keeps ids that the reference removed")
    out = list(outputs)
    for position in candidate.vocab_outputs:
        if position < len(out):
            tensor = out[position]
            out[position] = tensor.index_select(-1, index.to(tensor.device))
    return out


def same_vocab(a: VocabMap | None, b: VocabMap | None) -> bool:
    """True when two graphs take the same ids and return logits over the same vocabulary."""
    if a is None or b is None:
        return a is b
    return a.ids == b.ids and a.original_size == b.original_size and torch.equal(a.kept, b.kept)


# --- analysis -------------------------------------------------------------------------------------


@dataclasses.dataclass
class VocabTensor:
    """A stored tensor with one axis indexed by token id."""

    name: str
    axis: int
    role: str
    """``"embedding"``, ``"head"``, ``"head-bias"``, ``"logit-bias"`` or ``"token-table"``."""
    nodes: list[torch.fx.Node]


@dataclasses.dataclass
class VocabUse:
    """Every use of the vocabulary in a graph, as :func:`analyze` found it."""

    size: int
    """The vocabulary size (rows of the word embedding / outputs of the LM head)."""
    token_inputs: list[torch.fx.Node]
    tensors: dict[str, VocabTensor]
    """Vocab-indexed tensors by name (a tied embedding and head appear once, role ``"head"``)."""
    lookups: list[torch.fx.Node]
    """``embedding`` / ``index`` nodes that read a table at token ids."""
    id_comparisons: list[torch.fx.Node]
    """``ids == c`` / ``ids != c`` nodes: ``c`` is a token id and must be renumbered."""
    reshapes: list[torch.fx.Node]
    """Views/reshapes on the logits path whose literal shape names the vocabulary size."""
    vocab_outputs: list[int]
    """Flat output positions that carry logits."""
    logit_nodes: list[torch.fx.Node]
    """Every node on the logits path whose last dimension is the vocabulary."""


def analyze(gm: torch.fx.GraphModule) -> VocabUse:
    """Find every vocab-indexed tensor and token-id reader of ``gm``; refuse what is unclear.

    Token inputs are integer placeholders that index an embedding table; the vocabulary size is
    the row count of the largest such table. LM heads are linear maps with that many outputs
    whose result reaches a graph output through elementwise ops; tensors combined with logits
    along the vocabulary (biases) are vocab-indexed too. Raises :class:`PreconditionError`
    naming the node for a use the trim could not keep exact (a softmax over the vocabulary,
    token ids fed to an op other than a lookup or an id comparison).
    """
    lookups = _token_lookups(gm)
    if not lookups:
        raise PreconditionError(
            "no embedding lookup reads a token-id input: the graph has no vocabulary to trim"
        )
    size = max(int(_table(node).meta["val"].shape[0]) for node in lookups)
    word = [n for n in lookups if int(_table(n).meta["val"].shape[0]) == size]
    token_inputs = sorted(
        {_source_placeholder(n) for n in word}, key=lambda n: list(gm.graph.nodes).index(n)
    )
    use = VocabUse(size, token_inputs, {}, [], [], [], [], [])
    for node in word:
        table = _table(node)
        use.lookups.append(node)
        _add_tensor(
            use,
            table,
            0,
            "embedding" if node.target == aten.embedding.default else "token-table",
            node,
        )
    _check_token_readers(use)
    _find_heads(gm, use)
    return use


def _table(lookup: torch.fx.Node) -> torch.fx.Node:
    return lookup.args[0]  # type: ignore[return-value]


def _index(lookup: torch.fx.Node) -> Any:
    if lookup.target == aten.embedding.default:
        return lookup.args[1]
    return lookup.args[1][0]  # aten.index.Tensor(table, [ids])


def _source_placeholder(lookup: torch.fx.Node) -> torch.fx.Node:
    source = _token_source(_index(lookup))
    assert source is not None
    return source


def _token_source(index: Any) -> torch.fx.Node | None:
    """The integer graph input ``index`` is a view of (seeing through an id-map lookup)."""
    if not isinstance(index, torch.fx.Node):
        return None
    source = _id_look_back(index)
    if source.meta.get(ID_MAP_KEY):
        source = _id_look_back(source.args[1][0])
    val = source.meta.get("val")
    if source.op != "placeholder" or not isinstance(val, torch.Tensor):
        return None
    return None if val.is_floating_point() else source


_ID_VIEWS = {
    aten.view.default,
    aten.reshape.default,
    aten._unsafe_view.default,
    aten.unsqueeze.default,
    aten.squeeze.dim,
    aten.expand.default,
    aten.slice.Tensor,
    aten.select.int,
    aten.clone.default,
    aten.alias.default,
    aten.contiguous.default,
    aten._to_copy.default,
    aten.to.dtype,
    torch.ops.rewriter.step_part.default,
}
"""Ops that move or select ids without changing their values (any shape change is fine: a
lookup is elementwise in the ids)."""


def _id_look_back(node: torch.fx.Node) -> torch.fx.Node:
    while node.op == "call_function" and node.target in _ID_VIEWS:
        node = node.args[0]  # type: ignore[assignment]
    return node


def _token_lookups(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    """Lookups of a stored floating-point table at (views of) an integer graph input."""
    found = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.meta.get(ID_MAP_KEY):
            continue
        if node.target == aten.index.Tensor and len(node.args[1]) != 1:
            continue
        if node.target not in (aten.embedding.default, aten.index.Tensor):
            continue
        table = node.args[0]
        if not isinstance(table, torch.fx.Node) or table.op != "get_attr":
            continue
        if not table.meta["val"].is_floating_point():
            continue
        if _token_source(_index(node)) is not None:
            found.append(node)
    return found


def _add_tensor(
    use: VocabUse, node: torch.fx.Node, axis: int, role: str, reader: torch.fx.Node
) -> None:
    name = str(node.target)
    entry = use.tensors.get(name)
    if entry is None:
        use.tensors[name] = VocabTensor(name, axis, role, [reader])
        return
    if entry.axis != axis:
        raise PreconditionError(
            f"tensor '{name}' is indexed by token id along axis {entry.axis} in one place and "
            f"{axis} in another",
            reader,
        )
    if role == "head":
        entry.role = "head"  # a tied embedding and head
    entry.nodes.append(reader)


def _check_token_readers(use: VocabUse) -> None:
    """Token ids may be looked up, compared with an id, or have their shape read; nothing else."""
    lookups = set(use.lookups)
    for placeholder in use.token_inputs:
        stack, seen = list(placeholder.users), set()
        while stack:
            user = stack.pop()
            if user in seen or user in lookups or is_metadata_reader(user):
                continue
            if user.meta.get(ID_MAP_KEY):
                continue
            seen.add(user)
            if user.op == "call_module" and str(user.target).startswith("_guards"):
                continue
            if user.op == "call_function" and user.target in _ID_VIEWS:
                stack.extend(user.users)
                continue
            if user.target in _ID_COMPARISONS and isinstance(user.args[1], int):
                use.id_comparisons.append(user)
                continue
            raise PreconditionError(
                f"token ids reach an op the trim cannot renumber ({user.target}); only lookups, "
                "id comparisons and shape reads are understood",
                user,
            )


def _find_heads(gm: torch.fx.GraphModule, use: VocabUse) -> None:
    """LM heads: linear maps with ``size`` outputs whose value reaches a graph output through
    nodes whose last dimension stays the vocabulary."""
    flat_outputs = _flat_output_nodes(gm.graph.output_node())
    reaches: dict[torch.fx.Node, bool] = {}
    for node in reversed(gm.graph.nodes):  # users come after their inputs
        # Not through another linear map: it mixes the last dimension, so what flows on is not
        # these logits (a width equal to the vocabulary size would otherwise make every block's
        # output projection look like a head).
        reaches[node] = any(
            user.op == "output"
            or (
                _last_dim_is(user, use.size)
                and reaches.get(user, False)
                and as_linear(user) is None
            )
            for user in node.users
        )
    for node in gm.graph.nodes:
        lin = as_linear(node)
        if lin is None or lin.out_features != use.size or not reaches[lin.output]:
            continue
        _follow_logits(lin.output, use, flat_outputs, reaches)
        _add_tensor(use, lin.weight, lin.out_dim, "head", lin.node)
        if lin.bias is not None:
            _add_tensor(use, lin.bias, 0, "head-bias", lin.output)
    use.vocab_outputs.sort()


def _last_dim_is(node: torch.fx.Node, size: int) -> bool:
    val = node.meta.get("val")
    return isinstance(val, torch.Tensor) and val.dim() > 0 and val.shape[-1] == size


def _flat_output_nodes(output: torch.fx.Node) -> list[Any]:
    flat: list[Any] = []

    def visit(value: Any) -> None:
        if isinstance(value, (list, tuple)):
            for item in value:
                visit(item)
        elif isinstance(value, dict):
            for item in value.values():
                visit(item)
        else:
            flat.append(value)

    visit(output.args[0])
    return flat


def _follow_logits(
    start: torch.fx.Node,
    use: VocabUse,
    flat_outputs: list[Any],
    reaches: dict[torch.fx.Node, bool],
) -> None:
    """Walk the logits forward from a head to the outputs; every op on the way must keep each
    logit independent of the others (anything across the vocabulary is refused)."""
    stack, seen = [start], set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        use.logit_nodes.append(node)
        for user in node.users:
            if is_metadata_reader(user):
                continue
            if user.op == "output":
                for position, value in enumerate(flat_outputs):
                    if value is node and position not in use.vocab_outputs:
                        use.vocab_outputs.append(position)
                continue
            if _passes_logits(user, node, use) and reaches.get(user, False):
                stack.append(user)
                continue
            raise PreconditionError(
                f"the logits flow into {user.target}, which the trim cannot keep exact (an op "
                "across the vocabulary: a softmax over fewer tokens renormalizes)",
                user,
            )


def _passes_logits(user: torch.fx.Node, source: torch.fx.Node, use: VocabUse) -> bool:
    """True if ``user`` maps each logit independently (recording tensors it combines with)."""
    if user.op != "call_function":
        return False
    if user.target in (aten.view.default, aten.reshape.default, aten._unsafe_view.default):
        shape = list(user.args[1])
        if shape and shape[-1] == use.size:
            use.reshapes.append(user)
            return True
        return is_transparent(user)
    if is_transparent(user):
        return True
    if user.target == aten.cat.default:  # logits of several parts joined along time
        dim = user.args[1] if len(user.args) > 1 else 0
        rank = source.meta["val"].dim()
        return dim % rank != rank - 1
    if user.target in _ELEMENTWISE_UNARY:
        return user.args[0] is source
    if user.target in _ELEMENTWISE_BINARY:
        for other in user.args[:2]:
            if other is source or not isinstance(other, torch.fx.Node):
                continue  # the logits themselves, or a scalar
            val = other.meta.get("val")
            last = val.shape[-1] if isinstance(val, torch.Tensor) and val.dim() else 1
            if last == 1:
                continue  # broadcast along the vocabulary
            if other.op == "get_attr" and last == use.size:
                _add_tensor(use, other, val.dim() - 1, "logit-bias", user)
                continue
            return False
        return True
    return False


# --- data for a trimmed graph ---------------------------------------------------------------------


def adapt_context(ctx: Any, source: VocabMap | None, target: VocabMap | None) -> Any:
    """A copy of a :class:`~rewriter.context.PassContext` whose data speak ``target``'s ids.

    The context's data are in the ids of a graph with vocabulary ``source`` (the pipeline's
    input). Text gets the rebuilt tokenizer; token-id data are renumbered (ids the trim removed
    become the filler token); a graph that still takes original ids needs nothing.
    """
    if same_vocab(source, target):
        return ctx
    changes: dict[str, Any] = {}
    if target is not None and target.ids == "new" and target.tokenizer is not None:
        changes["tokenizer"] = target.tokenizer
    for field in ("calibration", "evaluation"):
        data = getattr(ctx, field)
        if data is None or is_text(data):
            continue
        changes[field] = _renumber_data(data, source, target)
    if ctx.example_inputs is not None:
        changes["example_inputs"] = None  # the pipeline carries the trace's examples itself
    return dataclasses.replace(ctx, **changes)


def _renumber(ids: Any, source: VocabMap | None, target: VocabMap | None) -> torch.Tensor:
    return translate_inputs([torch.as_tensor(ids)], None, source, target)[0]


def _renumber_data(data: Any, source: VocabMap | None, target: VocabMap | None) -> Any:
    if isinstance(data, torch.Tensor):
        return _renumber(data, source, target)
    out = []
    for batch in data:
        if isinstance(batch, dict):
            out.append({**batch, "input_ids": _renumber(batch["input_ids"], source, target)})
        else:
            out.append(_renumber(batch, source, target))
    return out
