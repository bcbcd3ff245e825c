"""HLS export and C simulation (g++ against hls4ml's ap_types): an MLP, GPT-2 blocks after
prernorm+fold-ln, after l1quant(bits=4) and linearized, within the tolerance of ap_fixed<18,8>;
exact integer accumulation of ShiftQuant; the project files, io modes, precision helpers and the
resource model."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil

import pytest
import torch

import rewriter
from rewriter.errors import LoweringError
from rewriter.verify.families import ModelSpec

pytestmark = pytest.mark.skipif(
    shutil.which("g++") is None or importlib.util.find_spec("hls4ml") is None,
    reason="C simulation needs g++ and the hls4ml wheel (its ap_types headers)",
)
TOLERANCE = 2e-2  # max abs error at ap_fixed<18,8> (10 fractional bits), accumulators 48 bits


def _mlp():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 48), torch.nn.GELU(), torch.nn.Linear(48, 5))
    return model.eval()


@pytest.mark.parametrize("io", ["parallel", "stream"])
def test_mlp_csim_matches_torch(tmp_path, io) -> None:
    from rewriter.backends import hls

    model = _mlp()
    x = torch.randn(4, 16)
    gm = rewriter.trace(model, (x,))
    project = hls.export(gm, (x,), tmp_path, io=io, reuse_factor=4)
    top = (tmp_path / "firmware" / "rewriter_top.cpp").read_text()
    if io == "stream":
        assert "hls::stream" in top and "#pragma HLS DATAFLOW" in top and "axis" in top
    else:
        assert "ARRAY_PARTITION" in top and "ap_memory" in top
    for name in ("build_prj.tcl", "README.md", "project.json", "rewriter_top_test.cpp"):
        assert (tmp_path / name).exists()
    (got,) = hls.csim(tmp_path, [x])
    with torch.no_grad():
        want = model(x).double()
    assert (got - want).abs().max() <= TOLERANCE
    assert project.resources["modelled"] and project.resources["total"]["dsp"] > 0


def _block(spec: str, tmp_path):
    from rewriter.backends import hls

    config = ModelSpec("gpt2", vocab=64, layers=1, heads=2, head_dim=16, seed=0)
    model = config.build()
    example = config.example_inputs(batch=1, seq=8)
    gm = rewriter.trace(model, example)
    ctx = rewriter.PassContext(
        calibration=torch.randint(0, 64, (4, 8)), progress=False, batch_size=1
    )
    out = rewriter.Pipeline.parse(spec).run(gm, ctx).graph_module
    project = hls.export(out, example, tmp_path, subgraph="transformer.h.0")
    inputs, wants = hls.port_values(out, example, project)
    gots = hls.csim(tmp_path, inputs)
    return project, gots, wants


@pytest.mark.parametrize(
    ("spec", "kind"),
    [
        ("canonicalize,prernorm,fold-ln", "rms_norm"),
        ("canonicalize,crmsnorm", "crms_norm"),
        ("canonicalize,l1quant(bits=4)", "shiftquant_dense"),
        ("canonicalize,linearize(feature_map=elu)", "linear_attention"),
    ],
)
def test_gpt2_block_csim_matches_the_graph(tmp_path, spec, kind) -> None:
    project, gots, wants = _block(spec, tmp_path)
    # the block's residual input (31 wide after crmsnorm compresses the stream)
    assert [port["shape"][:2] for port in project.inputs] == [[1, 8]]
    kinds = {
        layer["kind"] for layer in json.loads((tmp_path / "project.json").read_text())["layers"]
    }
    assert kind in kinds and "residual_add" in kinds, kinds
    assert len(gots) == 1 and gots[0].shape == wants[0].shape
    assert (gots[0] - wants[0].double()).abs().max() <= TOLERANCE


class _QuantLinear(torch.nn.Module):
    def __init__(self, bits: int) -> None:
        super().__init__()
        from rewriter.ops.quant import quantize_weight

        weight = torch.randn(7, 40, generator=torch.Generator().manual_seed(1))
        packed, exponents = quantize_weight(weight, bits, 16)
        self.register_buffer("packed", packed)
        self.register_buffer("exponents", exponents)
        self.bits = bits

    def forward(self, x):
        return torch.ops.rewriter.shiftquant_linear(
            x, self.packed, self.exponents, None, self.bits, 16, 40, 0
        )


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_shiftquant_accumulates_exactly_in_integers(tmp_path, bits) -> None:
    # inputs on the data grid and a wide output type: the csim output is the exact sum
    from rewriter.backends import hls

    layer = _QuantLinear(bits)
    x = torch.round(torch.randn(3, 40, dtype=torch.float64) * 1024) / 1024
    gm = rewriter.trace(layer, (x.float(),))
    precision = hls.Precision(overrides={".*shiftquant.*": "ap_fixed<40,20>"})
    hls.export(gm, (x.float(),), tmp_path, precision=precision)
    (got,) = hls.csim(tmp_path, [x.float()])
    from rewriter.ops.quant import dequantize

    want = x @ dequantize(layer.packed, layer.exponents, bits, 40, torch.float64).T
    assert torch.equal(got, want)
    resources = json.loads((tmp_path / "project.json").read_text())["resources"]
    assert resources["layers"][0]["dsp"] == 0  # power-of-two scales are shifts


def test_precision_from_calibration_ranges(tmp_path) -> None:
    from rewriter.backends import hls

    model = _mlp()
    x = torch.randn(4, 16) * 3
    gm = rewriter.trace(model, (x,))
    ranges = hls.calibrate(gm, [(torch.randn(4, 16) * 3,) for _ in range(4)])
    precision = hls.from_ranges(ranges, width=16)
    assert all(t.width == 16 for t in precision.overrides.values())
    hls.export(gm, (x,), tmp_path, precision=precision)
    (got,) = hls.csim(tmp_path, [x])
    with torch.no_grad():
        assert (got - model(x).double()).abs().max() <= 5e-2


def test_dense_multipliers_match_hls4ml_for_the_same_mlp(tmp_path) -> None:
    # the resource model counts multipliers as hls4ml's multiplier_limit does
    hls4ml = pytest.importorskip("hls4ml")
    from rewriter.backends import hls

    torch.manual_seed(0)  # ReLU: hls4ml's PyTorch frontend has no GELU
    model = torch.nn.Sequential(torch.nn.Linear(16, 48), torch.nn.ReLU(), torch.nn.Linear(48, 5))
    x = torch.randn(1, 16)
    config = hls4ml.utils.config_from_pytorch_model(model, (16,), default_reuse_factor=4)
    theirs = hls4ml.converters.convert_from_pytorch_model(
        model, output_dir=str(tmp_path / "hls4ml"), hls_config=config, backend="Vitis"
    )
    theirs.write()
    parameters = (tmp_path / "hls4ml" / "firmware" / "parameters.h").read_text()
    theirs_limits = []
    for block in parameters.split("struct config")[1:]:
        if "multiplier_limit" not in block:
            continue
        field = {
            key: int(re.search(rf"{key} = (\d+);", block).group(1))
            for key in ("n_in", "n_out", "reuse_factor", "n_zeros")
        }
        rf = field["reuse_factor"]
        theirs_limits.append(-(-field["n_in"] * field["n_out"] // rf) - field["n_zeros"] // rf)
    ours = hls.export(rewriter.trace(model, (x,)), (x,), tmp_path / "ours", reuse_factor=4)
    dense = [layer["multipliers"] for layer in ours.resources["layers"] if layer["kind"] == "dense"]
    assert dense == theirs_limits == [192, 60]


def test_unsupported_ops_are_named(tmp_path) -> None:
    from rewriter.backends import hls

    class Odd(torch.nn.Module):
        def forward(self, x):
            return torch.cumsum(x, -1)

    x = torch.randn(2, 5)
    with pytest.raises(LoweringError, match="cumsum"):
        hls.export(rewriter.trace(Odd(), (x,)), (x,), tmp_path)


@pytest.mark.parametrize(
    ("module", "bound"), [(torch.nn.GELU(), 4e-3), (torch.nn.SiLU(), 4e-3), (torch.nn.Tanh(), 4e-3)]
)
def test_tabulated_activations_error(tmp_path, module, bound) -> None:
    # 1025-point tables, linear interpolation, 18-bit entries, ap_fixed<18,8> data:
    # the measured error over [-10, 10] stays below the bound the docs state
    from rewriter.backends import hls

    x = torch.linspace(-10, 10, 64).reshape(4, 16)
    hls.export(rewriter.trace(module, (x,)), (x,), tmp_path)
    (got,) = hls.csim(tmp_path, [x])
    assert (got - module(x).double()).abs().max() <= bound


def test_a_whole_model_from_token_ids_to_logits(tmp_path) -> None:
    # embedding lookup, positions and the causal mask as constants, two blocks, the tied head
    from rewriter.backends import hls

    config = ModelSpec("gpt2", vocab=64, layers=2, heads=2, head_dim=16, seed=0)
    model = config.build()
    example = config.example_inputs(batch=1, seq=8)
    gm = rewriter.trace(model, example)
    gm = rewriter.Pipeline.parse("canonicalize,prernorm,fold-ln").run(gm).graph_module
    project = hls.export(gm, example, tmp_path)
    assert project.inputs[0]["type"] == "int"
    layers = json.loads((tmp_path / "project.json").read_text())["layers"]
    assert "embedding" in {layer["kind"] for layer in layers}
    (got,) = hls.csim(tmp_path, [example[0]])
    with torch.no_grad():
        want = model(example[0]).logits.double()
    assert (got - want).abs().max() <= TOLERANCE


class _ArgumentForms(torch.nn.Module):
    """ATen calls in the forms a graph may hold but ``rewriter.trace`` does not write: a
    positional ``alpha`` of ``add.Scalar`` / ``sub.Scalar``, a keyword ``alpha`` of ``sub.Tensor``,
    a keyword ``bias`` of ``linear`` (``torch.fx.symbolic_trace`` keeps them as written)."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(2)
        self.weight = torch.nn.Parameter(torch.randn(5, 6, generator=generator) * 0.3)
        self.bias = torch.nn.Parameter(torch.rand(5, generator=generator) + 1.0)

    def forward(self, x, y):
        aten = torch.ops.aten
        return (
            aten.add.Scalar(x, 0.75, 3),
            aten.sub.Tensor(x, y, alpha=2),
            aten.sub.Scalar(x, 0.5, 3),
            aten.linear.default(x, self.weight, bias=self.bias),
        )


def test_aten_arguments_are_read_by_name(tmp_path) -> None:
    # alpha and bias count however they are passed (positionally or by keyword)
    from rewriter.backends import hls

    model = _ArgumentForms()
    gm = torch.fx.symbolic_trace(model)
    generator = torch.Generator().manual_seed(3)
    x, y = torch.randn(2, 6, generator=generator), torch.randn(2, 6, generator=generator)
    hls.export(gm, (x, y), tmp_path)
    gots = hls.csim(tmp_path, [x, y])
    with torch.no_grad():
        wants = [w.double() for w in model(x, y)]
    forms = ["add.Scalar alpha", "sub.Tensor alpha", "sub.Scalar alpha", "linear bias"]
    assert len(gots) == len(wants) == len(forms)
    for form, got, want in zip(forms, gots, wants):
        error = float((got - want).abs().max())
        assert error <= rewriter.verify.tolerance(want, atol=TOLERANCE), (form, error)


@pytest.mark.parametrize("name", ["alpha", "scale", "input_scale"])
def test_elu_with_a_keyword_setting_other_than_one_is_refused(tmp_path, name) -> None:
    # the tabulated ELU is elu(x) with every setting 1: a keyword 2.0 must not be dropped
    from rewriter.backends import hls

    class Elu(torch.nn.Module):
        def forward(self, x):
            return torch.ops.aten.elu.default(x, **{name: 2.0})

    gm = torch.fx.symbolic_trace(Elu())
    x = torch.randn(2, 5)
    with pytest.raises(LoweringError, match="elu"):
        hls.export(gm, (x,), tmp_path)
