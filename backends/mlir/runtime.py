"""linalg-on-tensors MLIR executed on this CPU, and checked against its graph.

:func:`run` lowers linalg-on-tensors to LLVM with passes the torch-mlir wheel registers
(bufferization, the reference backend's calling-convention rewrites, loops, LLVM) and runs it
with MLIR's ``ExecutionEngine``; results come back through a callback per return signature.
"""

from __future__ import annotations

import ctypes
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.fx
from rewriter.backends.mlir.exporter import MlirExport, available

from rewriter.errors import LoweringError

__all__ = ["check", "run"]


def _lowering(verify: bool) -> str:
    passes = [
        "func.func(linalg-generalize-named-ops)",
        "func.func(linalg-fuse-elementwise-ops)",
        "convert-shape-to-std",
        "func.func(refback-generalize-tensor-pad)",
        "func.func(refback-generalize-tensor-concat)",
        "func.func(tm-tensor-bufferize)",
        "one-shot-bufferize{copy-before-write bufferize-function-boundaries "
        "function-boundary-type-conversion=identity-layout-map}",
        "refback-mlprogram-bufferize",
        "func.func(buffer-deallocation-pipeline)",
        "inline",
        "refback-munge-calling-conventions",
        "func.func(tm-tensor-to-loops)",
        "func.func(refback-munge-memref-copy)",
        "func.func(convert-linalg-to-loops)",
        "func.func(lower-affine)",
        "convert-scf-to-cf",
    ]
    if verify:
        passes.append("generate-runtime-verification")
    passes += [
        "func.func(refback-expand-ops-for-llvm)",
        "func.func(arith-expand)",
        "func.func(convert-math-to-llvm)",
        "convert-math-to-libm",
        "expand-strided-metadata",
        "finalize-memref-to-llvm",
        "lower-affine",
        "convert-bufferization-to-memref",
        "finalize-memref-to-llvm",
        "func.func(convert-arith-to-llvm)",
        "convert-vector-to-llvm",
        "convert-func-to-llvm",
        "convert-cf-to-llvm",
        "convert-complex-to-llvm",
        "reconcile-unrealized-casts",
    ]
    return "builtin.module(" + ",".join(passes) + ")"


_RETURN_PREFIX = "refbackend_consume_func_return_"
_NUMPY = {"mrf16": "float16", "mrf32": "float32", "mrf64": "float64", "mri1": "bool",
          "mri8": "int8", "mri32": "int32", "mri64": "int64"}  # fmt: skip


def run(
    source: str | os.PathLike[str] | MlirExport,
    inputs: Sequence[torch.Tensor],
    *,
    function: str = "main",
    verify: bool = False,
    timings: list[float] | None = None,
    repeats: int = 0,
) -> list[torch.Tensor]:
    """Compile linalg-on-tensors MLIR (text, a file, or an :class:`MlirExport`) to LLVM and run
    ``function`` on ``inputs`` on this CPU; returns its results as tensors.

    ``repeats`` more calls of the compiled function (after the first, which returns the
    results) are timed into ``timings`` (seconds per call, compilation excluded)."""
    runs, why = available()
    if not runs:
        raise LoweringError(f"MLIR run: {why}")
    import numpy as np
    from torch_mlir import ir, passmanager
    from torch_mlir.execution_engine import ExecutionEngine
    from torch_mlir.runtime import get_unranked_memref_descriptor

    if isinstance(source, MlirExport):
        if source.dialect != "linalg-on-tensors":
            raise LoweringError(f"MLIR run executes linalg-on-tensors, not {source.dialect}")
        text = source.text
    elif isinstance(source, (str, os.PathLike)) and Path(source).exists():
        text = Path(source).read_text()
    else:
        text = str(source)
    from torch_mlir.dialects import torch as torch_dialect

    signature = re.search(r"func\.func @" + re.escape(function) + r"\(([^)]*)\)", text)
    if signature and "?" in signature.group(1):
        raise LoweringError(
            "MLIR run: the module has dynamic shapes; the reference lowering of this torch-mlir "
            "wheel computes NaN for them and writes out of bounds (measured on GPT-2: heap "
            "corruption). Export with static shapes to execute; the dynamic module is for "
            "downstream compilers (IREE)"
        )
    live = source.module if isinstance(source, MlirExport) else None
    with live.context if live is not None else ir.Context() as context:
        if live is None:
            torch_dialect.register_dialect(context)
        try:
            module = ir.Module.parse(text)
        except Exception as error:
            raise LoweringError(
                f"MLIR run cannot parse the module: {str(error).splitlines()[1][:300]} (a "
                "tm_tensor op from a dynamic-shape export: run the MlirExport object, or export "
                "with static shapes)"
            ) from error
        try:
            passmanager.PassManager.parse(_lowering(verify)).run(module.operation)
        except Exception as error:
            raise LoweringError(f"lowering linalg-on-tensors to LLVM failed: {error}") from error
        engine = ExecutionEngine(module)
        result: dict[str, Any] = {}
        callbacks = _consumers(module, engine, result)  # alive while the engine runs
        arrays = [np.ascontiguousarray(t.detach().cpu().numpy()) for t in inputs]  # kept alive
        arguments = [
            ctypes.pointer(ctypes.pointer(get_unranked_memref_descriptor(array)))
            for array in arrays
        ]
        engine.invoke(function, *arguments)
        for _ in range(repeats):
            start = time.perf_counter()
            engine.invoke(function, *arguments)
            if timings is not None:
                timings.append(time.perf_counter() - start)
    del callbacks
    if "values" not in result:
        raise LoweringError(f"MLIR run: '{function}' returned nothing")
    return [torch.from_numpy(v) for v in result["values"]]


def _consumers(module: Any, engine: Any, result: dict[str, Any]) -> list[Any]:
    """Register a callback for each return signature the calling-convention pass made: the
    lowered function hands its results to ``refbackend_consume_func_return_<types>``."""
    import numpy as np
    from torch_mlir.runtime import UnrankedMemRefDescriptor, unranked_memref_to_numpy

    callbacks = []
    for op in module.body.operations:
        name = str(op.attributes["sym_name"]).strip('"') if "sym_name" in op.attributes else ""
        if not name.startswith(_RETURN_PREFIX):
            continue
        kinds = name[len(_RETURN_PREFIX) :].split("_")
        prototype = ctypes.CFUNCTYPE(None, *[ctypes.POINTER(ctypes.c_void_p) for _ in kinds])

        def consume(*pointers: Any, kinds: list[str] = kinds) -> None:
            values = []
            for pointer, kind in zip(pointers, kinds):
                descriptor = ctypes.cast(pointer, ctypes.POINTER(UnrankedMemRefDescriptor))
                view = unranked_memref_to_numpy(descriptor, np.dtype(_NUMPY[kind]))
                values.append(np.array(view, copy=True))  # the buffer is freed after the call
            result["values"] = values

        callback = prototype(consume)
        callbacks.append(callback)
        engine.register_runtime(name, callback)
    return callbacks


def check(
    gm: torch.fx.GraphModule,
    exported: MlirExport | str | os.PathLike[str],
    inputs: Sequence[torch.Tensor] | None = None,
    *,
    rtol: float | None = None,
    atol: float | None = None,
) -> Any:
    """Run ``gm`` and the linalg-on-tensors export on the same inputs; the error report
    (``rewriter.verify``'s tolerance rule)."""
    from rewriter.verify import compare_outputs, graph_reference

    inputs, reference = graph_reference(gm, inputs)
    return compare_outputs(reference, run(exported, inputs), rtol, atol)
