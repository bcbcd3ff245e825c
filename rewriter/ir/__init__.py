"""The IR: a traced ``torch.fx.GraphModule`` and what every layer reads from it.

``trace`` turns a model into the graph once (``torch.export``, unlifted, with its ``TraceInfo``);
``graph`` holds what concerns a whole graph (copies, runs, outputs) and re-exports the graph
helpers of the modules split by concern: ``tensors`` (weights by attribute path, ties),
``lookthrough`` (users and producers through transparent ops), ``linear`` (linear maps),
``provenance`` (source modules, names for new tensors), ``fake`` (fake-tensor metadata) and
``printing``; ``store`` reads and edits weights by module path with copy-on-write blocks;
``weightless`` traces an architecture without allocating its weights. This layer imports only
``rewriter.errors`` and ``rewriter.context`` of the core.
"""
