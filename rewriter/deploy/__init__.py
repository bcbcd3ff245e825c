"""Deploying causal LMs: a step graph the passes rewrite once (``step``: :func:`trace_causal_lm`,
the model on a sequence's prefix with a cache, then on its last token from it), cut into prefill
and decode graphs that share weights (``cut``: :func:`split`), and generation with a cache in
torch and ONNX Runtime (``generation``: :func:`generate`, :func:`agreement`); the step graph and
why it comes first are described in :mod:`rewriter.deploy.step`.
"""

from rewriter.deploy.cut import CausalLMGraphs, grows, split
from rewriter.deploy.generation import GenerationResult, agreement, generate
from rewriter.deploy.step import STEP_KEY, StepInfo, trace_causal_lm
from rewriter.ir.graph import positions

__all__ = [
    "STEP_KEY",
    "CausalLMGraphs",
    "GenerationResult",
    "StepInfo",
    "agreement",
    "generate",
    "grows",
    "positions",
    "split",
    "trace_causal_lm",
]
