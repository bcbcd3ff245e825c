"""Folding a normalization's affine into the linear maps that read it.

For a norm ``y = N(x) * gamma + beta`` read only by linear maps ``z = W y + b``:

    W' = W diag(gamma)        b' = b + W beta

so the norm keeps only its normalizer ``N`` and the readers absorb the affine (a reader without a
bias gets one). Shared by ``fold-ln`` (every norm) and ``crmsnorm`` (whose readers also absorb the
dropped coordinate of the compressed stream). Weight arithmetic goes through the weight store in
float64 row blocks; a reader whose weight is shared with another use (a tied LM head) is untied
first, and the other use keeps the original tensor.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
import torch.fx

from rewriter.analysis.residual import norm_width
from rewriter.errors import describe_node
from rewriter.ir.graph import (
    LinearMap,
    as_linear,
    look_back,
    module_path,
    transparent_users,
    weight_name_for,
)
from rewriter.ir.store import Edit, ModuleStore
from rewriter.rewrite.driver import Rewriter

__all__ = [
    "NormUnit",
    "bias_fold_edit",
    "ensure_bias",
    "fold_affine",
    "linear_readers",
    "norm_module_key",
    "norm_units",
    "reader_key",
    "untie_for",
    "untie_map",
]

aten = torch.ops.aten


@dataclasses.dataclass(frozen=True)
class NormUnit:
    """A normalization and its affine, or the affine map a frozen norm became.

    ``norm`` is the ``layer_norm`` / ``rms_norm`` node, or for a frozen unit (what ``ln-freeze``
    leaves: ``(x - mean(x)) * g + beta`` or ``x * g + beta``, with ``g`` and ``beta`` stored
    vectors) its first node. ``output`` is the node whose value leaves the unit; ``input`` the
    unit's input; ``centers`` whether a frozen unit subtracts the mean.
    """

    norm: torch.fx.Node
    output: torch.fx.Node
    gamma: torch.fx.Node | None
    beta: torch.fx.Node | None
    beta_add: torch.fx.Node | None
    width: int
    frozen: bool = False
    centers: bool = False
    input: torch.fx.Node | None = None

    @property
    def kind(self) -> str:
        if self.frozen:
            return "frozen"
        return "layer" if self.norm.target == aten.layer_norm.default else "rms"

    @property
    def eps(self) -> float | None:
        if self.frozen:
            return None
        index = 4 if self.kind == "layer" else 3
        eps = self.norm.args[index] if len(self.norm.args) > index else self.norm.kwargs.get("eps")
        return 1e-5 if eps is None and self.kind == "layer" else eps

    @property
    def has_affine(self) -> bool:
        return self.gamma is not None or self.beta is not None


def _vector(node: object, width: int, dtype: torch.dtype) -> bool:
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return isinstance(val, torch.Tensor) and tuple(val.shape) == (width,) and val.dtype == dtype


def _stored_vector(node: object, width: int, dtype: torch.dtype) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "get_attr" and _vector(node, width, dtype)


def _beta_add(node: torch.fx.Node, width: int) -> torch.fx.Node | None:
    """The single user ``add(node, beta)`` with ``beta`` a stored [width] vector, if any."""
    if len(node.users) != 1:
        return None
    user = next(iter(node.users))
    dtype = node.meta["val"].dtype
    if (
        user.target == aten.add.Tensor
        and user.args[0] is node
        and _stored_vector(user.args[1], width, dtype)
    ):
        return user
    return None


def norm_units(gm: torch.fx.GraphModule, *, frozen: bool = True) -> list[NormUnit]:
    """Every last-dim ``layer_norm`` / ``rms_norm`` with its affine, in graph order, and (with
    ``frozen``) every frozen unit: a stored per-channel scale, after an optional centering.

    ``rms_norm(x, w) + beta`` (what ``prernorm`` emits for a LayerNorm's bias) is one unit.
    """
    units = []
    for node in gm.graph.nodes:
        width = norm_width(node)
        if width is not None:
            units.append(_norm_unit(node, width))
        elif frozen and (unit := _frozen_unit(node)) is not None:
            units.append(unit)
    return units


def _norm_unit(node: torch.fx.Node, width: int) -> NormUnit:
    gamma = node.args[2] if len(node.args) > 2 else node.kwargs.get("weight")
    beta = None
    if node.target == aten.layer_norm.default:
        beta = node.args[3] if len(node.args) > 3 else node.kwargs.get("bias")
    output, beta_add = node, None
    if beta is None and (add := _beta_add(node, width)) is not None:
        output, beta, beta_add = add, add.args[1], add
    return NormUnit(node, output, gamma, beta, beta_add, width, input=node.args[0])


def _frozen_unit(node: torch.fx.Node) -> NormUnit | None:
    """``mul(x, g)`` or ``mul(x - mean(x), g)`` with ``g`` a stored vector (+ ``beta``)."""
    if node.op != "call_function" or node.target != aten.mul.Tensor or len(node.args) != 2:
        return None
    source, gamma = node.args
    val = node.meta.get("val")
    if not isinstance(source, torch.fx.Node) or not isinstance(val, torch.Tensor) or val.dim() == 0:
        return None
    width = val.shape[-1]
    if not isinstance(width, int) or not _stored_vector(gamma, width, val.dtype):
        return None
    first, unit_input, centers = node, source, False
    if (
        source.target == aten.sub.Tensor
        and isinstance(source.args[1], torch.fx.Node)
        and source.args[1].target == aten.mean.dim
        and source.args[1].args[0] is source.args[0]
        and list(source.args[1].args[1]) in ([-1], [source.meta["val"].dim() - 1])
        and len(source.users) == 1
    ):
        first, unit_input, centers = source, source.args[0], True
    add = _beta_add(node, width)
    output, beta = (add, add.args[1]) if add is not None else (node, None)
    return NormUnit(
        first, output, gamma, beta, add, width, frozen=True, centers=centers, input=unit_input
    )


def linear_readers(unit: NormUnit) -> tuple[list[LinearMap], torch.fx.Node | None]:
    """The linear maps reading the unit's output; or ``([], node)`` naming a non-linear reader."""
    readers = []
    for user in transparent_users(unit.output):
        lin = as_linear(user)
        if lin is None or look_back(lin.input) is not unit.output:
            return [], user
        readers.append(lin)
    return readers, None


def untie_for(rw: Rewriter, get_attr: torch.fx.Node, users: list[torch.fx.Node]) -> torch.fx.Node:
    """A ``get_attr`` of a tensor that only ``users`` read (a copy if others read it too).

    Names follow the modules: the copy is named after the users' module; if that is the tensor's
    current name, the other readers move to a copy named after theirs instead.
    """
    others = [u for u in get_attr.users if u not in users]
    aliases = rw.store.aliases(str(get_attr.target))
    if not others and len(aliases) <= 1:
        return get_attr
    leaf = str(get_attr.target).rsplit(".", 1)[-1]
    wanted = weight_name_for(users[0], leaf)
    if wanted == get_attr.target and others:
        theirs = weight_name_for(others[0], leaf)
        if theirs in aliases and isinstance(rw.store, ModuleStore):
            # their own name is an alias of this tied tensor: they read it there, and this
            # name gets a copy of its own (no '_1' names for either side)
            node = rw.weight(theirs, rule="untie")
            for user in others:
                user.replace_input_with(get_attr, node)
            rw.store.split_alias(str(get_attr.target))
            rw.counters["untie"] += 1
            return get_attr
        rw.untie(get_attr, others, name_hint=theirs)
        return get_attr
    return rw.untie(get_attr, users, name_hint=wanted)


def untie_map(
    rw: Rewriter, lin: LinearMap, also: Sequence[LinearMap] = (), *, bias: bool = False
) -> LinearMap:
    """``lin`` with a weight (and with ``bias``, a bias) that only it and ``also`` read.

    ``also``: other maps over the same weight (the module applied again) that keep sharing it
    with ``lin``. A tensor other readers share too (a tied LM head and its embedding) is untied
    with :func:`untie_for`: the group gets a copy named after its module, the other readers keep
    the original. The weight's readers are the maps' matmuls or the transposes feeding them.
    """
    group = {m.node for m in (lin, *also)}
    readers = [u for u in lin.weight.users if u in group or any(node in u.users for node in group)]
    weight = untie_for(rw, lin.weight, readers)
    if bias and lin.bias is not None:
        untie_for(rw, lin.bias, list(dict.fromkeys(m.output for m in (lin, *also))))
    refreshed = as_linear(lin.node)
    assert refreshed is not None and refreshed.weight is weight
    return refreshed


def ensure_bias(rw: Rewriter, lin: LinearMap, also: Sequence[LinearMap] = ()) -> LinearMap:
    """Give a bias-free linear map a zero bias (a ``get_attr`` named after its module).

    ``also``: other maps over the same weight (the module applied again) that get the same
    bias tensor, so they keep computing the same function.
    """
    if lin.bias is not None:
        return lin
    dtype = rw.store.dtype(lin.weight_name)
    device = rw.store.device(lin.weight_name)  # meta for a weightless graph without a checkpoint
    zeros = torch.zeros(lin.out_features, dtype=dtype, device=device)
    bias = rw.add_weight(weight_name_for(lin.node, "bias"), zeros, rule="create-bias")
    for each in (lin, *also):
        _attach_bias(rw, each, bias)
    refreshed = as_linear(lin.node)
    assert refreshed is not None and refreshed.bias is not None
    return refreshed


def _attach_bias(rw: Rewriter, lin: LinearMap, bias: torch.fx.Node) -> None:
    if lin.node.target == aten.linear.default:
        rw.set_arg(lin.node, 2, bias, rule="create-bias")
        return
    users = list(lin.node.users)  # mm / matmul: add the bias after the product
    after = lin.node.next
    added = rw.call(
        aten.add.Tensor, (lin.node, bias), before=after, rule="create-bias", meta_from=lin.node
    )
    for user in users:
        user.replace_input_with(lin.node, added)


def fold_affine(
    rw: Rewriter,
    unit: NormUnit,
    readers: list[LinearMap],
    *,
    rule: str = "fold-affine",
    also: Sequence[tuple[NormUnit, list[LinearMap]]] = (),
) -> None:
    """Fold ``unit``'s gamma and beta into every reader, then drop them from the norm.

    For a frozen unit the centering folds too (``W C``: each reader row loses its mean over the
    inputs) and the unit disappears: its readers read its input.

    ``also``: the same norm module applied elsewhere (same gamma and beta) with readers over the
    same weights (a shared layer; the two halves of a step graph). Their readers share the one
    folded weight instead of each getting an untied copy.
    """
    gamma = str(unit.gamma.target) if unit.gamma is not None else None
    beta = str(unit.beta.target) if unit.beta is not None else None
    groups: dict[tuple[str, str | None, str], list[LinearMap]] = {}
    for reader in [*readers, *(r for _, more in also for r in more)]:
        current = as_linear(reader.node)  # an earlier fold may have untied it: look again
        assert current is not None
        groups.setdefault(reader_key(current), []).append(current)
    for group in groups.values():
        reader = untie_map(rw, group[0], group[1:], bias=True)
        if beta is not None:
            reader = ensure_bias(rw, reader, also=group[1:])
            rw.apply(bias_fold_edit(reader, beta))  # reads the weight before gamma scales it
        if gamma is not None:
            rw.apply(_weight_edit(reader, gamma))
        if unit.centers:
            rw.apply(_center_inputs_edit(reader))
        rw.counters[rule] += len(group)
    for each in (unit, *(u for u, _ in also)):
        if each.frozen:
            rw.replace(each.output, each.input, rule="drop-frozen-norm")
        else:
            _drop_affine(rw, each, rule)


def reader_key(lin: LinearMap) -> tuple[str, str | None, str]:
    """Maps with equal keys compute the same function of their input (same weight, bias,
    layout): a module applied more than once."""
    return (lin.weight_name, lin.bias_name, lin.layout)


def norm_module_key(
    unit: NormUnit, readers: Sequence[LinearMap] | None = None
) -> tuple[object, ...]:
    """Equal for the applications of one norm module (a shared layer; the prefix and
    last-token halves of a ``rewriter.deploy`` step graph), which passes treat as one.

    A norm with a stored affine is known by its gamma and beta tensors, which every application
    reads; one without (or with a computed gain, such as Gemma's ``1 + w``) by its source module
    path, or its node's name where the graph records none. Whether the unit is frozen and
    centers is part of the key. With ``readers`` (the unit's linear readers) the key also asks
    for the same set of reader modules (:func:`reader_key`): what folding into weights that the
    applications share needs.
    """
    affine = [t for t in (unit.gamma, unit.beta) if t is not None]
    if affine and all(t.op == "get_attr" for t in affine):
        who = tuple(str(t.target) if t is not None else None for t in (unit.gamma, unit.beta))
    else:
        who = (module_path(unit.norm) or unit.norm.name,)
    key = (*who, unit.frozen, unit.centers)
    if readers is not None:
        key = (*key, frozenset(reader_key(r) for r in readers))
    return key


def _center_inputs_edit(lin: LinearMap) -> Edit:
    """``W C``: the reader sees ``x - mean(x)``, so its weight loses its mean over the inputs."""
    weight = lin.weight_name
    if lin.layout == "out_in":
        return Edit(
            weight,
            (weight,),
            lambda b: (r := b.rows(weight)) - r.mean(-1, keepdim=True),
            note="W C (center over inputs)",
        )
    width = lin.in_features
    return Edit(
        weight,
        (weight,),
        lambda b: b.rows(weight) - b.column_sum(weight) / width,
        note="C W (in, out): center over inputs",
    )


def bias_fold_edit(lin: LinearMap, beta: str) -> Edit:
    weight, bias = lin.weight_name, str(lin.bias_name)
    if lin.layout == "out_in":
        return Edit(
            bias,
            (bias, weight, beta),
            lambda b: b.whole(bias) + b.matvec(weight, beta),
            note="b + W beta",
        )
    return Edit(
        bias,
        (bias, weight, beta),
        lambda b: b.whole(bias) + b.column_sum(weight, weights=beta),
        note="b + beta W (in, out)",
    )


def _weight_edit(lin: LinearMap, gamma: str) -> Edit:
    weight = lin.weight_name
    if lin.layout == "out_in":
        return Edit(
            weight,
            (weight, gamma),
            lambda b: b.rows(weight) * b.whole(gamma)[None, :],
            note="W diag(gamma)",
        )
    return Edit(
        weight,
        (weight, gamma),
        lambda b: b.rows(weight) * b.whole(gamma)[b.start : b.stop, None],
        note="diag(gamma) W (in, out)",
    )


def _drop_affine(rw: Rewriter, unit: NormUnit, rule: str) -> None:
    args = list(unit.norm.args)
    if unit.kind == "layer":
        args += [None] * (5 - len(args))
        args[2], args[3], args[4] = None, None, unit.eps  # the eps stays explicit
    else:
        args += [None] * (4 - len(args))
        args[2] = None
    rw.set_args(unit.norm, tuple(args), rule="drop-norm-affine")
    if unit.beta_add is not None:
        rw.replace(unit.beta_add, unit.norm, rule="drop-norm-affine")


def describe_reader_refusal(unit: NormUnit, reader: torch.fx.Node) -> str:
    return f"{describe_node(unit.norm)} is read by {describe_node(reader)}, not a linear map"
