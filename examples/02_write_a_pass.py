"""Write a pass: a rule table, a weight edit through the store, registration, a text spec.

The pass folds a constant scale into the linear map that produces it:
``linear(x, W, b) * c  ->  linear(x, c W, c b)``, editing the weights in float64 through the
weight store (the only way passes touch weights).

    python examples/02_write_a_pass.py
"""

import dataclasses
from typing import ClassVar

import torch
from torch import nn

import rewriter
from rewriter.ir.graph import as_linear
from rewriter.ir.store import Edit
from rewriter.rewrite.driver import Rewriter, RuleSet, apply_rules, rule
from rewriter.rewrite.pattern import P

aten = torch.ops.aten


def fold_scale(rw: Rewriter, lin: torch.fx.Node, c: float) -> torch.fx.Node | None:
    view = as_linear(lin)
    if view is None or view.layout != "out_in" or len(lin.users) != 1:
        return None  # guards first: nothing has changed yet
    if len(view.weight.users) != 1 or (view.bias is not None and len(view.bias.users) != 1):
        return None  # a shared weight would change its other uses too
    for name in filter(None, (view.weight_name, view.bias_name)):
        rw.apply(Edit(name, (name,), lambda block, n=name: block.rows(n) * c, note=f"scale by {c}"))
    return lin


# fmt: off
SCALE_RULES = RuleSet([
    rule(P.call(aten.mul.Tensor, P.var("lin"), P.const("c")), fold_scale, name="fold-scale-into-linear"),  # linear(x, W, b) * c -> linear(x, cW, cb)  # noqa: E501
])
# fmt: on


@dataclasses.dataclass(frozen=True)
class FoldScalePass(rewriter.Pass):
    """Fold a constant scale into the linear map that produces it."""

    name: ClassVar[str] = "fold-scale"

    def run(self, gm, ctx):
        rw = Rewriter(gm, pass_name=self.name)
        stats = apply_rules(rw, SCALE_RULES)
        rw.finish()
        return rewriter.PassResult(gm, changed=bool(stats.fired), stats=dict(stats.fired))


class Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x):
        return self.b(torch.relu(self.a(x) * 0.5)) * 3.0


rewriter.register_pass(FoldScalePass)
model = Scaled()
gm = rewriter.trace(model, (torch.randn(4, 8),), dynamic_shapes={"x": {0: "batch"}})
result = rewriter.Pipeline.parse("canonicalize,fold-scale").run(gm)
print(result.report.table())
print(rewriter.format_graph(result.graph_module))
rewriter.verify.assert_equivalent(model, result.graph_module, max_examples=10)
print("fold-scale is exact: verified on 10 hypothesis-drawn batches")
