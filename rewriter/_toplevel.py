"""Hands a bare top-level name back to the installed package that owns it (standard library only).

The repository keeps ``passes/``, ``backends/`` and ``kernels/`` at its root; they install as
``rewriter.passes``, ``rewriter.backends`` and ``rewriter.kernels``. Python started from the
root (``python -m pytest``, ``python -c``, a notebook) puts the root first on ``sys.path``, so a
bare ``import kernels`` would find our folder and hide an installed distribution of that name
(Hugging Face's ``kernels``, which ``transformers`` imports while tracing). Each of those folders'
``__init__`` runs this file when it is imported under its bare name: the name is given to the
package found on the rest of ``sys.path`` or, when none is installed, the import fails as if our
folder were not there. ``tests/test_toplevel.py`` checks every top-level folder.
"""

import importlib.machinery
import importlib.util
import os
import sys


def hand_over(name: str, folder: str) -> None:
    """Replace ``sys.modules[name]`` (our ``folder``) by the installed package, or fail."""
    root = os.path.dirname(os.path.abspath(folder))
    path = [p for p in sys.path if os.path.abspath(p or os.curdir) != root]
    spec = importlib.machinery.PathFinder.find_spec(name, path)
    del sys.modules[name]
    if spec is None or spec.loader is None:
        raise ModuleNotFoundError(
            f"No module named {name!r} (the folder {folder} is rewriter.{name}, not {name})",
            name=name,
        )
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise


if "NAME" in globals():  # run by a folder's guard through runpy, which passes NAME and FOLDER
    hand_over(NAME, FOLDER)  # type: ignore[name-defined]  # noqa: F821
