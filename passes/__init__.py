"""The pass registry: pass name -> pass class, loaded lazily, no import-time side effects.

Built-in passes are listed in :data:`BUILTIN` as ``"module:Class"`` strings (one file per pass,
the file stem is the pass name in snake_case). Third-party passes join with
:func:`register_pass`, after which their names work in pipeline text specs::

    @dataclasses.dataclass(frozen=True)
    class DoubleLogitsPass(rewriter.Pass):
        name: ClassVar[str] = "double-logits"
        ...

    rewriter.register_pass(DoubleLogitsPass)
    rewriter.Pipeline.parse("canonicalize,double-logits")
"""

from __future__ import annotations

if __name__ == "passes":  # the bare name from the repository root: see rewriter/_toplevel.py
    import runpy

    runpy.run_path(
        f"{__path__[0]}/../rewriter/_toplevel.py", {"NAME": __name__, "FOLDER": __path__[0]}
    )

import importlib
import re

__all__ = ["BUILTIN", "available", "get_pass", "register_pass"]

BUILTIN: dict[str, str] = {
    "canonicalize": "rewriter.passes.canonicalize:CanonicalizePass",
    "prernorm": "rewriter.passes.prernorm:PreRMSNormPass",
    "fold-ln": "rewriter.passes.fold_ln:FoldNormPass",
    "crmsnorm": "rewriter.passes.crmsnorm:PreCRMSNormPass",
    "ln-freeze": "rewriter.passes.ln_freeze:FreezeNormPass",
    "l1quant": "rewriter.passes.l1quant:L1QuantPass",
    "linearize": "rewriter.passes.linearize:LinearizePass",
    "lora": "rewriter.passes.lora:LoRAPass",
    "nola": "rewriter.passes.nola:NOLAPass",
    "lora-xs": "rewriter.passes.lora_xs:LoRAXSPass",
    "lora-sb": "rewriter.passes.lora_sb:LoRASBPass",
    "merge-adapters": "rewriter.passes.merge_adapters:MergeAdaptersPass",
    "unmerge-adapters": "rewriter.passes.merge_adapters:UnmergeAdaptersPass",
    "vocab-trim": "rewriter.passes.vocab_trim:VocabTrimPass",
}

_USER: dict[str, type] = {}
_NAME = re.compile(r"^[a-z][a-z0-9]*(?:-[a-z0-9]+)*$")


def get_pass(name: str) -> type:
    """The pass class registered under ``name``."""
    if name in _USER:
        return _USER[name]
    if name not in BUILTIN:
        raise KeyError(f"unknown pass '{name}' (available: {', '.join(available())})")
    module, cls = BUILTIN[name].split(":")
    return getattr(importlib.import_module(module), cls)


def available() -> list[str]:
    """Every registered pass name, built-in ones first."""
    return list(BUILTIN) + [n for n in _USER if n not in BUILTIN]


def register_pass(cls: type) -> type:
    """Register a third-party pass class (usable as a decorator)."""
    from rewriter.pipeline import Pass

    if not (isinstance(cls, type) and issubclass(cls, Pass)):
        raise TypeError(f"register_pass takes a subclass of rewriter.Pass, got {cls!r}")
    name = getattr(cls, "name", "")
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"pass name {name!r} of {cls.__name__} is not kebab-case (like 'fold-ln')")
    if name in BUILTIN:
        raise ValueError(f"'{name}' is a built-in pass; choose another name")
    existing = _USER.get(name)
    if existing is not None and existing is not cls:
        raise ValueError(f"pass name '{name}' is already registered by {existing.__qualname__}")
    _USER[name] = cls
    return cls
