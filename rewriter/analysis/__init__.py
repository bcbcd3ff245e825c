"""Analyses and rewrite helpers that several passes share, built on the IR, the rewrite driver
and the op contract: the residual stream (``residual``), centering and norm folding
(``centering``, ``folding``), canonical form and its rules (``canonicalize``), low-rank adapter
kinds and bookkeeping (``adapters``), attention sites (``attention``) and the vocabulary view of
a graph (``vocab``). Nothing here runs a pipeline, and no pass imports another pass: what a
second pass needs moves here.
"""
