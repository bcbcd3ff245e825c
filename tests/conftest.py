"""Test policy (see docs/testing.md).

* hypothesis profiles: ``ci`` (default: derandomized, no deadline, few examples) and ``fuzz``
  (many examples; ``HYPOTHESIS_PROFILE=fuzz make test``);
* torch uses a fixed number of threads, so timings and reductions are repeatable;
* traced graphs are cached per model spec within a session (:func:`rewriter.testing.traced`);
* core tests need only CPU torch; backend tests are marked and skip with a reason when their
  tool is missing.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from hypothesis import HealthCheck, settings

from rewriter.families import ModelSpec

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


@pytest.fixture
def gpt2_spec() -> ModelSpec:
    return ModelSpec("gpt2", layers=2, outliers=True)
