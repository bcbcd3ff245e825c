"""Name -> class registries, loaded lazily: the pass registry (``rewriter.passes``) and the
backend registry (``rewriter.backends``) are both one of these.

Built-in entries are ``"module:Class"`` strings, imported on first use (no import-time side
effects); third-party classes join with :meth:`Registry.register`, which checks the class and its
kebab-case ``name``."""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable

__all__ = ["Registry"]

_NAME = re.compile(r"^[a-z][a-z0-9]*(?:-[a-z0-9]+)*$")


class Registry:
    """``kind`` names the entries in messages ("pass", "backend"); ``base`` returns the class
    every registered one must subclass (a function, so the base loads only when needed);
    ``example`` is a valid name shown when one is not kebab-case."""

    def __init__(
        self, kind: str, builtin: dict[str, str], base: Callable[[], type], example: str
    ) -> None:
        self.kind = kind
        self.builtin = builtin
        self.user: dict[str, type] = {}
        self._base = base
        self._example = example

    def get(self, name: str) -> type:
        """The class registered under ``name``."""
        if name in self.user:
            return self.user[name]
        if name not in self.builtin:
            raise KeyError(f"unknown {self.kind} '{name}' (available: {', '.join(self.names())})")
        module, cls = self.builtin[name].split(":")
        return getattr(importlib.import_module(module), cls)

    def names(self) -> list[str]:
        """Every registered name, built-in ones first."""
        return list(self.builtin) + [n for n in self.user if n not in self.builtin]

    def register(self, cls: type) -> type:
        """Register a third-party class (usable as a decorator); refuses a class that is not a
        subclass of the base, a name that is not kebab-case, a built-in's name, and a name
        another class already has."""
        base = self._base()
        if not (isinstance(cls, type) and issubclass(cls, base)):
            raise TypeError(
                f"register_{self.kind} takes a subclass of {base.__name__}, got {cls!r}"
            )
        name = getattr(cls, "name", "")
        if not isinstance(name, str) or not _NAME.match(name):
            raise ValueError(
                f"{self.kind} name {name!r} of {cls.__name__} is not kebab-case "
                f"(like '{self._example}')"
            )
        if name in self.builtin:
            raise ValueError(f"'{name}' is a built-in {self.kind}; choose another name")
        existing = self.user.get(name)
        if existing is not None and existing is not cls:
            raise ValueError(
                f"{self.kind} name '{name}' is already registered by {existing.__qualname__}"
            )
        self.user[name] = cls
        return cls
