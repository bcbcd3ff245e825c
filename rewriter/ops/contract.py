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
import operator
from collections.abc import Callable, Collection, Sequence
from typing import Any

import torch
import torch.fx

from rewriter.errors import LoweringError

__all__ = [
    "OPS",
    "OpContract",
    "SampleSource",
    "arguments",
    "check_lowerable",
    "decompose",
    "decomposition_table",
    "rewriter_nodes",
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


OPS: dict[str, OpContract] = {}
"""Every ``rewriter::`` op, by name."""


def register(contract: OpContract) -> OpContract:
    """Add ``contract`` to :data:`OPS` (each op module calls this once per op)."""
    OPS[contract.name] = contract
    return contract


# --- lowering support ----------------------------------------------------------------------------


def arguments(node: torch.fx.Node) -> dict[str, Any]:
    """A ``rewriter::`` (or any ATen) op node's arguments by name, defaults filled in: backends
    and analyses read ``arguments(node)["causal"]``, never ``node.args[8]``, so an op's
    signature is written once, in its ``torch.library`` definition."""
    target = node.target
    if not isinstance(target, torch._ops.OpOverload):
        raise TypeError(f"node '{node.name}' calls {target!r}, not an op with a schema")
    bound: dict[str, Any] = {}
    for index, argument in enumerate(target._schema.arguments):
        if index < len(node.args):
            bound[argument.name] = node.args[index]
        elif argument.name in node.kwargs:
            bound[argument.name] = node.kwargs[argument.name]
        elif argument.has_default_value():
            bound[argument.name] = argument.default_value
        else:
            raise LoweringError(
                f"{target} node '{node.name}' lacks argument '{argument.name}'", node
            )
    return bound


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
