"""Backends: lower a rewritten graph to a runtime and check it against the graph.

One module or folder per backend, each with its full Python API (``rewriter.backends.onnx``,
``.mlir``, ``.hls``, ``.triton``, loaded on first use) and one class implementing the shared
interface :class:`~rewriter.backends.base.Backend` (export into a folder, check against the
graph, measure; the ``rewriter::`` ops it lowers natively, the others through their ATen
decompositions). This module is the registry, as ``rewriter.passes`` is for passes: built-in
backends are listed in :data:`BUILTIN` as ``"module:Class"`` strings and imported only when
asked for; third-party ones join with :func:`register_backend`::

    class MyBackend(rewriter.backends.base.Backend):
        name = "my-runtime"
        ...

    rewriter.register_backend(MyBackend)
    rewriter.backends.get_backend("my-runtime").export(gm, None, "out")

The CLI's ``--backend`` choices are :func:`available` (``rewriter run --backend NAME``).
"""

from __future__ import annotations

if __name__ == "backends":  # the bare name from the repository root: see rewriter/_toplevel.py
    import runpy

    runpy.run_path(
        f"{__path__[0]}/../rewriter/_toplevel.py", {"NAME": __name__, "FOLDER": __path__[0]}
    )

import importlib
import re
from types import ModuleType
from typing import Any

_SUBMODULES = ("base", "hls", "mlir", "onnx", "triton")
__all__ = ["BUILTIN", "available", "get_backend", "register_backend", *_SUBMODULES]

BUILTIN: dict[str, str] = {
    "onnx": "rewriter.backends.onnx:OnnxBackend",
    "mlir": "rewriter.backends.mlir:MlirBackend",
    "hls": "rewriter.backends.hls:HlsBackend",
    "triton": "rewriter.backends.triton:TritonBackend",
}

_USER: dict[str, type] = {}
_NAME = re.compile(r"^[a-z][a-z0-9]*(?:-[a-z0-9]+)*$")


def __getattr__(name: str) -> ModuleType:
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def available() -> list[str]:
    """Every registered backend name, built-in ones first (whether each runs here:
    ``get_backend(name).available()``)."""
    return list(BUILTIN) + [n for n in _USER if n not in BUILTIN]


def get_backend(name: str) -> Any:
    """An instance of the backend registered under ``name``."""
    if name in _USER:
        return _USER[name]()
    if name not in BUILTIN:
        raise KeyError(f"unknown backend '{name}' (available: {', '.join(available())})")
    module, cls = BUILTIN[name].split(":")
    return getattr(importlib.import_module(module), cls)()


def register_backend(cls: type) -> type:
    """Register a third-party backend class (a subclass of ``Backend``; usable as a decorator)."""
    from rewriter.backends.base import Backend

    if not (isinstance(cls, type) and issubclass(cls, Backend)):
        raise TypeError(f"register_backend takes a subclass of Backend, got {cls!r}")
    name = getattr(cls, "name", "")
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"backend name {name!r} of {cls.__name__} is not kebab-case (like 'onnx')")
    if name in BUILTIN:
        raise ValueError(f"'{name}' is a built-in backend; choose another name")
    existing = _USER.get(name)
    if existing is not None and existing is not cls:
        raise ValueError(f"backend name '{name}' is already registered by {existing.__qualname__}")
    try:
        cls()
    except TypeError as error:  # abstract methods left out
        raise TypeError(
            f"backend {cls.__name__} leaves part of the interface out: {error}"
        ) from None
    _USER[name] = cls
    return cls
