"""Files in and out, above the pipeline: ``serialize`` saves and loads rewritten graphs (``.pt2``
with their weights, ``save_pretrained``); ``tokenizer_trim`` rebuilds a tokenizer for a trimmed
vocabulary; ``streaming`` runs a pipeline over a checkpoint shard by shard
(``rewrite_checkpoint``), with the lazy store, reading and writing of ``rewriter.checkpoint``
below it. Deployment graphs live in ``rewriter.deploy``.
"""
