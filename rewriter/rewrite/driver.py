"""The rewrite driver: the one owner of graph mutation, node order, metadata and provenance.

Passes and rules never call ``graph.erase_node`` or ``replace_all_uses_with`` themselves. They ask a
:class:`Rewriter`, which

* inserts new nodes before the node they replace (so operands always dominate their users),
* gives each new node fake-tensor metadata (``meta["val"]``, computed with the export's fake mode),
  the source module of the node it replaces, and ``meta["rewriter.from"]`` naming the pass and rule
  that created it,
* counts rewrites per rule, and removes nodes a rewrite left dead.

Rules are data: a :class:`RuleSet` of :func:`rule` entries, each a pattern and a rewrite function
that returns the replacement (an existing value, or an :func:`emit` description of new nodes) or
``None`` to decline. Nothing changes before a rule has decided. :func:`apply_rules` runs a table to
a bounded fixpoint.
"""

from __future__ import annotations

import collections
import dataclasses
import inspect
import os
import sys
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.fx

from rewriter.ir.graph import fake_mode_of, propagate_node, prune_dead_get_attrs
from rewriter.ir.store import Edit, ModuleStore, WeightStore, weights
from rewriter.rewrite.pattern import Match, Pattern

__all__ = [
    "ERASE",
    "Emit",
    "Provenance",
    "Rewriter",
    "Rule",
    "RuleSet",
    "RuleStats",
    "apply_rules",
    "emit",
    "rule",
]

PROVENANCE_KEY = "rewriter.from"


@dataclasses.dataclass(frozen=True)
class Provenance:
    """Which pass and rule created a node, and which nodes it replaced."""

    pass_name: str
    rule: str
    replaces: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Emit:
    """A node a rule wants created: ``target(*args, **kwargs)``; args may be other Emits."""

    target: Any
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


def emit(target: Any, *args: Any, **kwargs: Any) -> Emit:
    """Describe a new node for a rule's replacement (created only if the rule fires)."""
    return Emit(target, args, kwargs)


class _Erase:
    def __repr__(self) -> str:
        return "ERASE"


ERASE = _Erase()
"""A rule's result meaning: remove the matched node (it must have no users)."""


@dataclasses.dataclass(frozen=True)
class Rule:
    """A pattern, a rewrite function and an optional named side condition."""

    pattern: Pattern
    rewrite: Callable[..., Any]
    name: str
    where: Callable[[Match], bool] | None = None
    location: str = ""

    def fire(self, match: Match, rw: Rewriter) -> Any:
        parameters = inspect.signature(self.rewrite).parameters
        kwargs = {k: v for k, v in match.bindings.items() if k in parameters}
        if "match" in parameters:
            kwargs["match"] = match
        if "rw" in parameters:
            kwargs["rw"] = rw
        return self.rewrite(**kwargs)


def rule(
    pattern: Pattern,
    rewrite: Callable[..., Any],
    *,
    name: str,
    where: Callable[[Match], bool] | None = None,
) -> Rule:
    """A rule; its definition site is recorded for diagnostics."""
    frame = sys._getframe(1)
    location = f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno}"
    return Rule(pattern, rewrite, name, where, location)


class RuleSet:
    """An ordered table of rules, indexed by the call targets their patterns start from."""

    def __init__(self, rules: Iterable[Rule]) -> None:
        self.rules: tuple[Rule, ...] = tuple(rules)
        self._by_target: dict[Any, list[Rule]] = collections.defaultdict(list)
        self._any: list[Rule] = []
        for r in self.rules:
            roots = r.pattern.roots()
            if roots is None:
                self._any.append(r)
            else:
                for target in roots:
                    self._by_target[target].append(r)

    def __add__(self, other: RuleSet) -> RuleSet:
        return RuleSet(self.rules + other.rules)

    def __iter__(self) -> Any:
        return iter(self.rules)

    def __len__(self) -> int:
        return len(self.rules)

    def candidates(self, node: torch.fx.Node) -> list[Rule]:
        if node.op != "call_function":
            return self._any
        specific = self._by_target.get(node.target, [])
        return specific + self._any if self._any else specific


@dataclasses.dataclass
class RuleStats:
    """Per-rule counts from one :func:`apply_rules` run."""

    attempts: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    matches: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    fired: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    iterations: int = 0
    converged: bool = True

    def per_rule(self, rules: RuleSet) -> dict[str, dict[str, Any]]:
        """Every rule of ``rules`` in table order: where it is defined, how often it was tried,
        matched (pattern and side condition) and fired (rewrote); zeros for rules that never
        fired on this graph (what ``rewriter run --explain`` lists)."""
        return {
            r.name: {
                "location": r.location,
                "attempts": self.attempts[r.name],
                "matches": self.matches[r.name],
                "fired": self.fired[r.name],
            }
            for r in rules.rules
        }


class Rewriter:
    """Mutation API over one GraphModule, used by one pass run."""

    def __init__(
        self,
        gm: torch.fx.GraphModule,
        pass_name: str = "",
        store: WeightStore | None = None,
        *,
        propagate_meta: bool = True,
    ) -> None:
        """``propagate_meta=False`` defers fake-tensor metadata to one ``refresh_meta`` at the end
        (for rewrites that change shapes along a chain, where node-by-node propagation would
        see stale input shapes)."""
        self.gm = gm
        self.graph = gm.graph
        self.pass_name = pass_name
        self.store = store if store is not None else weights(gm)
        self.counters: collections.Counter[str] = collections.Counter()
        self.fake_mode = fake_mode_of(gm)
        self.propagate_meta = propagate_meta
        self._erased: set[torch.fx.Node] = set()

    # -- queries --
    def is_alive(self, node: torch.fx.Node) -> bool:
        return node not in self._erased

    @property
    def rewrites(self) -> int:
        return sum(self.counters.values())

    # -- creating nodes --
    def call(
        self,
        target: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any] | None = None,
        *,
        before: torch.fx.Node,
        rule: str,
        meta_from: torch.fx.Node | None = None,
    ) -> torch.fx.Node:
        """Create ``target(*args, **kwargs)`` just before ``before``, with meta and provenance."""
        name = getattr(target, "_opname", None) or getattr(target, "__name__", None)
        with self.graph.inserting_before(before):
            node = self.graph.create_node(
                "call_function", target, tuple(args), dict(kwargs or {}), name=name
            )
        self._stamp(node, rule, meta_from or before)
        return node

    def weight(self, name: str, *, rule: str = "weight") -> torch.fx.Node:
        """A ``get_attr`` node for the stored tensor ``name`` (reusing an existing one)."""
        for node in self.graph.find_nodes(op="get_attr"):
            if node.target == name:
                return node
        anchor = next(n for n in self.graph.nodes if n.op != "get_attr")
        with self.graph.inserting_before(anchor):
            node = self.graph.get_attr(name)
        self._stamp(node, rule, None)
        return node

    def add_weight(
        self, hint: str, tensor: torch.Tensor, *, trainable: bool = False, rule: str = "weight"
    ) -> torch.fx.Node:
        """Store a new tensor under a free name near ``hint`` and return its ``get_attr``."""
        if not isinstance(self.store, ModuleStore):
            raise TypeError("adding tensors needs the in-memory store")
        name = self.store.fresh_name(hint)
        if tensor.is_floating_point():
            value: torch.Tensor = torch.nn.Parameter(tensor, requires_grad=trainable)
        elif trainable:
            raise TypeError(f"'{name}': only floating-point tensors can be trainable")
        else:
            value = tensor  # packed integers and the like become buffers
        self.store.write(name, value, note=f"new tensor from {self.pass_name}")
        return self.weight(name, rule=rule)

    def untie(
        self, get_attr: torch.fx.Node, users: Iterable[torch.fx.Node], *, name_hint: str
    ) -> torch.fx.Node:
        """Give ``users`` their own copy of a shared weight under a new name; return its node.

        The other users keep the original tensor and name (a tied LM head keeps the embedding).
        """
        if not isinstance(self.store, ModuleStore):
            raise TypeError("untying needs the in-memory store")
        users = list(users)
        name = self.store.copy(str(get_attr.target), name_hint)
        node = self.weight(name, rule="untie")
        for user in users:
            user.replace_input_with(get_attr, node)
        self.counters["untie"] += 1
        return node

    def _stamp(self, node: torch.fx.Node, rule: str, meta_from: torch.fx.Node | None) -> None:
        if meta_from is not None:
            for key in ("nn_module_stack", "stack_trace", "source_fn_stack"):
                if key in meta_from.meta:
                    node.meta[key] = meta_from.meta[key]
        replaces = (meta_from.name,) if meta_from is not None else ()
        node.meta[PROVENANCE_KEY] = Provenance(self.pass_name, rule, replaces)
        if self.propagate_meta or node.op == "get_attr":
            propagate_node(self.gm, node, self.fake_mode)

    # -- weights --
    def apply(self, edit: Edit) -> None:
        """Apply a weight edit through the store and refresh the metadata of its get_attr nodes."""
        self.store.apply(edit)
        names = set(self.store.aliases(edit.target))
        for node in self.graph.find_nodes(op="get_attr"):
            if node.target in names:
                propagate_node(self.gm, node, self.fake_mode)

    # -- changing uses --
    def replace(self, old: torch.fx.Node, new: torch.fx.Node, *, rule: str) -> None:
        """Make every user of ``old`` use ``new``; erase ``old`` and whatever became dead."""
        if old is new:
            return
        old.replace_all_uses_with(new)
        self.counters[rule] += 1
        # The replaced node goes even if torch calls it impure (eval dropout): the rule decided
        # its value is ``new``. Its inputs go only if dead and pure.
        inputs = list(old.all_input_nodes)
        self.erase(old)
        for node in inputs:
            self.erase_dead(node)

    def replace_uses(
        self,
        old: torch.fx.Node,
        new: torch.fx.Node,
        *,
        only: Callable[[torch.fx.Node], bool],
        rule: str,
    ) -> int:
        """Redirect the users of ``old`` for which ``only(user)`` holds; returns how many."""
        changed = 0
        for user in list(old.users):
            if user is not new and only(user):
                user.replace_input_with(old, new)
                changed += 1
        if changed:
            self.counters[rule] += 1
        return changed

    def set_arg(self, node: torch.fx.Node, index: int, value: Any, *, rule: str) -> None:
        """Set positional argument ``index`` of ``node`` (padding with None); refreshes its meta."""
        args = list(node.args) + [None] * (index + 1 - len(node.args))
        args[index] = value
        node.args = tuple(args)
        self.counters[rule] += 1
        if self.propagate_meta:
            propagate_node(self.gm, node, self.fake_mode)

    def set_args(self, node: torch.fx.Node, args: tuple[Any, ...], *, rule: str) -> None:
        """Replace all positional arguments of ``node`` (one rewrite); refreshes its metadata."""
        node.args = tuple(args)
        self.counters[rule] += 1
        if self.propagate_meta:
            propagate_node(self.gm, node, self.fake_mode)

    def erase(self, node: torch.fx.Node) -> None:
        """Erase a node that has no users."""
        if node.users:
            raise RuntimeError(f"cannot erase '{node.name}': it still has users {list(node.users)}")
        self.graph.erase_node(node)
        self._erased.add(node)

    def erase_dead(self, node: torch.fx.Node) -> None:
        """Erase ``node`` if nothing uses it and it has no side effect; then its dead inputs."""
        stack = [node]
        while stack:
            current = stack.pop()
            if current in self._erased or current.users or current.op != "call_function":
                continue
            if current.is_impure():
                continue
            inputs = list(current.all_input_nodes)
            self.erase(current)
            stack.extend(inputs)

    def finish(self, *, prune_weights: bool = True) -> list[str]:
        """Drop dead weights, check the graph and regenerate its code; returns pruned names."""
        pruned = prune_dead_get_attrs(self.gm) if prune_weights else []
        self.graph.lint()
        self.gm.recompile()
        return pruned

    # -- committing a rule's result --
    def commit(self, root: torch.fx.Node, result: Any, *, rule: str) -> None:
        if result is ERASE:
            self.erase(root)
            self.counters[rule] += 1
            return
        value = self.materialize(result, before=root, rule=rule)
        if not isinstance(value, torch.fx.Node):
            raise TypeError(f"rule '{rule}' replaced '{root.name}' by a non-node {value!r}")
        self.replace(root, value, rule=rule)

    def materialize(self, value: Any, *, before: torch.fx.Node, rule: str) -> Any:
        """Create the nodes an :class:`Emit` tree describes; other values pass through."""
        if isinstance(value, Emit):
            args = tuple(self.materialize(a, before=before, rule=rule) for a in value.args)
            kwargs = {
                k: self.materialize(v, before=before, rule=rule) for k, v in value.kwargs.items()
            }
            return self.call(value.target, args, kwargs, before=before, rule=rule, meta_from=before)
        if isinstance(value, (list, tuple)) and any(isinstance(v, Emit) for v in value):
            return type(value)(self.materialize(v, before=before, rule=rule) for v in value)
        return value


def apply_rules(
    rw: Rewriter,
    rules: RuleSet,
    *,
    max_iterations: int = 10,
    explain: Callable[[torch.fx.Node, Rule, str], None] | None = None,
) -> RuleStats:
    """Apply ``rules`` over the graph until nothing fires (at most ``max_iterations`` sweeps).

    Each sweep visits nodes in graph order; at a node the first rule that matches and accepts
    fires. ``explain(node, rule, reason)`` is told why each candidate rule did not match.
    """
    stats = RuleStats()
    for _ in range(max_iterations):
        stats.iterations += 1
        fired = 0
        for node in list(rw.graph.nodes):
            if not rw.is_alive(node):
                continue
            for candidate in rules.candidates(node):
                stats.attempts[candidate.name] += 1
                match = candidate.pattern.match(node)
                if not match:
                    if explain is not None:
                        explain(node, candidate, match.reason)
                    continue
                if candidate.where is not None and not candidate.where(match):
                    if explain is not None:
                        explain(
                            node, candidate, f"side condition {candidate.where.__name__} failed"
                        )
                    continue
                stats.matches[candidate.name] += 1
                result = candidate.fire(match, rw)
                if result is None:
                    continue
                rw.commit(node, result, rule=candidate.name)
                stats.fired[candidate.name] += 1
                fired += 1
                break
        if not fired:
            return stats
    stats.converged = False
    return stats
