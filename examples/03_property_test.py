"""Property-based verification over random model configs of several families.

``rewriter.verify.model_specs`` draws small configs (layers, heads, widths, vocabulary, tied
heads, biases, outlier channels); ``assert_equivalent`` draws inputs for each traced graph.

    python examples/03_property_test.py
"""

from hypothesis import given, settings

import rewriter
from rewriter import verify

PIPELINE = rewriter.Pipeline.parse("canonicalize")


@settings(max_examples=6, deadline=None, derandomize=True)
@given(spec=verify.model_specs(["gpt2", "llama", "gpt_neox"], outliers=True, max_layers=2))
def canonicalize_is_exact(spec):
    model = spec.build()
    gm = rewriter.trace(model, spec.example_inputs(seq=6), dynamic_shapes="auto")
    out = PIPELINE.run(gm).graph_module
    report = verify.assert_equivalent(model, out, max_examples=3)
    print(
        f"{spec.family:9s} layers={spec.layers} d={spec.hidden:3d} vocab={spec.vocab:3d} "
        f"tied={spec.tied!s:5s} -> {report.max_abs:.1e} (allowed {report.allowed:.1e})"
    )


canonicalize_is_exact()
print("canonicalize is exact on every drawn config")
