"""rewriter.verify: the tolerance rule, input strategies, comparisons and counterexamples."""

from __future__ import annotations

import pytest
import torch
from hypothesis import Phase, example, given, settings
from hypothesis import strategies as st

import rewriter
from rewriter import verify
from rewriter.ir.graph import copy_graph_module
from rewriter.testing import traced
from rewriter.verify.families import FAMILIES, ModelSpec


def test_the_tolerance_rule() -> None:
    ref32 = torch.tensor([1.0, -200.0])
    assert verify.tolerance(ref32) == pytest.approx(1e-5 * 200 + 1e-6)
    assert verify.tolerance(ref32.double()) == pytest.approx(1e-10 * 200)
    assert verify.tolerance(ref32.bfloat16()) == pytest.approx(1e-2 * 200 + 1e-3)
    assert verify.tolerance(torch.tensor([float("inf"), 2.0])) == pytest.approx(1e-5 * 2 + 1e-6)
    # ids, masks and counts allow no error (a bool reference used to raise in abs)
    assert verify.tolerance(torch.tensor([True, False])) == 0.0
    assert verify.tolerance(torch.tensor([50000, 3])) == 0.0


def test_compare_statistics_and_special_values() -> None:
    class Identity(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    class Shift(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + 1e-3

    x = torch.tensor([[1.0, float("nan"), float("inf"), 4.0]])
    same = verify.compare(Identity(), Identity(), (x,))
    assert same.ok and same.max_abs == 0.0
    shifted = verify.compare(Identity(), Shift(), (x,))
    assert not shifted.ok and shifted.max_abs == pytest.approx(1e-3, rel=1e-3)
    assert shifted.max_rel == pytest.approx(1e-3 / 4, rel=1e-3) and shifted.ref_max == 4.0
    assert "EXCEEDS" in str(shifted)


def test_input_specs_know_tokens_masks_and_dims() -> None:
    spec = ModelSpec("bert", vocab=50, max_positions=20)
    model = spec.build()
    ids = spec.example_inputs(seq=6)[0]
    gm = rewriter.trace(
        model,
        kwargs={
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "token_type_ids": torch.zeros_like(ids),
        },
        dynamic_shapes="auto",
    )
    specs = {s.name: s for s in verify.input_specs(gm)}
    assert specs["input_ids"].kind == "tokens" and specs["input_ids"].high == 50
    assert specs["token_type_ids"].kind == "tokens" and specs["token_type_ids"].high == 2
    assert specs["attention_mask"].kind == "mask"
    assert specs["input_ids"].shape == ("batch", "seq")


@settings(max_examples=20)
@given(data=st.data())
def test_drawn_inputs_are_valid(data: st.DataObject) -> None:
    spec = ModelSpec("gpt2", vocab=37, max_positions=12)
    _, gm = traced(spec)
    (ids,) = data.draw(verify.inputs(gm, max_size=30))
    assert ids.dtype == torch.long and 0 <= int(ids.min()) and int(ids.max()) < 37
    assert 1 <= ids.shape[0] <= 30 and 1 <= ids.shape[1] <= 12  # the position table bounds seq


def test_masks_keep_a_token_per_row() -> None:
    spec = ModelSpec("llama")
    ids = spec.example_inputs(seq=6)[0]
    gm = rewriter.trace(
        spec.build(),
        kwargs={"input_ids": ids, "attention_mask": torch.ones_like(ids)},
        dynamic_shapes="auto",
    )

    @settings(max_examples=30)
    @given(drawn=verify.inputs(gm))
    def check(drawn: tuple[torch.Tensor, torch.Tensor]) -> None:
        _, mask = drawn
        assert set(mask.unique().tolist()) <= {0, 1} and bool((mask.sum(1) >= 1).all())

    check()


def _wrong_from_position_12() -> tuple[torch.nn.Module, torch.fx.GraphModule, torch.nn.Module]:
    """A GPT-2, its graph, and a copy whose position table is wrong from position 12 on: the
    example inputs (8 tokens) do not show it, longer drawn inputs do."""
    spec = ModelSpec("gpt2", max_positions=32)
    model, gm = traced(spec)
    broken = copy_graph_module(gm)
    broken.transformer.wpe.weight = torch.nn.Parameter(gm.transformer.wpe.weight.detach().clone())
    noise = torch.randn(20, spec.hidden, generator=torch.Generator().manual_seed(0))
    broken.transformer.wpe.weight.data[12:] += noise
    return model, gm, broken


def test_assert_equivalent_finds_and_shrinks_a_counterexample() -> None:
    """A weight bug that only shows on longer sequences: hypothesis must find it."""
    model, _, broken = _wrong_from_position_12()
    assert verify.compare(model, broken).ok
    with pytest.raises(
        AssertionError, match=r"not equivalent on inputs of shapes \(\d+, 13\)"
    ) as info:
        verify.assert_equivalent(model, broken, max_examples=60)
    assert "max abs" in str(info.value)


def test_a_check_inside_a_given_test_draws_from_that_test_and_shrinks() -> None:
    """Inside a user's ``@given`` test, the input draws are part of that test's example: they
    follow the run's seed and shrink with it (a fixed inner generator would do neither)."""
    model, _, broken = _wrong_from_position_12()

    @settings(max_examples=30, database=None)
    @given(label=st.sampled_from(["a", "b"]))
    def check(label: str) -> None:
        verify.assert_equivalent(model, broken, max_examples=2)

    with pytest.raises(AssertionError, match=r"inputs of shapes \(\d+, 13\).* \(sizes .*seed"):
        check()


def test_a_check_inside_an_explicit_example_still_checks() -> None:
    # an @example runs on data with no choices to draw from: the check must still run
    model, gm, broken = _wrong_from_position_12()
    calls = []

    @settings(max_examples=1, database=None, phases=[Phase.explicit])
    @example(candidate=broken)
    @given(candidate=st.just(gm))
    def check(candidate: torch.nn.Module) -> None:
        calls.append(candidate)
        verify.assert_equivalent(model, candidate, max_examples=20)

    with pytest.raises(AssertionError, match="not equivalent on inputs of shapes"):
        check()
    assert calls == [broken]


@pytest.mark.parametrize("family", FAMILIES)
def test_model_specs_build_real_models_of_every_family(family: str) -> None:
    @settings(max_examples=3)
    @given(spec=verify.model_specs(family, max_layers=2))
    def check(spec: ModelSpec) -> None:
        assert spec.family == family
        model = spec.build()
        (ids,) = spec.example_inputs(seq=5)
        out = verify.outputs(
            verify.run(model, (ids,), None if family == "tenc" else _info(model, ids))
        )
        assert out[0].shape[:2] == (2, 5) and torch.isfinite(out[0]).all()

    check()


def _info(model: torch.nn.Module, ids: torch.Tensor) -> rewriter.TraceInfo:
    return rewriter.trace_info(rewriter.trace(model, (ids,)))


def test_outliers_make_activations_large() -> None:
    tame = ModelSpec("gpt2", outliers=False).build()
    wild = ModelSpec("gpt2", outliers=True).build()
    (ids,) = ModelSpec("gpt2").example_inputs()
    hidden = {}
    for name, model in (("tame", tame), ("wild", wild)):
        out = model(ids, use_cache=False, output_hidden_states=True)
        hidden[name] = max(h.abs().max().item() for h in out.hidden_states[:-1])  # residual stream
    assert hidden["wild"] > 5 * hidden["tame"]
