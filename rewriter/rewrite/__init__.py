"""Pattern rewriting over the IR: ``pattern`` (declarative patterns over aten nodes) and
``driver`` (the worklist rewriter that applies rules to a fixpoint, keeps per-rule statistics and
stamps provenance on every node it creates). Built on ``rewriter.ir`` only.
"""
