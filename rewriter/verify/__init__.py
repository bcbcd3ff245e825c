"""Property-based verification (public API): is a rewritten graph equivalent to its model?
``measure`` holds the tolerance rule, ``ErrorReport`` and ``compare``; ``strategies`` the
hypothesis strategies of valid graph inputs and of model configs (``model_specs``);
``equivalence`` the property check ``assert_equivalent``; ``families`` the model families whose
configs ``model_specs`` draws. Everything public is re-exported here, so
``rewriter.verify.assert_equivalent`` is the spelling users and the docs use. Built on the IR and
the analyses; below the pipeline, which checks every exact pass with it.
"""

from rewriter.verify import families
from rewriter.verify.equivalence import assert_equivalent
from rewriter.verify.measure import (
    ErrorReport,
    compare,
    compare_outputs,
    graph_reference,
    outputs,
    run,
    tolerance,
)
from rewriter.verify.strategies import InputSpec, input_specs, inputs, model_specs

__all__ = [
    "ErrorReport",
    "InputSpec",
    "assert_equivalent",
    "compare",
    "compare_outputs",
    "families",
    "graph_reference",
    "input_specs",
    "inputs",
    "model_specs",
    "outputs",
    "run",
    "tolerance",
]
