"""What :func:`rewriter.load` trusts in a ``.pt2`` archive, checked before torch reads it.

``torch.export.load`` unpickles with ``weights_only=False`` in several places: a weight or
tensor constant marked ``use_pickle``, custom and opaque objects among the constants, and the
sample inputs when their ``weights_only=True`` load fails (it falls back). A pickle can run any
code while it loads, so a tampered archive could run code on ``load``. We never write any of
those, so :func:`check_archive` refuses them before torch opens the file:

* every weight and constant is a raw tensor payload (``use_pickle`` false, no custom or opaque
  objects, no legacy ``.pt`` weight files);
* the sample inputs load with ``torch.load(weights_only=True)``, torch's restricted unpickler
  that builds tensors and containers and never calls anything else (so torch's own fallback
  never triggers);
* the output structure names only classes from an allow-list: Python's containers, the model
  output classes of ``transformers`` (``transformers.modeling_outputs`` and the per-model
  ``modeling_*`` modules, subclasses of ``ModelOutput``), and our own. They are resolved by
  name; no other module is imported.

Everything wrong is a :class:`~rewriter.errors.LoadError` naming the entry.
"""

from __future__ import annotations

import collections
import importlib
import io
import json
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from rewriter.errors import LoadError

__all__ = ["check_archive", "output_type"]

_CONTAINERS: dict[str, type] = {
    "builtins.tuple": tuple,
    "builtins.list": list,
    "builtins.dict": dict,
    "collections.OrderedDict": collections.OrderedDict,
}
_TRANSFORMERS_MODULE = re.compile(
    r"^transformers\.(modeling_outputs|models\.[a-z0-9_]+\.modeling_[a-z0-9_]+)$"
)
_TENSOR_CONSTANT = "tensor_"


def output_type(name: str) -> type:
    """The class an output structure names, from the allow-list only (see the module doc)."""
    if name in _CONTAINERS:
        return _CONTAINERS[name]
    module, _, qualname = name.rpartition(".")
    ours = module == "rewriter" or module.startswith("rewriter.")
    if not (ours or _TRANSFORMERS_MODULE.match(module)):
        raise LoadError(
            f"the archive's output structure names {name!r}; load restores only Python's "
            "containers, transformers' model outputs and rewriter's own classes"
        )
    try:
        found: Any = importlib.import_module(module)
        for part in qualname.split("."):
            found = getattr(found, part)
    except (ImportError, AttributeError):
        raise LoadError(
            f"the archive's output structure names {name!r}, which does not exist"
        ) from None
    if not isinstance(found, type) or (not ours and not _is_model_output(found)):
        raise LoadError(
            f"the archive's output structure names {name!r}, which is not an output class"
        )
    return found


def _is_model_output(cls: type) -> bool:
    from transformers.utils import ModelOutput

    return issubclass(cls, ModelOutput)


def check_archive(path: str | Path, outputs_file: str) -> None:
    """Refuse an archive ``torch.export.load`` would unpickle code from (see the module doc)."""
    path = Path(path)
    if not path.is_file():
        raise LoadError(f"{path}: no such file")
    if not zipfile.is_zipfile(path):
        raise LoadError(f"{path}: not a .pt2 archive (not a zip file)")
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        for name in names:
            _check_entry(archive, name, path)
        structure = next((n for n in names if n.endswith(f"/extra/{outputs_file}")), None)
        if structure is not None:
            _check_structure(json.loads(archive.read(structure)))


def _check_entry(archive: zipfile.ZipFile, name: str, path: Path) -> None:
    parts = name.split("/")
    where = f"{path}: {name}"
    if len(parts) == 4 and parts[1] == "data" and parts[2] in ("weights", "constants"):
        if parts[3].endswith(".pt"):
            raise LoadError(f"{where}: a pickled {parts[2]} file (load reads raw tensors only)")
        if parts[3].endswith("_config.json"):
            config = json.loads(archive.read(name)).get("config", {})
            for key, entry in config.items():
                if entry.get("use_pickle"):
                    raise LoadError(f"{where}: {key!r} is stored as a pickle ('use_pickle')")
                if parts[2] == "constants" and not entry.get("path_name", "").startswith(
                    _TENSOR_CONSTANT
                ):
                    raise LoadError(f"{where}: {key!r} is a custom object, not a tensor")
    elif len(parts) == 4 and parts[1:3] == ["data", "sample_inputs"]:
        try:
            torch.load(io.BytesIO(archive.read(name)), weights_only=True)
        except Exception as error:  # noqa: BLE001 - any refusal of the restricted unpickler
            raise LoadError(f"{where}: not plain tensors ({type(error).__name__})") from None


def _check_structure(node: Any) -> None:
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            output_type(str(item.get("type")))
            stack.extend(item.get("children") or [])
