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

from rewriter.registry import Registry

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


def _base() -> type:
    from rewriter.pipeline import Pass

    return Pass


_REGISTRY = Registry("pass", BUILTIN, _base, "fold-ln")


def get_pass(name: str) -> type:
    """The pass class registered under ``name``."""
    return _REGISTRY.get(name)


def available() -> list[str]:
    """Every registered pass name, built-in ones first."""
    return _REGISTRY.names()


def register_pass(cls: type) -> type:
    """Register a third-party pass class (usable as a decorator)."""
    return _REGISTRY.register(cls)
