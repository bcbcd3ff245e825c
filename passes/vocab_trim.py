"""``vocab-trim``: keep the tokens a corpus uses, slice every vocab-indexed tensor, rebuild the
tokenizer.

Keep set: the ids the context's corpus uses at least ``min_freq`` times (optionally only the
``top_n`` most frequent), every special token, the ids the model config names (bos, eos, pad...),
and the user's ``keep``/``keep_tokens``. With a tokenizer the set is closed so that the trimmed
tokenizer encodes the corpus exactly as before: for BPE every token on a kept token's merge path
stays, and byte-level BPE keeps its byte alphabet (any text still encodes); WordPiece keeps its
single characters, Unigram its byte pieces (see :mod:`rewriter.tokenizer_trim`).

Graph: :func:`rewriter.vocab.analyze` finds the token inputs, the tables they index, the LM heads
and anything added to the logits; each such tensor keeps the rows of the kept ids, in order
(a tied embedding and head stay one tensor). Two modes:

``mode=rebuilt`` (default)
    Token inputs are the new contiguous ids (new id ``i`` is original id ``kept[i]``); the
    tokenizer is rebuilt with those ids and recorded on the graph with the map; config special
    ids and ``vocab_size`` are renumbered, so ``rewriter.save_pretrained`` writes a Hugging Face
    directory with the new tokenizer.
``mode=id-map``
    The old tokenizer stays: the graph maps original ids to rows itself (a removed id reads the
    unknown token's row, or the first kept one) and returns logits over the kept ids;
    ``rewriter.vocab.vocab_map(gm).to_original`` maps logits indices back.

Exact in the sense the verifier checks: on inputs made of kept tokens, the logits equal the
original logits at the kept ids (the comparison translates ids and gathers the reference's
logits; see :mod:`rewriter.vocab`). A softmax over the kept logits renormalizes, so
perplexities are those of the original renormalized over the kept ids.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, ClassVar, Literal

import torch
import torch.fx

from rewriter.analysis.vocab import ID_MAP_KEY, VOCAB_KEY, VocabMap, VocabUse, analyze, vocab_map
from rewriter.context import PassContext, is_text
from rewriter.io import tokenizer_trim
from rewriter.ir.graph import refresh_meta
from rewriter.ir.store import Block, Edit
from rewriter.ir.trace import TRACE_INFO_KEY, trace_info
from rewriter.pipeline import Pass, PassResult, option, refuse
from rewriter.rewrite.driver import Rewriter

__all__ = ["VocabTrimPass"]

aten = torch.ops.aten


@dataclasses.dataclass(frozen=True)
class VocabTrimPass(Pass):
    """Keep the tokens a corpus uses: slice the embedding, LM head and biases; rebuild the
    tokenizer."""

    name: ClassVar[str] = "vocab-trim"

    mode: Literal["rebuilt", "id-map"] = option(
        "rebuilt",
        "rebuilt: new contiguous ids and a rebuilt tokenizer; id-map: the old "
        "tokenizer stays and the graph maps its ids",
    )
    source: Literal["calibration", "evaluation"] = option(
        "calibration", "Which context data is the corpus to keep tokens of."
    )
    min_freq: int = option(1, "Keep ids used at least this many times in the corpus.")
    top_n: int | None = option(
        None, "Keep only the n most frequent corpus ids (before specials and closure; lossy)."
    )
    keep: tuple[int, ...] = option((), "Ids kept whatever the corpus says.")
    keep_tokens: tuple[str, ...] = option((), "Tokens (strings) kept whatever the corpus says.")

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        previous = vocab_map(gm)
        if previous is not None and (previous.ids == "new") != (self.mode == "rebuilt"):
            raise refuse(
                f"pass '{self.name}': the graph was trimmed with inputs as {previous.ids} ids; "
                f"trimming it again with mode={self.mode} would mix id spaces"
            )
        use = analyze(gm)
        tokenizer = _tokenizer(previous, ctx)
        input_size = previous.original_size if previous and previous.ids == "original" else use.size
        corpus = _Corpus.load(ctx, self.source, tokenizer, input_size, self.name)
        keep_input = self._keep_set(corpus, tokenizer, gm, input_size)
        rows = _rows_of(keep_input, previous)  # kept rows of the current tables, sorted
        if rows.numel() == use.size:
            return PassResult(gm, changed=False, notes=["every token is used: nothing to trim"])
        new_tokenizer = None
        if self.mode == "rebuilt" and tokenizer is not None:
            new_tokenizer = tokenizer_trim.rebuild(tokenizer, rows.tolist())
        before = _sizes(gm)
        rw = Rewriter(gm, pass_name=self.name, propagate_meta=False)
        self._rewrite(rw, use, rows, previous, tokenizer)
        refresh_meta(gm)
        rw.finish(prune_weights=True)
        after = _sizes(gm)

        trim = VocabMap(
            kept=rows,
            original_size=use.size,
            ids="new" if self.mode == "rebuilt" else "original",
            token_inputs=_input_names(gm, use),
            vocab_outputs=tuple(use.vocab_outputs),
            filler=int(_filler_row(rows, tokenizer, previous)),
            tokenizer=new_tokenizer,
        )
        composed = previous.then(trim) if previous is not None else trim
        composed = dataclasses.replace(composed, filler=int(_original_filler(trim, previous)))
        gm.meta[VOCAB_KEY] = composed
        self._update_trace(gm, previous, composed, rows)

        metrics: dict[str, Any] = {
            "vocab_before": use.size,
            "vocab_after": int(rows.numel()),
            "params_before": before[0],
            "params_after": after[0],
            "bytes_before": before[1],
            "bytes_after": after[1],
        }
        notes = [
            f"kept {rows.numel()} of {use.size} tokens ({corpus.distinct} in the corpus); "
            f"parameters {before[0]:,} -> {after[0]:,}"
        ]
        if new_tokenizer is not None and corpus.texts:
            identical = tokenizer_trim.encodes_identically(
                tokenizer, new_tokenizer, rows.tolist(), corpus.texts
            )
            metrics["corpus_identical"] = identical
            notes.append(
                f"{identical:.1%} of the corpus encodes identically with the new tokenizer"
            )
        elif self.mode == "rebuilt" and tokenizer is None:
            notes.append("no tokenizer in the context: ids renumbered, no tokenizer rebuilt")
        coverage = _coverage(ctx, tokenizer, keep_input, self.source)
        if coverage is not None:
            metrics["eval_token_coverage"] = coverage
            notes.append(f"{coverage:.2%} of the evaluation tokens are kept")
            if new_tokenizer is not None and isinstance(ctx.evaluation, str):
                lines = [line for line in ctx.evaluation.splitlines(keepends=True) if line.strip()]
                same = tokenizer_trim.encodes_identically(
                    tokenizer, new_tokenizer, rows.tolist(), lines
                )
                metrics["eval_lines_identical"] = same
                notes.append(f"{same:.1%} of the evaluation lines encode identically")
        stats = dict(rw.counters)
        return PassResult(gm, changed=True, stats=stats, notes=notes, metrics=metrics)

    # -- the keep set ---------------------------------------------------------------------------

    def _keep_set(
        self, corpus: _Corpus, tokenizer: Any, gm: torch.fx.GraphModule, input_size: int
    ) -> list[int]:
        counts = corpus.counts
        mined = [i for i, c in counts.most_common() if c >= self.min_freq]
        if self.top_n is not None:
            mined = mined[: self.top_n]
        special: set[int] = set(_config_ids(gm))
        if tokenizer is not None:
            special |= tokenizer_trim.special_ids(tokenizer)
        if not set(mined) - special:
            raise refuse(
                f"pass '{self.name}': the corpus keeps only special tokens "
                f"({len(counts)} distinct ids, min_freq={self.min_freq}): give a corpus of text "
                "the model should still handle"
            )
        keep = set(mined) | special | set(self.keep)
        for token in self.keep_tokens:
            keep.add(_token_id(tokenizer, token, self.name))
        bad = sorted(i for i in keep if not 0 <= i < input_size)
        if bad:
            raise refuse(
                f"pass '{self.name}': ids {bad[:8]} are outside the vocabulary of {input_size}"
            )
        if tokenizer is not None:
            keep = tokenizer_trim.close(tokenizer, keep)
        return sorted(keep)

    # -- the graph ------------------------------------------------------------------------------

    def _rewrite(
        self,
        rw: Rewriter,
        use: VocabUse,
        rows: torch.Tensor,
        previous: VocabMap | None,
        tokenizer: Any,
    ) -> None:
        written: set[str] = set()
        for tensor in use.tensors.values():
            if tensor.name in written:
                continue  # an alias of a tensor already sliced (a tie by name)
            written.update(rw.store.aliases(tensor.name))
            rw.apply(_slice_edit(rw, tensor.name, tensor.axis, rows, tensor.role))
            rw.counters[f"slice-{tensor.role}"] += 1
        position = torch.full((use.size,), -1, dtype=torch.long)
        position[rows] = torch.arange(rows.numel())
        for lookup in use.lookups:
            if lookup.target == aten.embedding.default and len(lookup.args) > 2:
                pad = lookup.args[2]
                if isinstance(pad, int) and pad >= 0:
                    rw.set_arg(lookup, 2, int(position[pad]), rule="renumber-padding-idx")
        for node in use.reshapes:
            shape = list(node.args[1])
            shape[-1] = int(rows.numel())
            rw.set_arg(node, 1, shape, rule="resize-logits-view")
        if self.mode == "rebuilt":
            for node in use.id_comparisons:
                value = node.args[1]
                new = int(position[value]) if 0 <= value < use.size else -1
                rw.set_arg(node, 1, new, rule="renumber-id-comparison")
        else:
            self._map_ids(rw, use, position, rows, previous, tokenizer)

    def _map_ids(
        self,
        rw: Rewriter,
        use: VocabUse,
        position: torch.Tensor,
        rows: torch.Tensor,
        previous: VocabMap | None,
        tokenizer: Any,
    ) -> None:
        """id-map mode: original ids -> rows through an integer table in the graph."""
        filler = int(position[_filler_row(rows, tokenizer, previous)])
        row_of = torch.where(position >= 0, position, torch.full_like(position, filler))
        if previous is not None:  # the graph already maps original ids to the old rows
            existing = next(n for n in rw.graph.nodes if n.meta.get(ID_MAP_KEY))
            table_name = str(existing.args[0].target)
            old_table = rw.store.read(table_name)
            rw.store.write(table_name, row_of[old_table], note="compose id maps")
            rw.counters["compose-id-map"] += 1
            return
        node = rw.add_weight("vocab_id_map", row_of, rule="id-map")
        mapped: dict[torch.fx.Node, torch.fx.Node] = {}
        for lookup in use.lookups:
            index = lookup.args[1] if lookup.target == aten.embedding.default else lookup.args[1][0]
            if index not in mapped:
                new = rw.call(aten.index.Tensor, (node, [index]), before=lookup, rule="id-map")
                new.meta[ID_MAP_KEY] = True
                mapped[index] = new
            if lookup.target == aten.embedding.default:
                rw.set_arg(lookup, 1, mapped[index], rule="id-map")
            else:
                rw.set_arg(lookup, 1, [mapped[index]], rule="id-map")

    def _update_trace(
        self,
        gm: torch.fx.GraphModule,
        previous: VocabMap | None,
        trim: VocabMap,
        rows: torch.Tensor,
    ) -> None:
        """The trace's example inputs in the new ids; the config renumbered (rebuilt mode)."""
        from rewriter.analysis.vocab import translate_inputs

        info = trace_info(gm)
        if info is None:
            return
        examples = translate_inputs(info.example_inputs, info.input_names, previous, trim)
        config = info.config
        if config is not None and self.mode == "rebuilt":
            config = tokenizer_trim.remap_config_ids(config, rows.tolist())
        gm.meta[TRACE_INFO_KEY] = dataclasses.replace(
            info, example_inputs=tuple(examples), config=config
        )


# --- helpers --------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Corpus:
    """The corpus as token ids of the graph's input space, with its texts when it was text."""

    counts: collections.Counter[int]
    texts: list[str]
    source: Any

    @property
    def distinct(self) -> int:
        return len(self.counts)

    @classmethod
    def load(cls, ctx: PassContext, kind: str, tokenizer: Any, size: int, name: str) -> _Corpus:
        data = ctx.require(kind, name)
        texts: list[str] = []
        if is_text(data):
            if tokenizer is None:
                raise refuse(
                    f"pass '{name}': text data needs a tokenizer: PassContext(tokenizer=...)"
                )
            texts = [data] if isinstance(data, str) else list(data)  # documents, as given
            ids = _encode_all(tokenizer, texts)
        elif isinstance(data, torch.Tensor):
            ids = data.reshape(-1)
        else:
            parts = []
            for batch in data:
                if isinstance(batch, dict):
                    value = torch.as_tensor(batch["input_ids"])
                    mask = batch.get("attention_mask")
                    parts.append(value[torch.as_tensor(mask).bool()] if mask is not None else value)
                else:
                    parts.append(torch.as_tensor(batch).reshape(-1))
            ids = torch.cat([p.reshape(-1) for p in parts]) if parts else torch.zeros(0)
        ids = ids.long()
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= size):
            bad = ids[(ids < 0) | (ids >= size)].unique()[:8].tolist()
            raise refuse(
                f"pass '{name}': the corpus has ids {bad} outside the vocabulary of {size}"
            )
        counts = collections.Counter(
            dict(zip(*[t.tolist() for t in ids.unique(return_counts=True)]))
        )
        return cls(counts, texts, data)


def _encode_all(tokenizer: Any, texts: list[str]) -> torch.Tensor:
    backend = tokenizer_trim.backend(tokenizer)
    encodings = backend.encode_batch(texts, add_special_tokens=False)
    flat = [i for encoding in encodings for i in encoding.ids]
    return torch.tensor(flat, dtype=torch.long)


def _tokenizer(previous: VocabMap | None, ctx: PassContext) -> Any:
    if previous is not None and previous.ids == "new":
        return previous.tokenizer  # the rebuilt one speaks the graph's ids; ctx's may not
    return ctx.tokenizer


def _rows_of(keep: list[int], previous: VocabMap | None) -> torch.Tensor:
    ids = torch.tensor(keep, dtype=torch.long)
    if previous is None or previous.ids == "new":
        return ids
    rows = previous.positions(ids)  # id-map: input ids are original; tables have the old rows
    return rows[rows >= 0].unique(sorted=True)


def _filler_row(rows: torch.Tensor, tokenizer: Any, previous: VocabMap | None) -> int:
    """Row (in the current tables) a removed id reads: the unknown token if kept, else the first."""
    unk = _unk_id(tokenizer)
    if unk is not None and previous is not None and previous.ids == "original":
        unk = int(previous.positions(torch.tensor([unk]))[0])
    if unk is not None and bool((rows == unk).any()):
        return unk
    return int(rows[0])


def _original_filler(trim: VocabMap, previous: VocabMap | None) -> int:
    row = trim.filler  # a row of the tables before this trim
    return int(previous.kept[row]) if previous is not None else row


def _unk_id(tokenizer: Any) -> int | None:
    if tokenizer is None:
        return None
    try:
        return tokenizer_trim.unk_id(tokenizer)
    except tokenizer_trim.TokenizerTrimError:
        return None  # a slow tokenizer: id-map mode works without reading its model


def _token_id(tokenizer: Any, token: str, name: str) -> int:
    if tokenizer is None:
        raise refuse(f"pass '{name}': keep_tokens needs a tokenizer in the context")
    value = tokenizer_trim.backend(tokenizer).token_to_id(token)
    if value is None:
        raise refuse(f"pass '{name}': keep_tokens names '{token}', which the tokenizer lacks")
    return int(value)


def _config_ids(gm: torch.fx.GraphModule) -> list[int]:
    info = trace_info(gm)
    config = info.config if info is not None else None
    found: list[int] = []
    for field in tokenizer_trim.CONFIG_ID_FIELDS:
        value = (config or {}).get(field)
        values = value if isinstance(value, list) else [value]
        found += [v for v in values if isinstance(v, int) and v >= 0]
    return found


def _input_names(gm: torch.fx.GraphModule, use: VocabUse) -> tuple[str, ...]:
    info = trace_info(gm)
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    names = []
    for node in use.token_inputs:
        index = placeholders.index(node)
        names.append(info.input_names[index] if info is not None else node.name)
    return tuple(names)


def _slice_edit(rw: Rewriter, name: str, axis: int, rows: torch.Tensor, role: str) -> Edit:
    shape = list(rw.store.shape(name))
    shape[axis] = int(rows.numel())

    def compute(block: Block) -> torch.Tensor:
        if axis == 0:
            return block.gather(name, rows[block.start : block.stop])
        return block.rows(name).index_select(axis, rows)

    return Edit(name, (name,), compute, tuple(shape), note=f"keep the kept ids' rows ({role})")


def _sizes(gm: torch.fx.GraphModule) -> tuple[int, int]:
    """(parameters, bytes) over distinct stored tensors."""
    seen: dict[int, torch.Tensor] = {}
    for _, tensor in (*gm.named_parameters(), *gm.named_buffers()):
        seen.setdefault(id(tensor), tensor)
    params = sum(t.numel() for t in seen.values() if t.is_floating_point())
    return params, sum(t.numel() * t.element_size() for t in seen.values())


def _coverage(ctx: PassContext, tokenizer: Any, keep: list[int], kind: str) -> float | None:
    """Fraction of the evaluation tokens (old tokenizer) that were kept, when there is such
    data and it is not the corpus itself."""
    if kind == "evaluation" or ctx.evaluation is None:
        return None
    if isinstance(ctx.evaluation, str) and tokenizer is not None:
        ids = _encode_all(tokenizer, [ctx.evaluation])
    elif isinstance(ctx.evaluation, torch.Tensor):
        ids = ctx.evaluation.reshape(-1).long()
    else:
        return None
    if not ids.numel():
        return None
    kept = torch.zeros(int(max(max(keep), int(ids.max()))) + 1, dtype=torch.bool)
    kept[torch.tensor(keep)] = True
    return float(kept[ids].float().mean())
