"""No folder of ours hides an installed package when Python runs from the repository root.

``python -m pytest``, ``python -c`` and notebooks put the root first on ``sys.path``. Before this
test, ``kernels/__init__.py`` made ``import kernels`` resolve to our folder, and ``transformers``
(which imports Hugging Face's ``kernels`` while tracing) failed with an ImportError.

For every top-level folder NAME, a subprocess started in the root with ``python -m`` semantics
(``sys.path[0]`` is the root) imports NAME twice:

* with a stand-in installed package of that name on ``sys.path`` after the root: the stand-in must
  be imported, never our folder;
* as the machine is: the import must fail, or give a package from outside our folder (a real
  installed distribution), or give our own distribution where NAME is ``rewriter``. Folders
  without an ``__init__.py`` (``tests``, ``docs``, ...) are namespace portions: they run no code
  and yield to any installed package (the first case), so they are the one kind of "our folder"
  allowed here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _folders() -> list[str]:
    """The repository's top-level folders: those git tracks (not build/ or out/ of a run)."""
    try:
        tracked = subprocess.run(
            ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True, timeout=60
        ).stdout.splitlines()
        names = {line.split("/", 1)[0] for line in tracked if "/" in line}
    except (OSError, subprocess.SubprocessError):  # not a checkout: every folder there
        names = {p.name for p in ROOT.iterdir() if p.is_dir()}
    return sorted(n for n in names if n.isidentifier() and (ROOT / n).is_dir())


FOLDERS = _folders()
PROBE = """
import importlib, json, sys
name = sys.argv[1]
try:
    module = importlib.import_module(name)
except ImportError as error:
    print(json.dumps({"error": str(error)}))
else:
    print(json.dumps({
        "file": getattr(module, "__file__", None),
        "path": [str(p) for p in getattr(module, "__path__", [])],
        "marker": getattr(module, "STAND_IN", None),
    }))
"""


def _probe(name: str, tmp_path: Path, extra_path: Path | None = None) -> dict:
    """``python -m probe NAME`` run in the root: the root is ``sys.path[0]``, as for ``-m``."""
    probe_dir = tmp_path / "probe"
    probe_dir.mkdir(exist_ok=True)
    (probe_dir / "rewriter_import_probe.py").write_text(PROBE)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}
    env["PYTHONPATH"] = os.pathsep.join(str(p) for p in (probe_dir, extra_path) if p)
    done = subprocess.run(
        [sys.executable, "-m", "rewriter_import_probe", name],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _inside(path: str | None, folder: Path) -> bool:
    return path is not None and Path(path).resolve().is_relative_to(folder)


def test_the_folders_are_found() -> None:
    assert {"kernels", "passes", "backends", "rewriter", "tests"} <= set(FOLDERS)


@pytest.mark.parametrize("name", FOLDERS)
def test_an_installed_package_of_the_same_name_wins(name: str, tmp_path: Path) -> None:
    if name == "rewriter":
        pytest.skip("rewriter is our own distribution: from the root it is this folder")
    site = tmp_path / "site"
    (site / name).mkdir(parents=True)
    (site / name / "__init__.py").write_text("STAND_IN = 'installed'\n")
    got = _probe(name, tmp_path, site)
    assert got.get("marker") == "installed", f"import {name} from the root gave {got}"
    assert not any(_inside(p, ROOT / name) for p in [got["file"], *got["path"]]), got


@pytest.mark.parametrize("name", FOLDERS)
def test_without_one_the_import_fails_or_runs_none_of_our_code(name: str, tmp_path: Path) -> None:
    got = _probe(name, tmp_path)
    if "error" in got:
        return
    if name == "rewriter":  # our own distribution (installed editable by make)
        assert got["file"] == str(ROOT / "rewriter" / "__init__.py"), got
        return
    ours = any(_inside(p, ROOT / name) for p in [got["file"], *got["path"]])
    if ours:
        # Only a namespace portion may come from our folder: no __init__, no code run.
        assert got["file"] is None and not (ROOT / name / "__init__.py").exists(), (
            f"import {name} from the root ran our folder {ROOT / name}: {got}"
        )


def test_the_folders_still_import_under_rewriter() -> None:
    import rewriter.backends
    import rewriter.kernels
    import rewriter.passes
    from rewriter.backends import hls

    assert rewriter.kernels.__name__ == "rewriter.kernels"
    assert (hls.KERNELS / "rw_common.h").exists()
    assert "canonicalize" in rewriter.passes.available()
    assert rewriter.backends.__name__ == "rewriter.backends"
