"""Files in and out: ``serialize`` saves and loads rewritten graphs (``.pt2`` with their
weights, ``save_pretrained``), ``tokenizer_trim`` rebuilds a tokenizer for a trimmed vocabulary.
Streaming checkpoints live in ``rewriter.checkpoint``; deployment graphs in ``rewriter.deploy``.
"""
