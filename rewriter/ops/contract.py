"""The contract every ``rewriter::`` op follows, and the lowering helpers built on it.

Every op a pass introduces is a real ``torch.library`` custom op with

1. a **reference implementation** in plain torch: the one semantics every backend is tested
   against;
2. a **fake kernel**, so export, re-export and shape propagation work;
3. **autograd** (``register_autograd``), checked with ``gradcheck`` in float64, so graphs that
   contain the op can be fine-tuned with :func:`rewriter.train`;
4. a **decomposition** into ATen ops, used by backends that cannot take the op (torch-mlir, an
   ONNX fallback) through :func:`decompose`.

Backends declare, as data, which ops they lower natively (:func:`check_lowerable`); any other
``rewriter::`` op falls back to its decomposition or fails with an error naming the op and node.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import operator
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import torch
import torch.fx

from rewriter.errors import LoweringError

__all__ = [
    "OPS",
    "Arguments",
    "OpContract",
    "OpFunction",
    "SampleSource",
    "arguments",
    "bind",
    "check_lowerable",
    "decompose",
    "decomposition_table",
    "rewriter_nodes",
    "signature_of",
]


@dataclasses.dataclass(frozen=True)
class SampleSource:
    """What an op's ``samples`` function draws its argument tuples from: a seeded generator,
    the device and dtype wanted, and a size factor (shapes stay small enough for interpreted
    kernels at ``size=1``)."""

    generator: torch.Generator
    device: str | torch.device = "cpu"
    dtype: torch.dtype = torch.float32
    size: int = 1

    @property
    def width(self) -> int:
        """A feature width that is not a power of two."""
        return 24 * self.size + 5

    def rand(self, *shape: int, kind: torch.dtype | None = None) -> torch.Tensor:
        """Standard normal values of ``kind`` (default: the wanted dtype) on the device."""
        values = torch.randn(*shape, generator=self.generator)
        return values.to(kind or self.dtype).to(self.device)

    def positive(self, *shape: int) -> torch.Tensor:
        """Values in [0.1, 1.1) (feature maps, scales)."""
        return (torch.rand(*shape, generator=self.generator) + 0.1).to(self.dtype).to(self.device)


@dataclasses.dataclass(frozen=True)
class OpContract:
    """One ``rewriter::`` op: its overload, reference semantics, ATen decomposition, and sample
    arguments covering its variants (what backends and kernels are tested against)."""

    name: str
    overload: torch._ops.OpOverload
    reference: Callable[..., torch.Tensor]
    decomposition: Callable[..., torch.Tensor]
    summary: str
    samples: Callable[[SampleSource], list[tuple]] | None = None
    """Argument tuples covering the op's variants (optional inputs absent and present, widths
    not a power of two): :func:`rewriter.testing.op_samples` calls it."""

    @property
    def qualname(self) -> str:
        return f"rewriter::{self.name}"

    @property
    def parameters(self) -> tuple[str, ...]:
        """The op's argument names, in order (from its registered schema: declared once)."""
        return tuple(argument.name for argument in self.overload._schema.arguments)

    def positional(self, **named: Any) -> tuple[Any, ...]:
        """The op's arguments in schema order from ``named`` (defaults filled in): what a pass
        hands ``Rewriter.call`` to create the op's node, without writing the order out."""
        return tuple(bind(self.overload, (), named).values())


OPS: dict[str, OpContract] = {}
"""Every ``rewriter::`` op, by name."""


def register(contract: OpContract) -> OpContract:
    """Add ``contract`` to :data:`OPS` (each op module calls this once per op)."""
    OPS[contract.name] = contract
    return contract


# --- arguments by name ---------------------------------------------------------------------------


class Arguments(dict[str, Any]):
    """An op call's arguments by schema name, in schema order; also readable as attributes
    (``a.window`` is ``a["window"]``)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _overload(op: str | torch._ops.OpOverload) -> torch._ops.OpOverload:
    """``op`` itself, or the default overload of ``rewriter::<op>``."""
    if isinstance(op, str):
        return getattr(torch.ops.rewriter, op).default
    return op


def _bind(
    schema: Sequence[Any],
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
    lacking: Callable[[str], Exception],
) -> Arguments:
    bound = Arguments()
    for index, argument in enumerate(schema):
        if index < len(args):
            bound[argument.name] = args[index]
        elif argument.name in kwargs:
            bound[argument.name] = kwargs[argument.name]
        elif argument.has_default_value():
            bound[argument.name] = argument.default_value
        else:
            raise lacking(argument.name)
    return bound


def bind(
    op: str | torch._ops.OpOverload,
    args: Sequence[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
) -> Arguments:
    """A call's ``args`` and ``kwargs`` by the names of ``op``'s schema (``"linear_attention"``
    for ``rewriter::linear_attention``, or an overload), defaults filled in; ``TypeError`` like
    a Python call for too many, unknown or missing arguments."""
    overload = _overload(op)
    schema = overload._schema.arguments
    kwargs = kwargs or {}
    if len(args) > len(schema):
        raise TypeError(f"{overload} takes {len(schema)} arguments, got {len(args)}")
    names = [argument.name for argument in schema]
    unknown = sorted(set(kwargs) - set(names))
    twice = sorted(set(kwargs) & set(names[: len(args)]))
    if unknown or twice:
        problem = f"unknown arguments {unknown}" if unknown else f"arguments {twice} given twice"
        raise TypeError(f"{overload}: {problem}")
    return _bind(
        schema, args, kwargs, lambda name: TypeError(f"{overload} lacks argument '{name}'")
    )


def arguments(node: torch.fx.Node) -> Arguments:
    """A ``rewriter::`` (or any ATen) op node's arguments by name, defaults filled in: backends
    and analyses read ``arguments(node)["causal"]``, never ``node.args[8]``, so an op's
    signature is written once, in its ``torch.library`` definition."""
    target = node.target
    if not isinstance(target, torch._ops.OpOverload):
        raise TypeError(f"node '{node.name}' calls {target!r}, not an op with a schema")
    return _bind(
        target._schema.arguments,
        node.args,
        node.kwargs,
        lambda name: LoweringError(f"{target} node '{node.name}' lacks argument '{name}'", node),
    )


class OpFunction:
    """A function that takes an op's arguments (see :func:`signature_of`).

    Called like the op (positionally or by name), it binds the call by the op's schema and
    passes the :class:`Arguments` on; keyword arguments that are not the op's (``chunk=``) go
    to the function as they are. Its signature, for ``inspect`` and the docs, is the schema's.
    """

    def __init__(self, op: str, function: Callable[..., Any], first: str | None) -> None:
        functools.update_wrapper(self, function)
        self._op, self._function, self._first = op, function, first

    @property
    def parameters(self) -> tuple[str, ...]:
        """The op's argument names, ``first`` moved to the front."""
        names = tuple(a.name for a in _overload(self._op)._schema.arguments)
        if self._first is None:
            return names
        return (self._first, *(n for n in names if n != self._first))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        names = self.parameters
        options = {key: kwargs.pop(key) for key in list(kwargs) if key not in names}
        if self._first is not None:  # bind by the reordered names, then in schema order
            if len(args) > len(names) or set(names[: len(args)]) & set(kwargs):
                raise TypeError(
                    f"{self.__name__}{self.__signature__} called with {len(args)} "
                    f"positional arguments and {sorted(kwargs)}"
                )
            kwargs = {**dict(zip(names, args)), **kwargs}
            args = ()
        return self._function(bind(self._op, args, kwargs), **options)

    @property
    def __signature__(self) -> inspect.Signature:
        schema = {a.name: a for a in _overload(self._op)._schema.arguments}
        positional = [
            inspect.Parameter(
                name,
                inspect.Parameter.POSITIONAL_OR_KEYWORD,
                default=schema[name].default_value
                if schema[name].has_default_value()
                else inspect.Parameter.empty,
            )
            for name in self.parameters
        ]
        options = [
            p
            for p in inspect.signature(self._function).parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY
        ]
        return inspect.Signature(positional + options)


def signature_of(
    op: str, *, first: str | None = None
) -> Callable[[Callable[..., Any]], OpFunction]:
    """Decorate ``function(a: Arguments, /, **options)`` to take ``rewriter::<op>``'s arguments.

    The forms and fake kernels of an op write ``a.q``, ``a.window``: the parameter list is the
    one the op's ``torch.library`` definition declares, never typed out again. ``first`` moves
    one argument to the front (a decoding step takes its state first)."""

    def wrap(function: Callable[..., Any]) -> OpFunction:
        return OpFunction(op, function, first)

    return wrap


# --- lowering support ----------------------------------------------------------------------------


def rewriter_nodes(gm: torch.fx.GraphModule) -> dict[str, list[torch.fx.Node]]:
    """The graph's ``rewriter::`` op nodes, by op name."""
    found: dict[str, list[torch.fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
            if node.target.namespace == "rewriter":
                found.setdefault(node.target._opname, []).append(node)
    return found


def check_lowerable(
    gm: torch.fx.GraphModule,
    backend: str,
    native: Collection[str],
    *,
    allow_decomposition: bool = True,
) -> dict[str, str]:
    """How ``backend`` takes each ``rewriter::`` op in ``gm``: ``"native"`` or ``"decomposed"``.

    Raises :class:`LoweringError` naming the op and the node when neither is possible.
    """
    plan: dict[str, str] = {}
    for name, nodes in rewriter_nodes(gm).items():
        if name in native:
            plan[name] = "native"
        elif allow_decomposition and name in OPS:
            plan[name] = "decomposed"
        else:
            known = "no decomposition" if name not in OPS else "decomposition disabled"
            raise LoweringError(
                f"backend '{backend}' cannot lower op rewriter::{name} ({known}; it lowers "
                f"{sorted(native) or 'no rewriter ops'})",
                nodes[0],
            )
    return plan


def decomposition_table(
    names: Sequence[str] | None = None,
) -> dict[torch._ops.OpOverload, Callable]:
    """``{overload: decomposition}`` for ``torch.export``'s ``run_decompositions``."""
    chosen = OPS.values() if names is None else [OPS[n] for n in names]
    return {op.overload: op.decomposition for op in chosen}


def decompose(
    gm: torch.fx.GraphModule,
    names: Sequence[str] | None = None,
    example_inputs: Sequence[torch.Tensor] | None = None,
    *,
    extra: Sequence[OpContract] = (),
) -> torch.fx.GraphModule:
    """Replace ``rewriter::`` ops (all, or ``names``) by their ATen decompositions, in place.

    Each op node is replaced by the ATen graph its decomposition traces to on the node's fake
    values, so the result has no ``rewriter::`` calls left for those ops. ``extra``: contracts
    for other ops a backend wants decomposed its own way (an ATen op it cannot take as it is).
    """
    from torch.fx.experimental.proxy_tensor import make_fx

    from rewriter.rewrite.driver import Rewriter

    targets = {n: OPS[n] for n in (names if names is not None else OPS)}
    rw = Rewriter(gm, pass_name="decompose")
    for name, nodes in rewriter_nodes(gm).items():
        if name not in targets:
            continue
        for node in nodes:
            _inline_decomposition(rw, node, targets[name], make_fx)
    for contract in extra:
        for node in list(gm.graph.find_nodes(op="call_function", target=contract.overload)):
            _inline_decomposition(rw, node, contract, make_fx)
    rw.finish(prune_weights=False)
    return gm


def _inline_decomposition(
    rw: object, node: torch.fx.Node, contract: OpContract, make_fx: Callable
) -> None:
    from rewriter.rewrite.driver import Rewriter

    assert isinstance(rw, Rewriter)
    # Tensor arguments, flattened: a node, or a node inside a list argument (a state list).
    slots = [
        (i, j)
        for i, a in enumerate(node.args)
        for j in (
            [None]
            if isinstance(a, torch.fx.Node)
            else [j for j, e in enumerate(a) if isinstance(e, torch.fx.Node)]
            if isinstance(a, (list, tuple))
            else []
        )
    ]
    inputs = [node.args[i] if j is None else node.args[i][j] for i, j in slots]
    fakes = [n.meta["val"] for n in inputs]

    def call(*tensors: torch.Tensor) -> object:
        args = [list(a) if isinstance(a, (list, tuple)) else a for a in node.args]
        for (i, j), t in zip(slots, tensors):
            if j is None:
                args[i] = t
            else:
                args[i][j] = t
        return contract.decomposition(*args, **node.kwargs)

    with rw.fake_mode:
        traced = make_fx(call, tracing_mode="symbolic" if _symbolic(fakes) else "fake")(*fakes)
    env: dict[torch.fx.Node, object] = {}
    placeholders = iter(inputs)
    result = None
    for sub in traced.graph.nodes:
        if sub.op == "placeholder":
            env[sub] = next(placeholders)
        elif sub.op == "output":
            result = torch.fx.node.map_arg(sub.args[0], lambda n: env[n])
        elif sub.op == "call_function":
            args = torch.fx.node.map_arg(sub.args, lambda n: env[n])
            kwargs = torch.fx.node.map_arg(sub.kwargs, lambda n: env[n])
            env[sub] = rw.call(
                sub.target,
                args,
                kwargs,
                before=node,
                rule=f"decompose-{contract.name}",
                meta_from=node,
            )
        elif sub.op == "get_attr":  # a literal tensor of the decomposition (a table of powers)
            tensor = getattr(traced, str(sub.target))
            env[sub] = rw.add_weight(
                f"{contract.name}_constant", tensor.detach().clone(), rule="decompose-constant"
            )
        else:
            raise LoweringError(
                f"decomposition of rewriter::{contract.name} produced a {sub.op} node", node
            )
    if isinstance(result, (list, tuple)):  # an op returning a list: its users are getitems
        for user in list(node.users):
            if user.target is not operator.getitem:
                raise LoweringError(
                    f"rewriter::{contract.name} returns a list, used whole by '{user.name}'", node
                )
            rw.replace(user, result[user.args[1]], rule=f"decompose-{contract.name}")
        rw.erase_dead(node)
        return
    assert isinstance(result, torch.fx.Node)
    rw.replace(node, result, rule=f"decompose-{contract.name}")


def _symbolic(values: Sequence[torch.Tensor]) -> bool:
    return any(isinstance(d, torch.SymInt) for v in values for d in v.shape)
