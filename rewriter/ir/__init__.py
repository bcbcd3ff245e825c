"""The IR: a traced ``torch.fx.GraphModule`` and what every layer reads from it.

``trace`` turns a model into the graph once (``torch.export``, unlifted, with its ``TraceInfo``);
``graph`` holds the graph queries and edits every rewrite uses (linear maps, users through
transparent ops, provenance, formatting); ``store`` reads and edits weights by module path with
copy-on-write blocks; ``weightless`` traces an architecture without allocating its weights. This
layer imports only ``rewriter.errors`` and ``rewriter.context`` of the core.
"""
