"""Files in and out, above the pipeline: ``serialize`` saves and loads rewritten graphs (``.pt2``
with their weights, ``save_pretrained``); ``tokenizer_trim`` rebuilds a tokenizer for a trimmed
vocabulary (per tokenizer model in ``tokenizer_models``); ``streaming`` runs a pipeline over a
checkpoint shard by shard (``rewrite_checkpoint``) on the lazy store, reading and writing of
``rewriter.checkpoint``. Deployment graphs live in ``rewriter.deploy``.
"""
