"""MLIR backend through torch-mlir: a rewritten graph as MLIR text in the linalg-on-tensors, TOSA,
StableHLO or torch dialect, and linalg-on-tensors executed on CPU for verification.

Every ``rewriter::`` op is imported through its ATen decomposition (the op contract), and
``aten.scaled_dot_product_attention`` through a decomposition of our own (matmul, mask, softmax,
matmul): torch-mlir's stock one fails at batch >= 2 on Hugging Face's attention. ShiftQuant
unpacking uses int32 floor division with literal power tables (integer ``pow`` and uint8 shifts
have no lowering in linalg or TOSA).

:func:`run` lowers linalg-on-tensors to LLVM with passes the torch-mlir wheel registers
(bufferization, the reference backend's calling-convention rewrites, loops, LLVM) and runs it
with MLIR's ``ExecutionEngine``; results come back through a callback per return signature.
"""

from __future__ import annotations

import ctypes
import dataclasses
import importlib.util
import math
import os
import re
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.fx
from rewriter.backends.base import Backend, Exported, Measurement, artifact_bytes, example_inputs

from rewriter import ops
from rewriter.errors import LoweringError
from rewriter.ir.graph import copy_graph_module, input_dependent, node_values
from rewriter.ir.trace import trace_info

__all__ = [
    "DIALECTS",
    "LIMITS",
    "MlirBackend",
    "MlirExport",
    "available",
    "check",
    "export",
    "run",
]

aten = torch.ops.aten
Dialect = Literal["linalg-on-tensors", "tosa", "stablehlo", "torch"]
DIALECTS: tuple[str, ...] = ("linalg-on-tensors", "tosa", "stablehlo", "torch")

LIMITS: dict[tuple[str, str], str] = {
    ("dynamic", "tosa"): "TOSA needs static shapes (its lowering fails on aten.size.int)",
    ("dynamic", "stablehlo"): "StableHLO fails on cumsum with dynamic shapes",
}
"""(graph kind, dialect) pairs known not to lower, with why (measured; ``docs/backends.md``)."""


def available() -> tuple[bool, str]:
    if importlib.util.find_spec("torch_mlir") is None:
        return False, "torch-mlir is not installed (pip install 'rewriter[mlir]', Python 3.11)"
    return True, "torch-mlir"


@dataclasses.dataclass
class MlirExport:
    """MLIR text of a graph, where it was written, and its signature."""

    text: str
    dialect: str
    path: Path | None
    input_shapes: list[list[int]]
    decomposed: list[str]
    """The ``rewriter::`` ops imported through their decompositions."""
    module: Any = dataclasses.field(default=None, repr=False)
    """The live torch-mlir module (its context knows torch-mlir's own dialects)."""


# --- export ---------------------------------------------------------------------------------------


def _sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """Scaled dot-product attention as matmul, additive mask, softmax, matmul (any batch)."""
    if dropout_p:
        raise LoweringError("attention dropout cannot be exported (eval graphs have none)")
    if enable_gqa and k.shape[-3] != q.shape[-3]:
        repeat = q.shape[-3] // k.shape[-3]
        k = k.repeat_interleave(repeat, -3)
        v = v.repeat_interleave(repeat, -3)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q @ k.transpose(-2, -1)) * scale
    if is_causal:
        t, s = q.shape[-2], k.shape[-2]
        keep = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(s - t)
        scores = scores.masked_fill(~keep, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
    return torch.softmax(scores, -1) @ v


_SDPA = ops.OpContract(
    name="scaled_dot_product_attention",
    overload=aten.scaled_dot_product_attention.default,
    reference=_sdpa,
    decomposition=_sdpa,
    summary="attention as matmul, mask, softmax, matmul",
)


def export(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[torch.Tensor] | None = None,
    path: str | os.PathLike[str] | None = None,
    *,
    dialect: Dialect = "linalg-on-tensors",
    dynamic: bool = False,
) -> MlirExport:
    """MLIR text of ``gm`` (not changed) in ``dialect``, written to ``path`` when given.

    Shapes are static (the example inputs', by default the trace's) unless ``dynamic``, which
    keeps the trace's dynamic dims and only lowers to linalg-on-tensors and torch (``LIMITS``).
    """
    runs, why = available()
    if not runs:
        raise LoweringError(f"MLIR export: {why}")
    if dialect not in DIALECTS:
        raise LoweringError(f"MLIR export: unknown dialect {dialect!r} (one of {DIALECTS})")
    if dynamic and ("dynamic", dialect) in LIMITS:
        raise LoweringError(
            f"MLIR export: {LIMITS[('dynamic', dialect)]}; export with static shapes"
        )
    info = trace_info(gm)
    if example_inputs is None:
        if info is None or info.example_inputs is None:
            raise LoweringError("MLIR export needs example inputs (the graph has no trace info)")
        example_inputs = info.example_inputs
    args = tuple(example_inputs)
    work = copy_graph_module(gm)
    decomposed = sorted(ops.rewriter_nodes(work))
    ops.decompose(work, extra=[_SDPA])  # every rewriter:: op, and attention our way
    if not dynamic:  # fixed shapes: size arithmetic and what depends only on it become constants
        from rewriter.ir.trace import trace

        work = trace(_Positional(work), args)
    _fold_constants(work, args)
    from torch_mlir import fx

    dynamic_shapes = None
    if dynamic:
        batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
        # one entry for _Positional's *args, itself a tuple with one dict per input
        dynamic_shapes = (tuple({0: batch, 1: seq} if a.dim() >= 2 else {} for a in args),)
    try:
        module = fx.export_and_import(
            _Positional(work), *args, output_type=dialect, dynamic_shapes=dynamic_shapes
        )
    except Exception as error:  # torch-mlir reports lowering failures as plain exceptions
        lines = [line for line in str(error).splitlines() if "error:" in line] or [str(error)]
        raise LoweringError(
            f"MLIR export to {dialect} failed: {lines[0].split('error:')[-1].strip()[:400]}"
        ) from error
    if not module.operation.verify():
        raise LoweringError(f"the {dialect} module torch-mlir produced does not verify")
    text = str(module)
    target = Path(path) if path is not None else None
    if target is not None:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    return MlirExport(text, dialect, target, [list(a.shape) for a in args], decomposed, module)


def _fold_constants(gm: torch.fx.GraphModule, args: tuple[torch.Tensor, ...]) -> None:
    """Replace every value that does not depend on the inputs (masks, positions, rotary tables,
    unpacked weights) by a constant: simpler MLIR, and no ``cumsum`` scan (``tm_tensor``, which
    the wheel's Python context cannot parse back)."""
    from rewriter.ir.store import weights

    dependent = input_dependent(gm)
    frontier = [
        n
        for n in gm.graph.nodes
        if n.op == "call_function" and n not in dependent and any(u in dependent for u in n.users)
    ]
    if not frontier:
        return
    wanted = set(frontier)
    values = node_values(gm, args, keep=wanted.__contains__)
    store = weights(gm)
    for node in frontier:
        value = values.get(node)
        if not isinstance(value, torch.Tensor):
            continue
        name = store.fresh_name(f"folded_{node.name}")
        gm.register_buffer(name, value.detach().clone())
        with gm.graph.inserting_before(node):
            constant = gm.graph.get_attr(name)
        constant.meta = dict(node.meta)
        node.replace_all_uses_with(constant)
    gm.graph.eliminate_dead_code()
    gm.recompile()


class _Positional(torch.nn.Module):
    """The graph with positional inputs and a flat tuple of tensor outputs (what MLIR returns)."""

    def __init__(self, gm: torch.fx.GraphModule) -> None:
        super().__init__()
        self.gm = gm

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.gm(*args)
        flat, _ = torch.utils._pytree.tree_flatten(out)
        return tuple(t for t in flat if isinstance(t, torch.Tensor))


# --- execution ------------------------------------------------------------------------------------


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


# --- the shared backend interface (rewriter.backends.base) ---------------------------------------


class MlirBackend(Backend):
    """MLIR through the shared interface: ``model.mlir`` in the output folder, static shapes of
    the inputs; checked and measured by compiling linalg-on-tensors to LLVM on this CPU."""

    name = "mlir"
    summary = "MLIR text (torch-mlir); linalg-on-tensors runs on this CPU"
    label = "MLIR (linalg on CPU)"
    options = ("dialect",)

    def available(self) -> tuple[bool, str]:
        return available()

    def native(self) -> frozenset[str]:
        return frozenset()  # every rewriter:: op is imported through its decomposition

    def export(
        self,
        gm: torch.fx.GraphModule,
        inputs: Sequence[torch.Tensor] | None,
        out: str | os.PathLike[str],
        *,
        dialect: Dialect = "linalg-on-tensors",
        **options: Any,
    ) -> Exported:
        args = example_inputs(gm, inputs)
        result = export(gm, args, Path(out) / "model.mlir", dialect=dialect, **options)
        info = {"dialect": dialect, "path": str(result.path), "decomposed": result.decomposed}
        return Exported(self.name, result.path or Path(out), result, info, args)

    def checkable(self, exported: Exported) -> tuple[bool, str]:
        if exported.result.dialect != "linalg-on-tensors":
            return False, f"only linalg-on-tensors runs on this CPU, not {exported.result.dialect}"
        return available()

    def _runnable(self, exported: Exported) -> MlirExport:
        result = exported.result
        if result.dialect != "linalg-on-tensors":
            raise LoweringError(
                f"the MLIR backend runs linalg-on-tensors on this CPU, not {result.dialect}: "
                "export with dialect='linalg-on-tensors' to check or measure"
            )
        return result

    def check(
        self,
        gm: torch.fx.GraphModule,
        exported: Exported,
        inputs: Sequence[torch.Tensor] | None = None,
    ) -> Any:
        return check(gm, self._runnable(exported), exported.inputs if inputs is None else inputs)

    def measure(
        self,
        exported: Exported,
        inputs: Sequence[torch.Tensor] | None = None,
        *,
        repeats: int = 10,
    ) -> Measurement:
        if repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {repeats}")
        timings: list[float] = []
        run(
            self._runnable(exported),
            exported.inputs if inputs is None else inputs,
            timings=timings,
            repeats=repeats + 1,  # the first of them warms up
        )
        timings = timings[1:]
        return Measurement(
            self.name,
            statistics.median(timings),
            min(timings),
            max(timings),
            repeats,
            artifact_bytes(exported.path),
        )
