"""The suite's memos (tests/conftest.py) must never hand a test something it did not ask for.

The export memo returns an earlier ``torch.export`` result when module, inputs and spec have the
same content. Each test here changes one thing that changes the traced program (or could) and
asserts the memo exported again, and that a hit gives a graph of its own with equal outputs.
"""

from __future__ import annotations

import importlib

import pytest
import torch

import rewriter
from rewriter.testing import TinyPreLN

_export = importlib.import_module("rewriter.ir.trace")._export_with_fixes
_ids = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])


def _trace(model, ids=_ids, **options):
    before = dict(_export.counts)
    gm = rewriter.trace(model, (ids,), **options)
    after = _export.counts
    (outcome,) = [k for k in after if after[k] != before.get(k, 0)]
    return gm, outcome


def test_a_repeated_trace_is_served_from_the_memo_as_a_graph_of_its_own() -> None:
    model = TinyPreLN(seed=101)
    first, outcome = _trace(model)
    assert outcome == "miss"
    second, outcome = _trace(TinyPreLN(seed=101))
    assert outcome == "hit"
    assert second.graph is not first.graph
    assert second.embed.weight is not first.embed.weight
    assert torch.equal(second(_ids), first(_ids))
    with torch.no_grad():
        first.embed.weight.add_(1.0)  # an edit of one result must not reach the next
    third, outcome = _trace(model)
    assert outcome == "hit"
    assert torch.equal(third(_ids), model(_ids))


def test_an_in_place_edit_of_the_weights_exports_again() -> None:
    model = TinyPreLN(seed=102)
    before, _ = _trace(model)
    with torch.no_grad():
        model.up.weight[0, 0] += 1.0
    after, outcome = _trace(model)
    assert outcome == "miss"
    assert torch.equal(after(_ids), model(_ids))
    assert not torch.equal(after(_ids), before(_ids))
    # the memo kept the first export's weights as they were when it was made
    fresh = TinyPreLN(seed=102)
    again, outcome = _trace(fresh)
    assert outcome == "hit"
    assert torch.equal(again(_ids), fresh(_ids))


def test_ties_attributes_code_inputs_and_specs_are_part_of_the_key() -> None:
    tied = TinyPreLN(seed=103, tied=True)
    _trace(tied)
    untied = TinyPreLN(seed=103, tied=True)
    untied.head.weight = torch.nn.Parameter(tied.embed.weight.detach().clone())
    assert _trace(untied)[1] == "miss"  # equal values, not the same tensor

    eps = TinyPreLN(seed=103, tied=True)
    eps.ln1.eps = 1e-3
    assert _trace(eps)[1] == "miss"

    class Doubled(TinyPreLN):
        def forward(self, input_ids):
            return 2 * super().forward(input_ids)

    assert _trace(Doubled(seed=103, tied=True))[1] == "miss"
    assert _trace(tied, _ids + 1)[1] == "miss"
    assert _trace(tied, dynamic_shapes="auto")[1] == "miss"
    assert _trace(tied)[1] == "hit"


def test_a_module_with_hooks_is_exported_each_time() -> None:
    model = TinyPreLN(seed=104)
    model.up.register_forward_hook(lambda module, args, out: out * 2)
    first, outcome = _trace(model)
    assert outcome == "uncacheable"
    assert _trace(model)[1] == "uncacheable"
    assert torch.equal(first(_ids), model(_ids))


def test_a_failed_export_is_not_remembered() -> None:
    class Fails(torch.nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: export refuses it
                return x
            return -x

    before = _export.counts["miss"]
    for _ in range(2):
        with pytest.raises(rewriter.TraceError):
            rewriter.trace(Fails(), (torch.ones(2),))
    assert _export.counts["miss"] == before + 2
