"""The ``rewriter::`` op set and the contract every op in it follows.

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

Ops defined here:

* ``rewriter::crms_norm(x, eps)``: Pre-CRMSNorm (Jiang et al. 2023). ``x`` holds the first
  ``d - 1`` coordinates of a zero-mean vector of width ``d`` (the last one is ``-sum(x)``);
  ``y = x / sqrt((sum x_i^2 + (sum x_i)^2) / d + eps)``, the first ``d - 1`` coordinates of
  ``rms_norm`` of the full vector. Computed in float32 for half types, like ``aten.rms_norm``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection, Sequence

import torch
import torch.fx

from rewriter.errors import LoweringError

__all__ = [
    "OPS",
    "OpContract",
    "check_lowerable",
    "crms_norm",
    "decompose",
    "decomposition_table",
    "rewriter_nodes",
]


@dataclasses.dataclass(frozen=True)
class OpContract:
    """One ``rewriter::`` op: its overload, reference semantics and ATen decomposition."""

    name: str
    overload: torch._ops.OpOverload
    reference: Callable[..., torch.Tensor]
    decomposition: Callable[..., torch.Tensor]
    summary: str

    @property
    def qualname(self) -> str:
        return f"rewriter::{self.name}"


OPS: dict[str, OpContract] = {}
"""Every ``rewriter::`` op, by name."""


def _register(contract: OpContract) -> OpContract:
    OPS[contract.name] = contract
    return contract


# --- crms_norm -----------------------------------------------------------------------------------


def _opmath(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def crms_norm_reference(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Plain-torch semantics of ``rewriter::crms_norm`` (also its ATen decomposition)."""
    xs = _opmath(x)
    width = xs.shape[-1] + 1
    implied = xs.sum(-1, keepdim=True)
    mean_square = (xs.pow(2).sum(-1, keepdim=True) + implied.pow(2)) / width
    return (xs * torch.rsqrt(mean_square + eps)).to(x.dtype)


@torch.library.custom_op("rewriter::crms_norm", mutates_args=())
def crms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Compressed RMSNorm over the last dim of ``x`` (width d - 1 of a zero-mean d-vector)."""
    return crms_norm_reference(x, eps)


@crms_norm.register_fake
def _crms_norm_fake(x: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.empty_like(x)


def _crms_norm_setup(ctx: object, inputs: tuple[torch.Tensor, float], output: torch.Tensor) -> None:
    x, eps = inputs
    ctx.save_for_backward(x)  # type: ignore[attr-defined]
    ctx.eps = eps  # type: ignore[attr-defined]


def _crms_norm_backward(ctx: object, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
    # y_j = x_j r with r = (s/d + eps)^(-1/2), s = sum x^2 + (sum x)^2, so
    # dL/dx_i = g_i r - r^3 (x_i + sum x) / d * sum_j g_j x_j.
    (x,) = ctx.saved_tensors  # type: ignore[attr-defined]
    xs, gs = _opmath(x), _opmath(grad)
    width = xs.shape[-1] + 1
    implied = xs.sum(-1, keepdim=True)
    r = torch.rsqrt((xs.pow(2).sum(-1, keepdim=True) + implied.pow(2)) / width + ctx.eps)  # type: ignore[attr-defined]
    dot = (gs * xs).sum(-1, keepdim=True)
    grad_x = gs * r - r.pow(3) * (xs + implied) * dot / width
    return grad_x.to(x.dtype), None


crms_norm.register_autograd(_crms_norm_backward, setup_context=_crms_norm_setup)

_register(
    OpContract(
        name="crms_norm",
        overload=torch.ops.rewriter.crms_norm.default,
        reference=crms_norm_reference,
        decomposition=crms_norm_reference,
        summary="RMSNorm of a zero-mean d-vector stored as its first d-1 coordinates",
    )
)


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
) -> torch.fx.GraphModule:
    """Replace ``rewriter::`` ops (all, or ``names``) by their ATen decompositions, in place.

    Each op node is replaced by the ATen graph its decomposition traces to on the node's fake
    values, so the result has no ``rewriter::`` calls left for those ops.
    """
    from torch.fx.experimental.proxy_tensor import make_fx

    from rewriter.driver import Rewriter

    targets = {n: OPS[n] for n in (names if names is not None else OPS)}
    rw = Rewriter(gm, pass_name="decompose")
    for name, nodes in rewriter_nodes(gm).items():
        if name not in targets:
            continue
        for node in nodes:
            _inline_decomposition(rw, node, targets[name], make_fx)
    rw.finish(prune_weights=False)
    return gm


def _inline_decomposition(
    rw: object, node: torch.fx.Node, contract: OpContract, make_fx: Callable
) -> None:
    from rewriter.driver import Rewriter

    assert isinstance(rw, Rewriter)
    tensor_positions = [i for i, a in enumerate(node.args) if isinstance(a, torch.fx.Node)]
    fakes = [node.args[i].meta["val"] for i in tensor_positions]

    def call(*tensors: torch.Tensor) -> torch.Tensor:
        args = list(node.args)
        for i, t in zip(tensor_positions, tensors):
            args[i] = t
        return contract.decomposition(*args, **node.kwargs)

    with rw.fake_mode:
        traced = make_fx(call, tracing_mode="symbolic" if _symbolic(fakes) else "fake")(*fakes)
    env: dict[torch.fx.Node, object] = {}
    placeholders = iter(node.args[i] for i in tensor_positions)
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
        else:
            raise LoweringError(
                f"decomposition of rewriter::{contract.name} produced a {sub.op} node", node
            )
    assert isinstance(result, torch.fx.Node)
    rw.replace(node, result, rule=f"decompose-{contract.name}")


def _symbolic(values: Sequence[torch.Tensor]) -> bool:
    return any(isinstance(d, torch.SymInt) for v in values for d in v.shape)
