"""Every example runs as a script (each user-visible capability has one).

Each example runs as ``__main__`` in a process of its own, as ``python examples/X.py`` would,
but forked from one runner that has already imported torch, transformers, ONNX Runtime and
rewriter: those imports took about 6 s of every example's start on 2 cores. The runner computes
nothing before forking, so no thread pool is copied into the children.
"""

from __future__ import annotations

import importlib.util
import json
import os
import select
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.py"))


NEEDS = {"12_triton": ("triton",), "13_hls": ("hls4ml", "g++"), "14_mlir": ("torch_mlir",)}
"""Examples that need an optional package or tool (skipped with the reason when absent)."""

TIMEOUT = 600

RUNNER = r"""
import json, os, runpy, sys, traceback
import onnxruntime, torch, transformers  # the imports every example pays for, paid once
import rewriter, rewriter.backends.onnx
print("ready", flush=True)
for line in sys.stdin:
    path, log = json.loads(line)
    pid = os.fork()
    if pid == 0:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        sys.argv = [path]
        sys.path[0] = os.path.dirname(path)  # as `python examples/X.py` sets it
        code = 0
        try:
            runpy.run_path(path, run_name="__main__")
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else int(stop.code is not None)
            if not isinstance(stop.code, (int, type(None))):
                print(stop.code, file=sys.stderr)  # as the interpreter does for sys.exit("...")
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    print(json.dumps(os.waitstatus_to_exitcode(status)), flush=True)
"""


@pytest.fixture(scope="module")
def runner() -> Iterator[subprocess.Popen[str]]:
    env = {**os.environ, "REWRITER_NO_PROGRESS": "1", "PYTHONWARNINGS": "ignore"}
    process = subprocess.Popen(
        [sys.executable, "-c", RUNNER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert _line(process, 120) == "ready"
    yield process
    process.stdin.close()  # type: ignore[union-attr]
    process.wait(timeout=60)


def _line(process: subprocess.Popen[str], timeout: float) -> str:
    ready, _, _ = select.select([process.stdout], [], [], timeout)
    if not ready:
        process.kill()
        pytest.fail(f"the example runner gave no answer within {timeout} s")
    return process.stdout.readline().strip()  # type: ignore[union-attr]


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_runs(path: Path, runner: subprocess.Popen[str], tmp_path: Path) -> None:
    for need in NEEDS.get(path.stem, ()):
        found = shutil.which(need) if need == "g++" else importlib.util.find_spec(need)
        if found is None:
            pytest.skip(f"{path.name} needs {need}")
    log = tmp_path / "output.txt"
    runner.stdin.write(json.dumps([str(path), str(log)]) + "\n")  # type: ignore[union-attr]
    runner.stdin.flush()  # type: ignore[union-attr]
    code = json.loads(_line(runner, TIMEOUT))
    assert code == 0, log.read_text()[-6000:]
