"""The layering the layout promises: kernels import nothing of ours; the core imports nothing
from passes or backends except through the registry seam in Pipeline.parse; passes import the
core only."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).parent.parent
CORE_FACADES = {"__init__.py", "cli.py", "__main__.py"}


def _imports(path: Path) -> list[tuple[str, int, bool]]:
    """(module, line, at module level) for every import in ``path``."""
    tree = ast.parse(path.read_text())
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno, id(node) in top_level) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.append((node.module, node.lineno, id(node) in top_level))
    return found


def test_core_does_not_reach_up() -> None:
    for path in (ROOT / "rewriter").rglob("*.py"):
        if path.name in CORE_FACADES and path.parent == ROOT / "rewriter":
            continue
        for module, line, top in _imports(path):
            if module.startswith(("rewriter.passes", "rewriter.backends", "rewriter.kernels")):
                seam = path.name == "pipeline.py" and module == "rewriter.passes" and not top
                assert seam, f"{path.name}:{line} imports {module}"


def test_passes_import_only_the_core() -> None:
    for path in (ROOT / "passes").glob("*.py"):
        for module, line, _ in _imports(path):
            assert not module.startswith(("rewriter.backends", "rewriter.kernels")), (
                f"{path.name}:{line}"
            )


def test_kernels_import_nothing_of_ours() -> None:
    for path in (ROOT / "kernels").rglob("*.py"):
        for module, line, _ in _imports(path):
            assert not module.startswith("rewriter"), f"{path}:{line} imports {module}"


def test_every_package_folder_is_installed() -> None:
    # pyproject lists packages explicitly (the top-level folders map into `rewriter`); a new
    # subpackage missing from the list only shows up in the slow wheel test otherwise.
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    roots = {folder: package for package, folder in config["package-dir"].items()}
    for folder, package in roots.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / folder).parts
            name = ".".join((package, *relative))
            if "data" in relative:
                continue
            assert name in listed, f"{init.parent} is a package; pyproject does not install {name}"


def test_passes_and_backends_use_only_public_names_of_the_core() -> None:
    # what a pass or a backend needs from the core is public API there (rewriter.train.forward,
    # not _forward): a private import is a helper that belongs in the core's interface
    for folder in ("passes", "backends"):
        for path in (ROOT / folder).rglob("*.py"):
            tree = ast.parse(path.read_text())
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("rewriter"):
                    if node.module.startswith(("rewriter.passes", "rewriter.backends")):
                        continue  # within the same layer
                    private = [a.name for a in node.names if a.name.startswith("_")]
                    assert not private, f"{path.relative_to(ROOT)}:{node.lineno} imports {private}"
