"""Errors the rewriter raises, each naming what went wrong in the user's terms.

Every error that concerns a graph node carries the node and renders it with its source module
(from ``nn_module_stack``), so a message points at the model code a user recognises rather than
at an anonymous FX name.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.fx

__all__ = [
    "LoweringError",
    "PassError",
    "PreconditionError",
    "RewriterError",
    "SpecError",
    "TraceError",
    "describe_node",
]


def describe_node(node: torch.fx.Node) -> str:
    """``'layer_norm_3' (aten.layer_norm.default in transformer.h.1.ln_1: LayerNorm)``."""
    what = node.op
    if node.op == "call_function":
        what = _target_name(node.target)
    elif node.op in ("get_attr", "call_module"):
        what = f"{node.op} {node.target}"
    where = source_module(node)
    suffix = f" in {where[0]}: {where[1]}" if where else ""
    return f"'{node.name}' ({what}{suffix})"


def source_module(node: torch.fx.Node) -> tuple[str, str] | None:
    """The innermost module (path, class name) that produced ``node``, if export recorded it."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path, cls = list(stack.values())[-1]
    cls_name = cls if isinstance(cls, str) else getattr(cls, "__name__", str(cls))
    return path, cls_name.rsplit(".", 1)[-1]


def _target_name(target: object) -> str:
    name = getattr(target, "__name__", None)
    overload = str(target)
    if overload.startswith(("aten.", "rewriter.", "prims.")) or "::" in overload:
        return overload
    return name or overload


class RewriterError(Exception):
    """Base class of every error the rewriter raises on purpose."""


class TraceError(RewriterError):
    """The model could not be traced; the message says why and what to change."""


class SpecError(RewriterError, ValueError):
    """A pipeline text spec is malformed; the message points at the offending part."""

    def __init__(self, message: str, spec: str = "", position: int | None = None) -> None:
        self.spec = spec
        self.position = position
        if spec and position is not None:
            caret = " " * position + "^"
            message = f"{message}\n  {spec}\n  {caret}"
        super().__init__(message)


class PreconditionError(RewriterError):
    """A pass refuses a graph: a precondition does not hold at ``node``."""

    def __init__(self, message: str, node: torch.fx.Node | None = None) -> None:
        self.node = node
        self.reason = message
        if node is not None:
            message = f"{message} (at node {describe_node(node)})"
        super().__init__(message)


class PassError(RewriterError):
    """A pass failed inside a pipeline. The pipeline's input graph is unchanged."""

    def __init__(
        self,
        pass_name: str,
        cause: BaseException,
        already_ran: Sequence[str],
        node: torch.fx.Node | None = None,
    ) -> None:
        self.pass_name = pass_name
        self.cause = cause
        self.already_ran = tuple(already_ran)
        self.node = node
        ran = ", ".join(self.already_ran) if self.already_ran else "none"
        reason = cause.reason if isinstance(cause, PreconditionError) else f"{cause}"
        kind = "refused" if isinstance(cause, PreconditionError) else "failed"
        lines = [f"pass '{pass_name}' {kind}: {reason}"]
        if node is not None:
            lines.append(f"  at node {describe_node(node)}")
        lines.append(f"  passes that already ran: {ran}")
        lines.append("  the pipeline's input graph is unchanged")
        super().__init__("\n".join(lines))


class LoweringError(RewriterError):
    """A backend cannot lower an op; the message names the op and the node."""

    def __init__(self, message: str, node: torch.fx.Node | None = None) -> None:
        self.node = node
        if node is not None:
            message = f"{message} (at node {describe_node(node)})"
        super().__init__(message)


class LoadError(RewriterError, ValueError):
    """A file ``rewriter.load`` refuses: not a graph archive, or content that could run code."""
