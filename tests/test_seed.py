"""Each run draws with a new seed, and a printed seed repeats a run's draws (tests/conftest.py).

A fixed seed would let a wrong rewrite hide in the inputs no run ever draws; a seed that is not
printed, or not shared by the xdist workers, would make a failure impossible to repeat.
"""

from __future__ import annotations

from pathlib import Path

import hypothesis.core
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st


@pytest.fixture
def conftest(pytestconfig: pytest.Config):
    return pytestconfig.pluginmanager.get_plugin(str(Path(__file__).with_name("conftest.py")))


def test_the_seed_comes_from_the_option_the_controller_or_the_environment(conftest) -> None:
    run_seed = conftest.run_seed
    env = {conftest.SEED_VARIABLE: "17"}
    assert run_seed("5", {"rewriter_seed": 9}, env) == 5  # --hypothesis-seed wins
    assert run_seed(None, {"rewriter_seed": 9}, env) == 9  # a worker takes the controller's
    assert run_seed(None, None, env) == 17
    assert run_seed(None, {}, {conftest.SEED_VARIABLE: ""}) >= 0  # empty means unset
    drawn = {run_seed(None, None, {}) for _ in range(5)}
    assert len(drawn) > 1, "a run without a seed must draw a new one"
    with pytest.raises(pytest.UsageError, match=r"SEED=.x.: the seed must be an integer"):
        run_seed(None, None, {conftest.SEED_VARIABLE: "x"})


def test_hypothesis_draws_with_the_printed_seed(conftest, pytestconfig) -> None:
    seed = pytestconfig.stash[conftest.SEED]
    assert hypothesis.core.global_force_seed == seed
    assert settings().derandomize is False, "derandomize would ignore the run's seed"
    worker = getattr(pytestconfig, "workerinput", None)
    if worker is not None:
        assert worker["rewriter_seed"] == seed  # the controller's seed, not the worker's own
    assert str(seed) in conftest._seed_line(pytestconfig)


def test_the_same_seed_repeats_the_draws_and_another_changes_them(monkeypatch) -> None:
    def draws(seed: int) -> list[int]:
        seen: list[int] = []

        @settings(max_examples=5, database=None, phases=[hypothesis.Phase.generate])
        @given(st.integers(0, 10**9))
        def record(value: int) -> None:
            seen.append(value)

        monkeypatch.setattr(hypothesis.core, "global_force_seed", seed)
        record()
        return seen

    assert draws(1) == draws(1)
    assert draws(1) != draws(2)
