"""Property-based verification (public API): is a rewritten graph equivalent to its model?

``equivalence`` holds the tolerance rule, the hypothesis input strategies, ``compare`` and
``assert_equivalent``; ``families`` the model families whose configs ``model_specs`` draws.
Everything public is re-exported here, so ``rewriter.verify.assert_equivalent`` is the spelling
users and the docs use. Built on the IR and the analyses; below the pipeline, which checks every
exact pass with it.
"""

from rewriter.verify import families
from rewriter.verify.equivalence import (
    ErrorReport,
    InputSpec,
    assert_equivalent,
    compare,
    compare_outputs,
    graph_reference,
    input_specs,
    inputs,
    model_specs,
    outputs,
    run,
    tolerance,
)

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
