"""The text form of pipelines, and budgets.

Grammar (whitespace allowed between tokens)::

    pipeline := step ("," step)*
    step     := NAME ["(" [option ("," option)*] ")"]
    option   := KEY "=" value
    value    := NUMBER | STRING | WORD | "[" [value ("," value)*] "]"

``NAME`` is a kebab-case pass name (``ln-freeze``), ``KEY`` a snake_case option, ``STRING`` is
single- or double-quoted, and a ``WORD`` is an unquoted run such as ``true``, ``all-linear`` or
``ppl+2%``. Examples::

    canonicalize,prernorm,l1quant(bits=4,group=64)
    ln-freeze(budget="ppl+5%", recover_steps=200)

A budget bounds how much a metric may degrade: ``ppl+2%`` (relative to the original model) or
``ppl+0.5`` (absolute). Every approximate pass takes budgets in this one grammar.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from rewriter.errors import SpecError

__all__ = ["Budget", "ParsedOption", "ParsedStep", "parse_pipeline"]


@dataclasses.dataclass(frozen=True)
class ParsedOption:
    key: str
    value: Any
    position: int
    """Offset of the value in the spec text (for errors)."""
    key_position: int = 0
    """Offset of the option name in the spec text."""


@dataclasses.dataclass(frozen=True)
class ParsedStep:
    name: str
    options: tuple[ParsedOption, ...]
    position: int


_NAME = re.compile(r"[a-z][a-z0-9]*(?:-[a-z0-9]+)*")
_KEY = re.compile(r"[a-z_][a-z0-9_]*")
_NUMBER = re.compile(r"[+-]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][+-]?\d+)?(?![\w%+.-])")
_WORD = re.compile(r"[A-Za-z0-9_.+\-%/:*]+")


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def error(self, message: str, position: int | None = None) -> SpecError:
        return SpecError(message, self.text, self.pos if position is None else position)

    def skip_space(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def peek(self) -> str:
        self.skip_space()
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def expect(self, char: str) -> None:
        if self.peek() != char:
            found = repr(self.peek()) if self.peek() else "end of spec"
            raise self.error(f"expected '{char}', found {found}")
        self.pos += 1

    def regex(self, pattern: re.Pattern[str], what: str) -> str:
        self.skip_space()
        match = pattern.match(self.text, self.pos)
        if not match:
            found = repr(self.text[self.pos]) if self.pos < len(self.text) else "end of spec"
            raise self.error(f"expected {what}, found {found}")
        self.pos = match.end()
        return match.group(0)

    def pipeline(self) -> list[ParsedStep]:
        if not self.text.strip():
            raise self.error("empty pipeline spec: name at least one pass", 0)
        steps = [self.step()]
        while self.peek() == ",":
            self.pos += 1
            steps.append(self.step())
        if self.peek():
            raise self.error(f"unexpected {self.peek()!r} after pass '{steps[-1].name}'")
        return steps

    def step(self) -> ParsedStep:
        self.skip_space()
        start = self.pos
        name = self.regex(_NAME, "a pass name (kebab-case, like 'fold-ln')")
        options: list[ParsedOption] = []
        if self.peek() == "(":
            self.pos += 1
            if self.peek() != ")":
                options.append(self.option())
                while self.peek() == ",":
                    self.pos += 1
                    options.append(self.option())
            self.expect(")")
        seen: set[str] = set()
        for option in options:
            if option.key in seen:
                raise self.error(
                    f"option '{option.key}' given twice to '{name}'", option.key_position
                )
            seen.add(option.key)
        return ParsedStep(name, tuple(options), start)

    def option(self) -> ParsedOption:
        self.skip_space()
        key_position = self.pos
        key = self.regex(_KEY, "an option name (snake_case, like 'bits')")
        self.expect("=")
        self.skip_space()
        position = self.pos
        return ParsedOption(key, self.value(), position, key_position)

    def value(self) -> Any:
        char = self.peek()
        if char in ("'", '"'):
            end = self.text.find(char, self.pos + 1)
            if end < 0:
                raise self.error("unterminated string")
            text = self.text[self.pos + 1 : end]
            self.pos = end + 1
            return text
        if char == "[":
            self.pos += 1
            items: list[Any] = []
            if self.peek() != "]":
                items.append(self.value())
                while self.peek() == ",":
                    self.pos += 1
                    items.append(self.value())
            self.expect("]")
            return items
        number = _NUMBER.match(self.text, self.pos)
        if number:
            self.pos = number.end()
            text = number.group(0)
            return float(text) if any(c in text for c in ".eE") else int(text)
        word = self.regex(_WORD, "a value")
        return {"true": True, "false": False, "none": None}.get(word.lower(), word)


def parse_pipeline(text: str) -> list[ParsedStep]:
    """Parse a pipeline spec into steps with raw option values (typed later by each pass)."""
    return _Parser(text).pipeline()


_BUDGET = re.compile(r"^\s*([a-z_]+)\s*\+\s*(\d+(?:\.\d*)?(?:[eE][+-]?\d+)?)\s*(%?)\s*$")


@dataclasses.dataclass(frozen=True)
class Budget:
    """How much a metric may grow: ``ppl+2%`` (relative) or ``ppl+0.5`` (absolute).

    Metrics: ``ppl`` (perplexity), ``loss`` (mean cross-entropy), ``err`` (max abs output error).
    """

    metric: str
    amount: float
    relative: bool

    METRICS = ("ppl", "loss", "err")

    @classmethod
    def parse(cls, text: str) -> Budget:
        match = _BUDGET.match(text)
        if not match:
            raise ValueError(
                f"budget {text!r} is not '<metric>+<amount>' or '<metric>+<amount>%' "
                f"(for example 'ppl+2%' or 'ppl+0.5')"
            )
        metric, amount, percent = match.groups()
        if metric not in cls.METRICS:
            raise ValueError(f"budget metric '{metric}' is not one of {', '.join(cls.METRICS)}")
        value = float(amount)
        return cls(metric, value / 100 if percent else value, bool(percent))

    def limit(self, baseline: float) -> float:
        """The largest allowed value of the metric given its baseline."""
        return baseline * (1 + self.amount) if self.relative else baseline + self.amount

    def allows(self, baseline: float, value: float) -> bool:
        return value <= self.limit(baseline)

    def __str__(self) -> str:
        if self.relative:
            return f"{self.metric}+{self.amount * 100:g}%"
        return f"{self.metric}+{self.amount:g}"
