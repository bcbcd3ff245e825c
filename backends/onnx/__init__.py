"""ONNX Runtime backend: export a rewritten graph to ONNX (:mod:`.exporter`, through
``torch.onnx.export(..., dynamo=True)`` with the exporter traps handled), the ``rewriter::`` ops it
lowers natively and the fused ``aten.rms_norm`` (:mod:`.translations`, linear attention in
:mod:`.attention`; every other op through its ATen decomposition), ONNX Runtime sessions and the
check against the graph (:mod:`.runtime`), the prefill and decode sessions of a causal LM with a
KV cache (:mod:`.causal_lm`), and :class:`OnnxBackend`, the shared interface (:mod:`.backend`).
"""

from __future__ import annotations

from rewriter.backends.onnx.backend import OnnxBackend
from rewriter.backends.onnx.causal_lm import OrtCausalLM, export_causal_lm
from rewriter.backends.onnx.exporter import DEFAULT_OPSET, OnnxExport, OnnxExportError, export
from rewriter.backends.onnx.runtime import check, run, session
from rewriter.backends.onnx.translations import NATIVE, nbits_native, translation_table

__all__ = [
    "DEFAULT_OPSET",
    "NATIVE",
    "OnnxBackend",
    "OnnxExport",
    "OnnxExportError",
    "OrtCausalLM",
    "check",
    "export",
    "export_causal_lm",
    "nbits_native",
    "run",
    "session",
    "translation_table",
]
