"""The IR: a traced ``torch.fx.GraphModule`` and what every layer reads from it.

``trace`` turns a model into the graph once (``torch.export``, unlifted, with its ``TraceInfo``);
``weightless`` traces an architecture without allocating its weights. The graph helpers every
rewrite uses are split by concern (``tensors``: weights by name, ties; ``lookthrough``: users
and producers through transparent ops; ``linear``: one view of every linear-map form;
``provenance``: source modules and derived weight names; ``fake``: metadata propagation;
``printing``: stable listings) and re-exported by ``graph``, which holds the whole-graph helpers
(copies, runs, outputs). ``store`` reads and edits weights by module path with copy-on-write
blocks. This layer imports only ``rewriter.errors`` and ``rewriter.context`` of the core.
"""
