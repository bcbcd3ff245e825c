"""Triton kernels for the ``rewriter::`` ops (and RMSNorm), one file per kernel.

Each module holds the ``@triton.jit`` kernel(s) and a launcher that takes torch tensors in the
op's own argument order and returns what the op returns. No graph logic and nothing of the rest of
the project is imported here: ``rewriter.backends.triton`` attaches these launchers to the ops.

Written to run under ``TRITON_INTERPRET=1`` on CPU as well as on a GPU: no libdevice calls,
``tl.cast`` instead of ``.to()`` on scalars, one autotune config. Importing a kernel module
imports ``triton``; the backend imports them lazily.
"""
