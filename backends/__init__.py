"""Backends: lower a rewritten graph to a runtime and check it against the graph.

One subpackage per backend, each with its full Python API (``rewriter.backends.onnx``,
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
from types import ModuleType
from typing import Any

from rewriter.registry import Registry

_SUBMODULES = ("base", "hls", "mlir", "onnx", "triton")
__all__ = ["BUILTIN", "available", "get_backend", "register_backend", *_SUBMODULES]

BUILTIN: dict[str, str] = {
    "onnx": "rewriter.backends.onnx.backend:OnnxBackend",
    "mlir": "rewriter.backends.mlir.backend:MlirBackend",
    "hls": "rewriter.backends.hls.backend:HlsBackend",
    "triton": "rewriter.backends.triton.backend:TritonBackend",
}


def _base() -> type:
    from rewriter.backends.base import Backend

    return Backend


_REGISTRY = Registry("backend", BUILTIN, _base, "onnx")


def __getattr__(name: str) -> ModuleType:
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def available() -> list[str]:
    """Every registered backend name, built-in ones first (whether each runs here:
    ``get_backend(name).available()``)."""
    return _REGISTRY.names()


def get_backend(name: str) -> Any:
    """An instance of the backend registered under ``name``."""
    return _REGISTRY.get(name)()


def register_backend(cls: type) -> type:
    """Register a third-party backend class (a subclass of ``Backend``; usable as a decorator)."""
    if isinstance(cls, type) and getattr(cls, "__abstractmethods__", None):
        missing = ", ".join(sorted(cls.__abstractmethods__))
        raise TypeError(f"backend {cls.__name__} leaves part of the interface out: {missing}")
    return _REGISTRY.register(cls)
