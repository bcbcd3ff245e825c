"""A small pattern language over FX nodes, written in the graph's own vocabulary.

Patterns mirror the ATen calls they match::

    x, eps = P.var("x"), P.const("eps")
    variance = P.call(aten.mean.dim, P.call(aten.pow.Tensor_Scalar, x, 2), [-1], True)
    pattern = P.call(aten.mul.Tensor, x, P.call(aten.rsqrt.default, variance + eps))

* ``P.var(name)`` matches any argument and binds it; a name used twice must bind the same value.
* ``P.const(name, where=...)`` matches a Python number (not a node) and binds it.
* ``P.call(targets, *args)`` matches a ``call_function`` node whose target is one of ``targets``
  and whose leading positional arguments match; literal values (``2``, ``[-1]``, ``True``)
  match by equality.
* ``a | b`` tries ``a`` then ``b``; ``P.maybe(wrapper_targets, inner)`` matches ``inner`` directly
  or wrapped in a one-input op (an optional dtype cast).
* Arithmetic operators build the ATen calls export emits: ``x + y`` matches ``aten.add.Tensor``
  with the operands in either order.

Matching never changes the graph. A failed match is a :class:`NoMatch` value whose reason is
formatted only when someone asks (the explain mode of the driver).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.fx

__all__ = ["Match", "NoMatch", "P", "Pattern"]

aten = torch.ops.aten


@dataclasses.dataclass
class Match:
    """A successful match: the bindings and every node the pattern's calls matched."""

    root: torch.fx.Node
    bindings: dict[str, Any]
    nodes: list[torch.fx.Node]

    def __bool__(self) -> bool:
        return True

    def __getitem__(self, name: str) -> Any:
        return self.bindings[name]


class NoMatch:
    """A failed match; ``reason`` is formatted lazily from ``template`` and ``args``."""

    __slots__ = ("args", "template")

    def __init__(self, template: str, *args: Any) -> None:
        self.template = template
        self.args = args

    def __bool__(self) -> bool:
        return False

    @property
    def reason(self) -> str:
        return self.template.format(*self.args)

    def __repr__(self) -> str:
        return f"NoMatch({self.reason!r})"


class Pattern:
    """Base of all patterns. ``match(value)`` returns a :class:`Match` or a :class:`NoMatch`."""

    def match(self, value: Any) -> Match | NoMatch:
        state = _State(bindings={}, nodes=[])
        failure = self._match(value, state)
        if failure is not None:
            return failure
        root = value if isinstance(value, torch.fx.Node) else None
        return Match(root, state.bindings, state.nodes)  # type: ignore[arg-type]

    def _match(self, value: Any, state: _State) -> NoMatch | None:
        raise NotImplementedError

    def roots(self) -> frozenset[Any] | None:
        """The call targets a match can start from (for indexing), or None for any node."""
        return None

    # Arithmetic mirrors torch, producing the ATen overloads export emits.
    def __add__(self, other: Any) -> Pattern:
        return P.call(aten.add.Tensor, self, other, commutative=True)

    def __radd__(self, other: Any) -> Pattern:
        return P.call(aten.add.Tensor, other, self, commutative=True)

    def __sub__(self, other: Any) -> Pattern:
        return P.call(aten.sub.Tensor, self, other)

    def __mul__(self, other: Any) -> Pattern:
        return P.call(aten.mul.Tensor, self, other, commutative=True)

    def __rmul__(self, other: Any) -> Pattern:
        return P.call(aten.mul.Tensor, other, self, commutative=True)

    def __truediv__(self, other: Any) -> Pattern:
        return P.call(aten.div.Tensor, self, other)

    def __or__(self, other: Pattern) -> Pattern:
        return _Alternatives((self, other))


@dataclasses.dataclass
class _State:
    bindings: dict[str, Any]
    nodes: list[torch.fx.Node]

    def snapshot(self) -> tuple[dict[str, Any], int]:
        return dict(self.bindings), len(self.nodes)

    def restore(self, snapshot: tuple[dict[str, Any], int]) -> None:
        self.bindings = dict(snapshot[0])
        del self.nodes[snapshot[1] :]


class _Var(Pattern):
    def __init__(self, name: str, where: Callable[[Any], bool] | None) -> None:
        self.name = name
        self.where = where

    def _match(self, value: Any, state: _State) -> NoMatch | None:
        if self.name in state.bindings:
            if state.bindings[self.name] is not value and not _same_literal(
                state.bindings[self.name], value
            ):
                return NoMatch("'{}' bound to two different values", self.name)
            return None
        if self.where is not None and not self.where(value):
            return NoMatch("'{}' = {} fails its condition", self.name, value)
        state.bindings[self.name] = value
        return None

    def __repr__(self) -> str:
        return f"P.var({self.name!r})"


class _Const(Pattern):
    def __init__(self, name: str | None, where: Callable[[Any], bool] | None) -> None:
        self.name = name
        self.where = where

    def _match(self, value: Any, state: _State) -> NoMatch | None:
        if isinstance(value, torch.fx.Node) or not isinstance(value, (int, float, bool)):
            return NoMatch("{} is not a Python number", value)
        if self.where is not None and not self.where(value):
            return NoMatch("constant {} fails its condition", value)
        if self.name is not None:
            return _Var(self.name, None)._match(value, state)
        return None


class _Literal(Pattern):
    def __init__(self, value: Any) -> None:
        self.value = value

    def _match(self, value: Any, state: _State) -> NoMatch | None:
        if isinstance(value, torch.fx.Node) or not _same_literal(self.value, value):
            return NoMatch("{} != {}", value, self.value)
        return None


class _Call(Pattern):
    def __init__(
        self,
        targets: frozenset[Any],
        args: tuple[Pattern, ...],
        kwargs: dict[str, Pattern],
        commutative: bool,
        name: str | None,
        where: Callable[[torch.fx.Node], bool] | None,
    ) -> None:
        self.targets = targets
        self.args = args
        self.kwargs = kwargs
        self.commutative = commutative
        self.name = name
        self.where = where

    def roots(self) -> frozenset[Any]:
        return self.targets

    def _match(self, value: Any, state: _State) -> NoMatch | None:
        if not isinstance(value, torch.fx.Node) or value.op != "call_function":
            return NoMatch("{} is not a call", value)
        if value.target not in self.targets:
            return NoMatch(
                "{} calls {}, not {}", value.name, value.target, sorted(map(str, self.targets))
            )
        if len(value.args) < len(self.args):
            return NoMatch(
                "{} has {} args, pattern needs {}", value.name, len(value.args), len(self.args)
            )
        if self.where is not None and not self.where(value):
            return NoMatch("{} fails the pattern's condition", value.name)
        if self.name is not None and self.name in state.bindings:
            # A named sub-pattern used twice must match the same node both times.
            if state.bindings[self.name] is not value:
                return NoMatch("'{}' bound to two different nodes", self.name)
            return None
        orders = [tuple(value.args[: len(self.args)])]
        if self.commutative and len(self.args) == 2:
            orders.append(orders[0][::-1])
        failure: NoMatch | None = None
        for actual in orders:
            snapshot = state.snapshot()
            failure = self._match_operands(value, actual, state)
            if failure is None:
                state.nodes.append(value)
                if self.name is not None:
                    state.bindings[self.name] = value
                return None
            state.restore(snapshot)
        return failure

    def _match_operands(
        self, node: torch.fx.Node, actual: tuple[Any, ...], state: _State
    ) -> NoMatch | None:
        for pattern, arg in zip(self.args, actual):
            failure = pattern._match(arg, state)
            if failure is not None:
                return failure
        for key, pattern in self.kwargs.items():
            if key not in node.kwargs:
                return NoMatch("{} has no keyword argument {}", node.name, key)
            failure = pattern._match(node.kwargs[key], state)
            if failure is not None:
                return failure
        return None

    def __repr__(self) -> str:
        targets = "|".join(sorted(str(t) for t in self.targets))
        return f"P.call({targets}, {', '.join(map(repr, self.args))})"


class _Alternatives(Pattern):
    def __init__(self, options: tuple[Pattern, ...]) -> None:
        flat: list[Pattern] = []
        for option in options:
            flat.extend(option.options if isinstance(option, _Alternatives) else (option,))
        self.options = tuple(flat)

    def roots(self) -> frozenset[Any] | None:
        roots: set[Any] = set()
        for option in self.options:
            option_roots = option.roots()
            if option_roots is None:
                return None
            roots |= option_roots
        return frozenset(roots)

    def _match(self, value: Any, state: _State) -> NoMatch | None:
        failures = []
        for option in self.options:
            snapshot = state.snapshot()
            failure = option._match(value, state)
            if failure is None:
                return None
            failures.append(failure)
            state.restore(snapshot)
        return NoMatch("no alternative matched: {}", "; ".join(f.reason for f in failures))


def _same_literal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.fx.Node) or isinstance(b, torch.fx.Node):
        return False
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same_literal(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - a symbolic value never equals a literal here
        return False


def _as_pattern(value: Any) -> Pattern:
    return value if isinstance(value, Pattern) else _Literal(value)


def _targets(targets: Any) -> frozenset[Any]:
    if isinstance(targets, (set, frozenset, list, tuple)):
        return frozenset(targets)
    return frozenset({targets})


class P:
    """Constructors of patterns (see the module docstring)."""

    @staticmethod
    def var(name: str, where: Callable[[Any], bool] | None = None) -> Pattern:
        """Match anything and bind it to ``name``."""
        return _Var(name, where)

    @staticmethod
    def const(name: str | None = None, where: Callable[[Any], bool] | None = None) -> Pattern:
        """Match a Python number (optionally satisfying ``where``) and bind it to ``name``."""
        return _Const(name, where)

    @staticmethod
    def call(
        targets: Any,
        *args: Any,
        name: str | None = None,
        commutative: bool = False,
        where: Callable[[torch.fx.Node], bool] | None = None,
        **kwargs: Any,
    ) -> Pattern:
        """Match a call of one of ``targets`` whose leading arguments match ``args``."""
        return _Call(
            _targets(targets),
            tuple(_as_pattern(a) for a in args),
            {k: _as_pattern(v) for k, v in kwargs.items()},
            commutative,
            name,
            where,
        )

    @staticmethod
    def maybe(wrappers: Iterable[Any] | Any, inner: Pattern, name: str | None = None) -> Pattern:
        """Match ``inner``, or ``inner`` wrapped in one call of ``wrappers`` (first argument)."""
        return _Alternatives((P.call(wrappers, inner, name=name), inner))

    @staticmethod
    def any_of(*options: Pattern) -> Pattern:
        """Match the first of ``options`` that matches."""
        return _Alternatives(options)
