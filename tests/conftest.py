"""Test policy (see docs/testing.md).

* hypothesis profiles: ``ci`` (default: derandomized, no deadline, few examples) and ``fuzz``
  (many examples; ``HYPOTHESIS_PROFILE=fuzz make test``);
* torch uses a fixed number of threads, so timings and reductions are repeatable;
* traced graphs are cached per model spec within a session (:func:`rewriter.testing.traced`);
* a perplexity is computed once per graph content and token ids (a content-addressed memo:
  many tests run pipelines on the same embedded graph, and each run evaluates its input);
* core tests need only CPU torch; backend tests are marked and skip with a reason when their
  tool is missing.
"""

from __future__ import annotations

import functools
import hashlib
import os
import warnings

import pytest
import torch
from hypothesis import HealthCheck, settings

import rewriter.metrics
from rewriter.families import ModelSpec
from rewriter.vocab import vocab_map

settings.register_profile(
    "ci",
    max_examples=8,
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "fuzz",
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

torch.set_num_threads(int(os.environ.get("REWRITER_TEST_THREADS", "2")))
os.environ.setdefault("REWRITER_NO_PROGRESS", "1")
warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=UserWarning, module="torch")


def _memoized(plain):
    """``perplexity_of_ids`` computed once per (graph code and tensors, ids, options).

    Only for flat traced graphs with their original vocabulary and no ``over``: their outputs
    are a function of the code and of what the ``get_attr`` nodes read, which the key hashes
    (parameters, buffers and plain tensor attributes alike). Anything else is computed each time.
    """
    memo: dict[tuple, float] = {}

    @functools.wraps(plain)
    def perplexity_of_ids(model, ids, context=None, **options):
        if (
            not isinstance(model, torch.fx.GraphModule)
            or options.get("over") is not None
            or vocab_map(model) is not None
            or any(n.op == "call_module" for n in model.graph.nodes)
        ):
            return plain(model, ids, context, **options)
        data = ids.detach().cpu().contiguous()
        key = (
            _content(model),
            hashlib.sha256(data.numpy().tobytes()).hexdigest(),
            tuple(data.shape),
            str(data.dtype),
            context,
            tuple(sorted(options.items())),
        )
        if key not in memo:
            memo[key] = plain(model, ids, context, **options)
        return memo[key]

    return perplexity_of_ids


def _content(gm: torch.fx.GraphModule) -> str:
    digest = hashlib.sha256(gm.code.encode())
    for node in gm.graph.find_nodes(op="get_attr"):
        value = gm
        for part in str(node.target).split("."):
            value = getattr(value, part)
        digest.update(str(node.target).encode())
        if isinstance(value, torch.Tensor):
            flat = value.detach().cpu().contiguous().reshape(-1)
            digest.update(f"{value.dtype}{tuple(value.shape)}".encode())
            digest.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
        else:
            digest.update(repr(value).encode())
    return digest.hexdigest()


rewriter.metrics.perplexity_of_ids = _memoized(rewriter.metrics.perplexity_of_ids)


@pytest.fixture
def gpt2_spec() -> ModelSpec:
    return ModelSpec("gpt2", layers=2, outliers=True)
