"""The layering the layout promises: kernels import nothing of ours; the core imports nothing
from passes or backends except through the registry seam in Pipeline.parse; passes import the
core only; inside the core each layer imports only the layers below it (docs/architecture.md);
no module takes part in an import cycle."""

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
            if node.module == "rewriter":  # from rewriter import checkpoint: a module too
                found += [
                    (f"rewriter.{a.name}", node.lineno, id(node) in top_level) for a in node.names
                ]
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


# (pass file, pass module it imports) still to move into the core: none (a stale entry fails).
KNOWN_PASS_IMPORTS: set[tuple[str, str]] = set()


def _pass_modules_imported(path: Path, stems: set[str]) -> list[tuple[str, int]]:
    """(rewriter.passes.<stem>, line) for every import of a pass module in ``path``: absolute,
    relative, through the bare ``passes`` name, or ``from rewriter.passes import <stem>``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # from . import lora / from .lora import x
                base = ".".join(filter(None, ("rewriter.passes", node.module)))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            parts = target.split(".")
            if parts[0] == "passes":  # the bare name from the repository root
                parts = ["rewriter", *parts]
            if parts[:2] == ["rewriter", "passes"] and len(parts) > 2 and parts[2] in stems:
                found.append((f"rewriter.passes.{parts[2]}", node.lineno))
    return found


def test_passes_do_not_import_each_other() -> None:
    # what two passes share is a helper of the core (rewriter.analysis.adapters,
    # rewriter.analysis.canonicalize, ...), not one pass reaching into another; the registry
    # (rewriter.passes itself) is the one module of the layer a pass may import
    stems = {path.stem for path in (ROOT / "passes").glob("*.py")} - {"__init__"}
    seen = set()
    for path in sorted((ROOT / "passes").glob("*.py")):
        for module, line in _pass_modules_imported(path, stems):
            if (path.name, module) in KNOWN_PASS_IMPORTS:
                seen.add((path.name, module))
                continue
            raise AssertionError(f"passes/{path.name}:{line} imports the pass module {module}")
    assert seen == KNOWN_PASS_IMPORTS, f"stale known exceptions: {KNOWN_PASS_IMPORTS - seen}"


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


# The core's layers, bottom first: a module may import its own layer and the ones before it.
# The facade (rewriter/__init__.py), the CLI, the test helpers and the zoo sit on top of all.
LAYERS = (
    ("errors", "context", "registry"),
    ("ir",),
    ("checkpoint",),
    ("rewrite",),
    ("ops",),
    ("analysis",),
    ("verify",),
    ("pipeline",),
    ("io",),
    ("deploy",),
)
TOP = ("__init__", "__main__", "_toplevel", "cli", "testing", "zoo")
_PLACED = {name for layer in LAYERS for name in layer} | set(TOP)


def _layer_of(name: str) -> int | None:
    """Index in LAYERS of ``rewriter.<name>...``; None for the top; KeyError if unplaced."""
    if name in TOP:
        return None
    for index, layer in enumerate(LAYERS):
        if name in layer:
            return index
    raise KeyError(name)


def _core_part(path: Path) -> str:
    relative = path.relative_to(ROOT / "rewriter")
    return relative.parts[0].removesuffix(".py")


def test_every_core_module_is_in_a_layer() -> None:
    for path in (ROOT / "rewriter").rglob("*.py"):
        try:
            _layer_of(_core_part(path))
        except KeyError:
            raise AssertionError(f"{path.relative_to(ROOT)} is in no layer of LAYERS") from None


def test_each_layer_imports_only_the_layers_below() -> None:
    for path in (ROOT / "rewriter").rglob("*.py"):
        own = _layer_of(_core_part(path))
        if own is None:
            continue
        for module, line, _ in _imports(path):
            parts = module.split(".")
            if parts[0] != "rewriter" or len(parts) < 2 or parts[1] in ("passes", "backends"):
                continue  # passes / backends: test_core_does_not_reach_up
            if parts[1] in ("kernels",) or (parts[1] not in _PLACED):
                continue  # kernels: test_core_does_not_reach_up; facade names (rewriter.trace)
            target = _layer_of(parts[1])
            assert target is not None and target <= own, (
                f"{path.relative_to(ROOT)}:{line} imports {module}, a layer above its own"
            )


def test_our_code_uses_the_new_module_names() -> None:
    # rewriter.MOVED keeps old dotted names importing for users; our code names the new ones
    # (`from rewriter import vocab` is the facade's attribute, public API, and stays allowed)
    from rewriter import MOVED

    old = tuple(f"rewriter.{name}" for name in MOVED)
    for folder in ("rewriter", "passes", "backends", "kernels", "tests", "examples", "benchmarks"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    modules = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module:
                    modules = [node.module]
                else:
                    continue
                for module in modules:
                    hit = [o for o in old if module == o or module.startswith(o + ".")]
                    assert not hit, f"{path.relative_to(ROOT)}:{node.lineno} imports {module}"


def test_old_module_names_import_the_same_modules() -> None:
    import importlib

    import rewriter

    for old, new in rewriter.MOVED.items():
        assert importlib.import_module(f"rewriter.{old}") is importlib.import_module(new)
    assert callable(rewriter.trace) and callable(rewriter.train)  # facade names stay functions


def _module_graph() -> dict[str, set[str]]:
    """Every module of ours (rewriter.*, with passes/backends/kernels under rewriter) to the
    modules of ours it imports at module level (imports inside functions are deferred: they
    cannot deadlock an import, and the seam in Pipeline.parse is one on purpose)."""
    roots = {"rewriter": "rewriter", "passes": "rewriter.passes", "backends": "rewriter.backends"}
    roots["kernels"] = "rewriter.kernels"
    names: dict[str, Path] = {}
    for folder, package in roots.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            if "data" in parts:
                continue
            if parts[-1] == "__init__":
                parts = parts[:-1]
            names[".".join((package, *parts))] = path
    graph: dict[str, set[str]] = {}
    for name, path in names.items():
        tree = ast.parse(path.read_text())
        found: set[str] = set()
        for node in tree.body:  # module level only
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            for target in targets:
                while target and target not in names:
                    target = target.rpartition(".")[0]
                if target and target != name and not name.startswith(target + "."):
                    found.add(target)  # a package's own __init__ is not a cycle
        graph[name] = found
    return graph


def test_no_import_cycles() -> None:
    graph = _module_graph()
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(name: str) -> None:
        state[name] = 1
        stack.append(name)
        for target in sorted(graph[name]):
            if state.get(target) == 1:
                cycle = [*stack[stack.index(target) :], target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        stack.pop()
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)
