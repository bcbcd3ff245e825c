"""The property check: :func:`assert_equivalent`.

It checks the example inputs, then hypothesis-drawn ones (:mod:`rewriter.verify.strategies`),
each measured by :func:`rewriter.verify.measure.compare`, and fails with the shrunk
counterexample and its error statistics; inside a user's own ``@given`` test it draws from that
test's data instead. Writing your own property test::

    from hypothesis import given
    import rewriter
    from rewriter import verify

    @given(spec=verify.model_specs("gpt2", outliers=True))
    def test_my_pass(spec):
        model = spec.build()
        gm = rewriter.trace(model, spec.example_inputs(), dynamic_shapes="auto")
        out = rewriter.Pipeline.parse("canonicalize,my-pass").run(gm).graph_module
        verify.assert_equivalent(model, out, max_examples=5)
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch
import torch.fx
from hypothesis import HealthCheck, currently_in_test_context, given, settings
from hypothesis.control import current_build_context

from rewriter.ir.trace import trace_info
from rewriter.verify.measure import ErrorReport, compare, info_of
from rewriter.verify.strategies import build_inputs, dim_bounds, input_parts, input_specs, inputs

__all__ = ["assert_equivalent"]


def assert_equivalent(
    reference: torch.nn.Module,
    candidate: torch.nn.Module,
    example_inputs: Sequence[torch.Tensor] | None = None,
    *,
    rtol: float | None = None,
    atol: float | None = None,
    max_examples: int | None = None,
    max_size: int = 16,
) -> ErrorReport:
    """Fail unless ``candidate`` equals ``reference`` within the tolerance rule on every input.

    Checks ``example_inputs`` (default: the trace's), then ``max_examples`` hypothesis-drawn
    inputs (default: the active hypothesis profile's count). A failure names the shrunk input
    (sizes, seed, padding) and the error statistics. Returns the report of the example inputs.
    """
    graph = candidate if isinstance(candidate, torch.fx.GraphModule) else reference
    if not isinstance(graph, torch.fx.GraphModule):
        raise TypeError("assert_equivalent needs at least one traced GraphModule")
    info = info_of(candidate, reference)
    examples = (
        tuple(example_inputs)
        if example_inputs is not None
        else (info.example_inputs if info is not None else None)
    )
    first = None
    if examples is not None:
        first = compare(reference, candidate, examples, rtol=rtol, atol=atol)
        if not first.ok:
            raise AssertionError(f"not equivalent on the example inputs: {first}")

    strategy = inputs(graph, max_size=max_size)
    side = "candidate" if graph is candidate else "reference"
    count = max_examples if max_examples is not None else settings().max_examples
    if currently_in_test_context():
        # Inside a user's own @given test (over model configs, say): draw from that test's data.
        _check_nested(reference, candidate, graph, count, max_size, rtol, atol, side)
        return first if first is not None else _EMPTY

    @settings(
        max_examples=count,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        database=None,
    )
    @given(drawn=strategy)
    def check(drawn: tuple[torch.Tensor, ...]) -> None:
        report = compare(reference, candidate, drawn, rtol=rtol, atol=atol, inputs_of=side)
        if not report.ok:
            raise AssertionError(f"not equivalent on inputs of shapes {_shapes(drawn)}: {report}")

    check()
    return first if first is not None else _EMPTY


_EMPTY = ErrorReport(0.0, 0.0, 0.0, 0.0, 0.0, 0, 0)


def _shapes(tensors: Sequence[torch.Tensor]) -> str:
    return ", ".join(f"{tuple(t.shape)}" for t in tensors)


def _check_nested(
    reference: torch.nn.Module,
    candidate: torch.nn.Module,
    graph: torch.fx.GraphModule,
    count: int,
    max_size: int,
    rtol: float | None,
    atol: float | None,
    side: str = "candidate",
) -> None:
    """The input draws of a check made inside a running ``@given`` test.

    A nested ``@given`` is refused by hypothesis, so the inputs are drawn from the running test's
    own data: they are part of its example, follow its seed, and shrink with it.
    """
    specs = input_specs(graph)
    bounds = dim_bounds(graph, specs, trace_info(graph), max_size)
    parts = input_parts(bounds)
    data = current_build_context().data
    # An explicit @example runs on data with no choices to draw: a fixed generator stands in.
    fixed = random.Random(0) if getattr(data, "max_choices", None) == 0 else None
    for _ in range(count):
        if fixed is None:
            sizes, seed, padding = data.draw(parts)
        else:
            sizes = {name: fixed.randint(lo, hi) for name, (lo, hi) in bounds.items()}
            seed, padding = fixed.randrange(2**31), fixed.choice(["none", "left", "right"])
        drawn = build_inputs(specs, sizes, seed, padding)
        report = compare(reference, candidate, drawn, rtol=rtol, atol=atol, inputs_of=side)
        if not report.ok:
            raise AssertionError(
                f"not equivalent on inputs of shapes {_shapes(drawn)} (sizes {sizes}, seed {seed}, "
                f"padding {padding}): {report}"
            )
