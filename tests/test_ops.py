"""The op contract, proven end to end on rewriter::crms_norm."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import rewriter
from rewriter import ops
from rewriter.errors import LoweringError
from rewriter.ir.graph import copy_graph_module, op_counts

crms = torch.ops.rewriter.crms_norm.default


class CrmsThenLinear(torch.nn.Module):
    def __init__(self, width: int = 7) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(width, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(crms(x, 1e-5))


@given(
    rows=st.integers(1, 6),
    width=st.integers(1, 40),
    eps=st.sampled_from([1e-5, 1e-6, 1e-12]),
    seed=st.integers(0, 1000),
)
def test_crms_norm_is_rms_norm_of_the_implied_zero_mean_vector(
    rows: int, width: int, eps: float, seed: int
) -> None:
    generator = torch.Generator().manual_seed(seed)
    full = torch.randn(rows, width + 1, generator=generator, dtype=torch.float64) * 10
    full -= full.mean(-1, keepdim=True)
    got = crms(full[:, :-1], eps)
    want = torch.nn.functional.rms_norm(full, (width + 1,), eps=eps)[:, :-1]
    assert (got - want).abs().max() <= 1e-12


def test_reference_and_decomposition_agree_and_opcheck_passes() -> None:
    contract = ops.OPS["crms_norm"]
    x = torch.randn(3, 9)
    assert torch.equal(contract.reference(x, 1e-5), contract.decomposition(x, 1e-5))
    assert torch.equal(crms(x, 1e-5), contract.reference(x, 1e-5))
    torch.library.opcheck(crms, (torch.randn(2, 3, 6), 1e-5))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_computes_in_float32(dtype: torch.dtype) -> None:
    x = torch.randn(4, 33) * 100
    got = crms(x.to(dtype), 1e-5)
    assert got.dtype == dtype
    want = crms(x.to(dtype).float(), 1e-5).to(dtype)
    assert torch.equal(got, want)


def test_autograd_gradcheck_float64() -> None:
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: crms(t, 1e-5), (x,))
    assert torch.autograd.gradgradcheck(lambda t: crms(t, 1e-5), (x,))


def test_export_reexport_and_decompose() -> None:
    model = CrmsThenLinear()
    x = torch.randn(3, 4, 7)
    gm = rewriter.trace(model, (x,), dynamic_shapes={"x": {0: "batch", 1: "seq"}})
    assert op_counts(gm)["rewriter.crms_norm.default"] == 1
    info = rewriter.trace_info(gm)
    ep = torch.export.export(gm, (x,), dynamic_shapes=info.dynamic_shapes, strict=False)
    assert op_counts(ep.module())["rewriter.crms_norm.default"] == 1
    other = torch.randn(5, 2, 7)
    assert torch.equal(ep.module()(other), model(other))

    decomposed = ops.decompose(copy_graph_module(gm))
    assert "rewriter.crms_norm.default" not in op_counts(decomposed)
    assert "rewriter.crms_norm.default" in op_counts(gm)  # the copy was decomposed, not gm
    torch.testing.assert_close(decomposed(other), model(other), rtol=1e-6, atol=1e-6)


def test_backends_declare_what_they_lower() -> None:
    model = CrmsThenLinear()
    gm = rewriter.trace(model, (torch.randn(2, 7),))
    assert ops.check_lowerable(gm, "demo", native={"crms_norm"}) == {"crms_norm": "native"}
    assert ops.check_lowerable(gm, "demo", native=()) == {"crms_norm": "decomposed"}
    with pytest.raises(LoweringError, match=r"rewriter::crms_norm.*crms_norm"):
        ops.check_lowerable(gm, "demo", native=(), allow_decomposition=False)


def test_decomposition_table_for_run_decompositions() -> None:
    model = CrmsThenLinear()
    x = torch.randn(2, 7)
    ep = torch.export.export(model, (x,))
    decomposed = ep.run_decompositions(ops.decomposition_table(["crms_norm"]))
    assert "rewriter.crms_norm.default" not in op_counts(decomposed.module())
    torch.testing.assert_close(decomposed.module()(x), model(x))


def test_every_op_has_samples_runs_them_and_keeps_to_its_device() -> None:
    # every rewriter:: op: samples exist (backends test against them), the op equals its
    # reference on them, and on meta tensors it creates nothing on another device (a reference
    # that builds a CPU tensor would fail on a GPU)
    from rewriter.testing import op_samples

    for name, contract in ops.OPS.items():
        for args in op_samples(name):
            got = contract.overload(*args)
            want = contract.reference(*args)
            for a, b in zip(*(r if isinstance(r, list) else [r] for r in (got, want))):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
        for args in op_samples(name, device="meta"):
            contract.reference(*args)
            contract.decomposition(*args)


def test_arguments_bind_by_the_schema_names_once_declared() -> None:
    # backends read ops.arguments(node)["window"], not node.args[9]: a reordered or renamed
    # argument breaks loudly here instead of silently reading the wrong position
    gm = rewriter.trace(CrmsThenLinear(), (torch.randn(3, 7),))
    (node,) = gm.graph.find_nodes(op="call_function", target=crms)
    assert ops.arguments(node) == {"x": node.args[0], "eps": 1e-5}
    assert ops.OPS["crms_norm"].parameters == ("x", "eps")
    assert ops.OPS["linear_attention"].parameters[8:10] == ("causal", "window")
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    by_keyword = graph.call_function(crms, (x,), {"eps": 0.5})
    assert ops.arguments(by_keyword) == {"x": x, "eps": 0.5}
    missing = graph.call_function(crms, (x,))
    with pytest.raises(LoweringError, match="lacks argument 'eps'"):
        ops.arguments(missing)
    with pytest.raises(TypeError, match="not an op with a schema"):
        ops.arguments(graph.call_function(torch.relu, (x,)))
    # defaults of the schema are filled in (aten.sum.dim_IntList: keepdim=False, dtype=None)
    summed = graph.call_function(torch.ops.aten.sum.dim_IntList, (x, [0]))
    assert ops.arguments(summed) == {"self": x, "dim": [0], "keepdim": False, "dtype": None}


def test_forms_and_fakes_take_the_arguments_the_op_declares() -> None:
    # the linear-attention forms take the op's arguments through its schema (signature_of):
    # the parameter list is written once, in the op's torch.library definition
    import inspect

    from rewriter.ops import attention_decode, attention_forms
    from rewriter.testing import op_samples

    contract = ops.OPS["linear_attention"]
    forms = (
        attention_forms.linear_attention_quadratic,
        attention_forms.linear_attention_chunked,
        attention_decode.linear_attention_recurrent,
    )
    for form in forms:
        assert tuple(inspect.signature(form).parameters)[:12] == contract.parameters
    assert "chunk" in inspect.signature(attention_forms.linear_attention_chunked).parameters
    decode = ops.OPS["linear_attention_decode"].parameters
    step = tuple(inspect.signature(attention_decode.linear_attention_step).parameters)
    assert step == ("state", *(name for name in decode if name != "state"))
    args = op_samples("linear_attention")[2]
    named = dict(zip(contract.parameters, args))
    for form in forms:
        torch.testing.assert_close(form(*args), form(**named))
    assert contract.positional(**named) == args
    with pytest.raises(TypeError, match="lacks argument 'eps'"):
        contract.positional(**{k: v for k, v in named.items() if k != "eps"})
    with pytest.raises(TypeError, match="epsilon"):
        attention_forms.linear_attention_quadratic(*args, epsilon=1e-6)
    with pytest.raises(TypeError, match="given twice"):
        attention_forms.linear_attention_quadratic(*args, eps=1e-6)
    bound = ops.bind("linear_attention", args)
    assert bound.window == bound["window"] == args[9]
