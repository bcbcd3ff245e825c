"""Backends: lower a rewritten graph to a runtime and check it against the graph.

One module or folder per backend. Each declares, as data, the ``rewriter::`` ops it lowers
natively (``NATIVE``); other ``rewriter::`` ops go through their ATen decompositions
(:func:`rewriter.ops.check_lowerable`). Submodules load on first use:
``rewriter.backends.onnx``, ``rewriter.backends.triton``.
"""

from __future__ import annotations

if __name__ == "backends":  # the bare name from the repository root: see rewriter/_toplevel.py
    import runpy

    runpy.run_path(
        f"{__path__[0]}/../rewriter/_toplevel.py", {"NAME": __name__, "FOLDER": __path__[0]}
    )

import importlib
from types import ModuleType

__all__ = ["hls", "mlir", "onnx", "triton"]


def __getattr__(name: str) -> ModuleType:
    if name in __all__:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
