"""Passes in sequence: the ``Pass`` base class, ``Pipeline`` and its report (``pipeline``), the
text form of a pipeline (``spec``), callbacks around each pass (``instruments``: perplexity,
vocabulary bookkeeping), training of a graph's parameters (``train``) and the metrics a run
reports (``metrics``). Built on the layers below; reaches the pass registry only through the
one lazy seam in ``Pipeline.parse``.
"""

from rewriter.pipeline.pipeline import (
    OptionInfo,
    Pass,
    PassRecord,
    PassResult,
    Pipeline,
    PipelineResult,
    Report,
    option,
    refuse,
)

__all__ = [
    "OptionInfo",
    "Pass",
    "PassRecord",
    "PassResult",
    "Pipeline",
    "PipelineResult",
    "Report",
    "option",
    "refuse",
]
