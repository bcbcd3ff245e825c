"""Low-rank adapters as graph structure: injection next to a linear map, records, exact merge.

An adapter on a linear map ``y = x W^T + b`` adds a branch ``s * B R A x`` (``R`` present for the
LoRA-XS family, the identity otherwise):

    h = linear(x, A)        A: [r, in]
    h = linear(h, R)        R: [r, r]        (optional)
    d = linear(h, B)        B: [out, r]
    y' = y + s * d

so ``delta W = s B R A`` in ``(out, in)`` form whatever layout the base weight has (GPT-2's
``Conv1D`` stores ``W^T``). A module applied more than once (a shared layer, or the prefix and
last-token halves of a ``rewriter.deploy`` step graph) gets one adapter: one set of factors, a
branch at every application (:func:`applications`), trained and merged once.

Factors are graph tensors: trainable parameters, or frozen buffers (a NOLA basis, LoRA-XS
singular vectors), or computed in the graph from them (NOLA's ``A = sum_i alpha_i A_i``); what
a method adds to the plain branch is its :class:`AdapterKind` entry in :data:`KINDS`. Every
adapter is described by an :class:`AdapterRecord` in ``gm.meta``, which ``merge-adapters``, the
adapter checkpoint and the reports read; the graph stays plain ATen and exports like any other
(the factors become initializers).

Merging computes ``W + delta W`` in float64 row blocks through the weight store (one cast back),
so merge is exact up to that single rounding.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.fx

from rewriter.analysis.folding import untie_map
from rewriter.errors import RewriterError
from rewriter.ir.graph import LinearMap, is_lm_head, linear_maps, weight_name_for
from rewriter.ir.store import Block, Edit
from rewriter.rewrite.driver import Rewriter

__all__ = [
    "ADAPTERS_KEY",
    "KINDS",
    "TRAIN_DROPOUT_KEY",
    "AdapterKind",
    "AdapterRecord",
    "Combination",
    "adapter_dtype",
    "adapter_kind",
    "applications",
    "delta_weight",
    "factor_values",
    "inject",
    "load",
    "merge_edit",
    "nola_bases",
    "own_weight",
    "principal_factors",
    "records",
    "save",
    "select_targets",
]

ADAPTERS_KEY = "rewriter.adapters"
TRAIN_DROPOUT_KEY = "rewriter.train_dropout"
"""Node meta flag: a dropout that :func:`rewriter.train` turns on while training."""
aten = torch.ops.aten


@dataclasses.dataclass
class AdapterRecord:
    """One adapter: where it sits, how it is parametrized, and which graph tensors hold it."""

    module: str
    """Source module of the adapted linear map (``transformer.h.0.attn.c_attn``)."""
    method: str
    """``lora``, ``nola``, ``lora-xs``, ``lora-sb``."""
    rank: int
    scale: float
    weight: str
    """The base weight's tensor name."""
    layout: str
    """The base weight's layout: ``out_in`` or ``in_out``."""
    tensors: dict[str, str]
    """Role -> graph tensor name: ``A``, ``B``, ``R`` (factors used by the branch) and, for NOLA,
    ``alpha``, ``beta``, ``A_basis``, ``B_basis``."""
    trainable: list[str]
    """Names of the tensors that train."""
    outputs: list[str]
    """Names of the ``add`` nodes that add the branch to the base output, one per application
    of the module."""
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Method data for the checkpoint (NOLA seeds, the SVD dtype, ...)."""


def records(gm: torch.fx.GraphModule) -> list[AdapterRecord]:
    """The adapters of ``gm`` (empty when it has none)."""
    return list(getattr(gm, "meta", {}).get(ADAPTERS_KEY, []))


def _set_records(gm: torch.fx.GraphModule, values: list[AdapterRecord]) -> None:
    gm.meta[ADAPTERS_KEY] = list(values)


def applications(gm: torch.fx.GraphModule, lin: LinearMap) -> list[LinearMap]:
    """Every application of ``lin``'s module: the linear maps reading the same weight in the
    same layout, in graph order (``lin`` alone for a module applied once)."""
    found = [
        other
        for other in linear_maps(gm)
        if other.weight_name == lin.weight_name and other.layout == lin.layout
    ]
    return found or [lin]


def inject(
    rw: Rewriter,
    lin: LinearMap,
    *,
    method: str,
    factors: dict[str, torch.Tensor],
    trainable: set[str],
    scale: float,
    extra: dict[str, Any] | None = None,
    dropout: float = 0.0,
) -> AdapterRecord:
    """Add the branch ``s * B R A x`` to ``lin``'s output, and to every other application of its
    module with the same factors, and record it.

    ``factors`` holds the stored tensors by role (``A``, ``B``, optional ``R``, NOLA's bases and
    coefficients); roles in ``trainable`` become trainable parameters. The factors that
    ``method``'s :class:`AdapterKind` computes (NOLA's ``A`` and ``B``) are built in the graph
    from the stored ones.
    """
    node = lin.node
    module = lin.path
    apps = applications(rw.gm, lin)
    first = apps[0].output
    nodes: dict[str, torch.fx.Node] = {}
    names: dict[str, str] = {}
    for role, tensor in factors.items():
        stored = rw.add_weight(
            weight_name_for(node, f"{method.replace('-', '_')}_{role}"),
            tensor,
            trainable=role in trainable,
            rule="adapter",
        )
        nodes[role] = stored
        names[role] = str(stored.target)
    for role, combination in adapter_kind(method).computed.items():
        nodes[role] = _combine(rw, combination, nodes, first)  # before the first application
    outputs = [_branch(rw, app, nodes, scale, dropout).name for app in apps]
    record = AdapterRecord(
        module=module,
        method=method,
        rank=int(factors["A"].shape[0]) if "A" in factors else int(extra.get("rank", 0)),
        scale=float(scale),
        weight=lin.weight_name,
        layout=lin.layout,
        tensors=names,
        trainable=[names[r] for r in sorted(trainable)],
        outputs=outputs,
        extra=dict(extra or {}) | ({"dropout": float(dropout)} if dropout else {}),
    )
    _set_records(rw.gm, [*records(rw.gm), record])
    return record


def _branch(
    rw: Rewriter, lin: LinearMap, nodes: dict[str, torch.fx.Node], scale: float, dropout: float
) -> torch.fx.Node:
    """``y + s * B R A x`` at one application; returns the sum, which replaces ``y``."""
    before = lin.output
    x = lin.input
    if dropout:
        # Dropout on the branch input, off in the graph (eval semantics: exact, exportable as an
        # identity); rewriter.train switches nodes tagged TRAIN_DROPOUT_KEY on while it trains.
        x = rw.call(aten.dropout.default, (x, float(dropout), False), before=before, rule="adapter")
        x.meta[TRAIN_DROPOUT_KEY] = True
    h = rw.call(aten.linear.default, (x, nodes["A"]), before=before, rule="adapter")
    if "R" in nodes:
        h = rw.call(aten.linear.default, (h, nodes["R"]), before=before, rule="adapter")
    d = rw.call(aten.linear.default, (h, nodes["B"]), before=before, rule="adapter")
    d = rw.call(aten.mul.Tensor, (d, float(scale)), before=before, rule="adapter")
    users = [u for u in lin.output.users]
    total = rw.call(aten.add.Tensor, (lin.output, d), before=before, rule="adapter")
    # The sum goes after the base output; move it there and rewire the base output's users.
    lin.output.append(total)
    for user in users:
        user.replace_input_with(lin.output, total)
    return total


def nola_bases(
    seed: int,
    index: int,
    k: int,
    l: int,  # noqa: E741 - the paper's name
    r: int,
    in_features: int,
    out_features: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen bases of map ``index``: ``[k, r, in]`` and ``[l, out, r]``, float32."""
    ga = torch.Generator().manual_seed(seed + 2 * index)
    gb = torch.Generator().manual_seed(seed + 2 * index + 1)
    a = (torch.rand(k, r, in_features, generator=ga) * 2 - 1) * math.sqrt(3.0 / in_features)
    b = (torch.rand(l, out_features, r, generator=gb) * 2 - 1) / math.sqrt(r)
    return a, b


def _nola_bases_of(
    extra: dict[str, Any], lin: LinearMap, stored: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """NOLA's frozen bases, regenerated from the seeds in the record (no checkpoint stores them),
    in the dtype of the stored coefficients."""
    a_basis, b_basis = nola_bases(
        extra["seed"],
        extra["index"],
        extra["k"],
        extra["l"],
        extra["rank"],
        lin.in_features,
        lin.out_features,
    )
    dtype = stored["alpha"].dtype
    return {"A_basis": a_basis.to(dtype), "B_basis": b_basis.to(dtype)}


# --- adapter kinds -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Combination:
    """A factor computed from stored tensors, ``einsum(equation, coefficients, basis)``: in the
    graph (an ``aten.einsum`` node) and, in float64, for merging."""

    equation: str
    coefficients: str
    """Role of the coefficient vector (NOLA's trained ``alpha``)."""
    basis: str
    """Role of the stacked frozen bases (NOLA's ``A_basis``)."""


@dataclasses.dataclass(frozen=True)
class AdapterKind:
    """What an adapter method adds to the plain branch ``s B R A x`` over stored factors.

    One entry per method in :data:`KINDS`; :func:`inject`, :func:`factor_values`, :func:`save`
    and :func:`load` read it, so a method's special cases live in its entry alone.
    """

    method: str
    computed: Mapping[str, Combination] = dataclasses.field(default_factory=dict)
    """Factor role (``A``, ``B``) -> how it is computed from stored tensors."""
    regenerated: tuple[str, ...] = ()
    """Roles the adapter checkpoint leaves out; :attr:`regenerate` rebuilds them on load."""
    regenerate: (
        Callable[[dict[str, Any], LinearMap, dict[str, torch.Tensor]], dict[str, torch.Tensor]]
        | None
    ) = None
    """``(extra, lin, stored) -> tensors``: the :attr:`regenerated` roles, from the record's
    ``extra``, the adapted map and the stored tensors."""


KINDS: dict[str, AdapterKind] = {
    kind.method: kind
    for kind in (
        AdapterKind("lora"),
        AdapterKind("lora-xs"),
        AdapterKind("lora-sb"),
        AdapterKind(
            "nola",
            computed={
                "A": Combination("k,kri->ri", "alpha", "A_basis"),
                "B": Combination("k,kor->or", "beta", "B_basis"),
            },
            regenerated=("A_basis", "B_basis"),
            regenerate=_nola_bases_of,
        ),
    )
}
"""Every adapter method by name (``AdapterRecord.method``)."""


def adapter_kind(method: str) -> AdapterKind:
    """The kind of ``method``; one without an entry is a plain adapter over stored factors."""
    return KINDS.get(method) or AdapterKind(method)


def _combine(
    rw: Rewriter, combination: Combination, nodes: dict[str, torch.fx.Node], before: torch.fx.Node
) -> torch.fx.Node:
    return rw.call(
        aten.einsum.default,
        (combination.equation, [nodes[combination.coefficients], nodes[combination.basis]]),
        before=before,
        rule="adapter",
    )


def adapter_dtype(lin: LinearMap) -> torch.dtype:
    """Factors keep a float32/float64 base's dtype; half-precision bases get float32 factors."""
    dtype = lin.weight.meta["val"].dtype
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def own_weight(rw: Rewriter, lin: LinearMap) -> LinearMap:
    """``lin`` with a weight of its own: a weight shared with other readers (a tied LM head and
    its embedding) is untied first, the others keep the original tensor
    (:func:`rewriter.analysis.folding.untie_map`). Every application of ``lin``'s module
    (:func:`applications`) keeps reading the one weight."""
    return untie_map(rw, lin, applications(rw.gm, lin))  # the copy named after its module


def factor_values(gm: torch.fx.GraphModule, record: AdapterRecord) -> dict[str, torch.Tensor]:
    """The float64 factors ``A``, ``B`` (and ``R``) of an adapter, computed ones included."""
    from rewriter.ir.store import weights

    store = weights(gm)
    read = {role: store.read(name).to(torch.float64) for role, name in record.tensors.items()}
    for role, combination in adapter_kind(record.method).computed.items():
        coefficients, basis = read[combination.coefficients], read[combination.basis]
        read[role] = torch.einsum(combination.equation, coefficients, basis)
    return read


def delta_weight(gm: torch.fx.GraphModule, record: AdapterRecord) -> torch.Tensor:
    """``delta W = s B R A`` in float64, ``(out, in)``."""
    f = factor_values(gm, record)
    inner = f["R"] @ f["A"] if "R" in f else f["A"]
    return record.scale * (f["B"] @ inner)


def merge_edit(gm: torch.fx.GraphModule, record: AdapterRecord, weight: str) -> Edit:
    """The store edit ``W <- W + delta W`` in the weight's own layout, by row blocks."""
    f = factor_values(gm, record)
    left = record.scale * f["B"]  # [out, r]
    right = f["R"] @ f["A"] if "R" in f else f["A"]  # [r, in]

    def compute(block: Block) -> torch.Tensor:
        rows = block.rows(weight)
        if record.layout == "out_in":
            return rows + left[block.start : block.stop] @ right
        return rows + right[:, block.start : block.stop].T @ left.T

    return Edit(weight, (weight,), compute, note=f"merge {record.method} adapter")


# --- what adapter passes share -------------------------------------------------------------------


def select_targets(gm: torch.fx.GraphModule, targets: str, pass_name: str) -> list[LinearMap]:
    """The linear maps ``targets`` selects, as PEFT users write it, one per module.

    ``targets`` is ``all-linear`` (every linear map except the LM head: a map whose output is a
    graph output or that shares its weight with an embedding); a comma-separated list of names,
    each matching a map's source module path exactly or as a dotted suffix (``c_attn,c_proj``);
    or a regex, full match on the module path (PEFT's string form). A selection of nothing is
    an error naming the graph's linear maps. A module applied more than once (a shared layer,
    the two halves of a ``rewriter.deploy`` step graph) is selected once, at its first
    application: :func:`inject` adapts every application.
    """
    maps = linear_maps(gm)
    if targets == "all-linear":
        chosen = [lin for lin in maps if not is_lm_head(lin)]
    elif "," in targets or re.fullmatch(r"[\w.]+", targets):
        names = [t.strip() for t in targets.split(",") if t.strip()]
        chosen = [
            lin for lin in maps if any(lin.path == n or lin.path.endswith("." + n) for n in names)
        ]
    else:
        pattern = re.compile(targets)
        chosen = [lin for lin in maps if pattern.fullmatch(lin.path)]
    if not chosen:
        known = ", ".join(lin.path for lin in maps) or "none"
        raise RewriterError(
            f"pass '{pass_name}': targets={targets!r} selects no linear map (the graph's linear "
            f"maps: {known})"
        )
    first: dict[str, LinearMap] = {}
    for lin in chosen:
        first.setdefault(lin.weight_name, lin)
    return list(first.values())


def principal_factors(
    w: torch.Tensor, r: int, svd_dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``U_r``, ``S_r``, ``V_r^T`` of an ``(out, in)`` matrix: its exact truncated SVD
    (``torch.linalg.svd``, not randomized), computed in ``svd_dtype``. The LoRA-XS family's
    frozen factors come from it."""
    u, s, vh = torch.linalg.svd(w.to(svd_dtype), full_matrices=False)
    return u[:, :r], s[:r], vh[:r]


# --- adapter checkpoints -------------------------------------------------------------------------

CHECKPOINT_FORMAT = "rewriter-adapters/1"


def save(gm: torch.fx.GraphModule, path: str) -> None:
    """Write ``gm``'s adapters alone to a safetensors file.

    Trained tensors are stored, and the frozen factors that cannot be recomputed from the base
    model (LoRA-XS / LoRA-SB singular vectors); NOLA's bases are not stored: its seeds and
    coefficients regenerate them. The records travel in the file's metadata.
    """
    import json

    from safetensors.torch import save_file

    from rewriter.ir.store import weights

    store = weights(gm)
    tensors: dict[str, torch.Tensor] = {}
    entries = []
    for i, record in enumerate(records(gm)):
        if record.extra.get("init") == "pissa":
            # PiSSA rewrote the base weight to W - s B0 A0: the factors alone, applied to the
            # original model, would add s B A on top of W (silently wrong).
            raise ValueError(
                f"the PiSSA adapter on '{record.module}' cannot be saved alone: its base weight "
                "was rewritten to the residual W - s B0 A0. Save the whole graph "
                "(rewriter.save) or merge it and save the model"
            )
        regenerated = adapter_kind(record.method).regenerated
        roles = [r for r in record.tensors if r not in regenerated]
        for role in roles:
            tensors[f"{i}.{role}"] = store.read(record.tensors[role]).detach().contiguous()
        entry = dataclasses.asdict(record)
        entry["stored_roles"] = roles
        entries.append(entry)
    if not entries:
        raise ValueError("the graph has no adapters to save")
    save_file(
        tensors, path, metadata={"format": CHECKPOINT_FORMAT, "adapters": json.dumps(entries)}
    )


def load(gm: torch.fx.GraphModule, path: str) -> torch.fx.GraphModule:
    """A copy of ``gm`` (a fresh trace of the same model) with the saved adapters injected.

    Each adapter is matched to its linear map by source module and checked against the map's
    shape; a missing map or a shape mismatch is an error naming it (never a silent zero).
    """
    import json

    from safetensors import safe_open

    from rewriter.ir.graph import copy_graph_module, linear_maps

    with safe_open(path, framework="pt") as handle:
        metadata = handle.metadata() or {}
        if metadata.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{path} is not a rewriter adapter checkpoint")
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    entries = json.loads(metadata["adapters"])
    out = copy_graph_module(gm)
    rw = Rewriter(out, pass_name="load-adapters")
    maps = {lin.path: lin for lin in linear_maps(out)}
    for i, entry in enumerate(entries):
        lin = maps.get(entry["module"])
        if lin is None:
            raise ValueError(
                f"adapter {i} ({entry['method']}) is for '{entry['module']}', which this graph "
                f"does not have (its linear maps: {', '.join(maps)})"
            )
        factors = {role: tensors[f"{i}.{role}"] for role in entry["stored_roles"]}
        kind = adapter_kind(entry["method"])
        if kind.regenerate is not None:
            factors |= kind.regenerate(entry["extra"], lin, factors)
        _check_shapes(entry, factors, lin)
        trainable = {
            role for role, name in entry["tensors"].items() if name in set(entry["trainable"])
        }
        inject(
            rw,
            lin,
            method=entry["method"],
            factors=factors,
            trainable=trainable,
            scale=entry["scale"],
            extra={k: v for k, v in entry["extra"].items() if k != "dropout"},
            dropout=entry["extra"].get("dropout", 0.0),
        )
        maps = {m.path: m for m in linear_maps(out)}
    rw.finish(prune_weights=False)
    return out


def _check_shapes(entry: dict[str, Any], factors: dict[str, torch.Tensor], lin: LinearMap) -> None:
    expected = {"A": (None, lin.in_features), "B": (lin.out_features, None)}
    for role, (rows, cols) in expected.items():
        if role not in factors:
            continue
        shape = tuple(factors[role].shape)
        if (rows is not None and shape[0] != rows) or (cols is not None and shape[1] != cols):
            raise ValueError(
                f"adapter factor {role} {shape} for '{entry['module']}' does not fit its map "
                f"({lin.out_features} x {lin.in_features})"
            )
