"""Every backend through one interface: export one rewritten GPT-2 block, check it against the
graph and measure it, for each backend that runs here; then a pipeline with an instrument of
our own and the rule statistics behind `rewriter run --explain`.

python examples/16_backends.py
"""

import tempfile

import rewriter
from rewriter.pipeline.instruments import Instrument
from rewriter.verify.families import ModelSpec

config = ModelSpec("gpt2", vocab=64, layers=1, heads=2, head_dim=16, seed=0)
model = config.build()
example = config.example_inputs(batch=1, seq=8)  # static shapes: MLIR and HLS take them
gm = rewriter.trace(model, example)


class NodeCount(Instrument):
    """Graph size after each pass, as a column of the report."""

    def after_pass(self, step, before, after, record):
        return {"nodes": len(after.graph.nodes)}


result = rewriter.Pipeline.parse("canonicalize,crmsnorm").run(gm, instruments=[NodeCount()])
print(result.report.table())
print(result.report.explain().splitlines()[0])  # canonicalize: N of M rules rewrote this graph
block = result.graph_module

for name in rewriter.available_backends():
    backend = rewriter.backends.get_backend(name)
    runs, why = backend.available()
    if not runs and name != "triton":  # the Triton lowering runs its references without a GPU
        print(f"{name}: skipped ({why})")
        continue
    with tempfile.TemporaryDirectory() as out:
        options = {"subgraph": "transformer.h.0"} if name == "hls" else {}
        exported = backend.export(block, None, out, **options)
        report = backend.check(block, exported)
        assert report.ok, f"{name}: {report}"
        print(f"{backend.label} vs the graph: max abs {report.max_abs:.1e} (ok)")
        print(f"  {backend.measure(exported, repeats=5)}  plan: {backend.plan(block)}")
