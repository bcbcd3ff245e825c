"""Running an exported model in ONNX Runtime on CPU, and checking it against its graph."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.fx
from rewriter.backends.onnx.exporter import OnnxExportError

from rewriter.verify import ErrorReport, compare_outputs, graph_reference

__all__ = ["check", "run", "session"]


def session(
    path: str | os.PathLike[str],
    *,
    threads: int | None = None,
    accuracy_level: int | None = None,
    optimized_model_path: str | None = None,
    spinning: bool = True,
) -> Any:
    """An ORT CPU ``InferenceSession``; ``accuracy_level=0`` makes fused quantized matmuls exact.

    ``spinning=False`` stops ORT's worker threads from busy-waiting between runs (they would
    otherwise steal the CPU from whatever runs next: benchmarks that interleave runtimes).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads is not None:
        options.intra_op_num_threads = threads
    if accuracy_level is not None:
        options.add_session_config_entry(
            "session.qdq_matmulnbits_accuracy_level", str(accuracy_level)
        )
    if optimized_model_path is not None:
        options.optimized_model_filepath = optimized_model_path
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run(sess: Any, inputs: Sequence[torch.Tensor] | dict[str, torch.Tensor]) -> list[np.ndarray]:
    """Run a session on flat inputs (in the model's input order) or a name -> tensor dict."""
    names = [i.name for i in sess.get_inputs()]
    if isinstance(inputs, dict):
        feeds = {k: _numpy(v) for k, v in inputs.items()}
    else:
        if len(inputs) != len(names):
            raise ValueError(f"the ONNX model takes inputs {names}, got {len(inputs)} tensors")
        feeds = {name: _numpy(t) for name, t in zip(names, inputs)}
    return sess.run(None, feeds)


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    if tensor.dtype == torch.bfloat16:
        raise OnnxExportError("bfloat16 inputs have no numpy type; feed float32 or use IO binding")
    return tensor.detach().cpu().numpy()


def check(
    gm: torch.fx.GraphModule,
    path: str | os.PathLike[str],
    inputs: Sequence[torch.Tensor] | None = None,
    *,
    rtol: float | None = None,
    atol: float | None = None,
    sess: Any = None,
) -> ErrorReport:
    """Run ``gm`` and the ONNX model on the same inputs and report the error (tolerance rule)."""
    inputs, reference = graph_reference(gm, inputs)
    sess = sess or session(path)
    got = [torch.from_numpy(np.asarray(a)) for a in run(sess, inputs)]
    return compare_outputs(reference, got, rtol, atol)
