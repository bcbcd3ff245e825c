"""A resource model of an exported design, per layer, from the reuse factor: multipliers to DSP
slices, stored constants to BRAM bits. Modelled, not synthesized: it counts what the templates
instantiate (``multipliers = products per output / reuse`` as hls4ml's ``multiplier_limit``) and
how many 18 Kb BRAMs the constants fill, to compare designs (LayerNorm vs RMSNorm vs L1 norm,
float vs ShiftQuant linears) before running the vendor tools."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["estimate"]

BRAM_BITS = 18 * 1024
DSP_A, DSP_B = 27, 18  # a DSP48E2 multiplies 27 x 18 bits


def _dsps_per_multiply(a_bits: int, b_bits: int) -> int:
    a, b = max(a_bits, b_bits), min(a_bits, b_bits)
    return math.ceil(a / DSP_A) * math.ceil(b / DSP_B)


def estimate(layers: list[dict[str, Any]], precision: Any, reuse_factor: int) -> dict[str, Any]:
    """Per layer and in total: multipliers, DSPs, constant bits, BRAM18 count (modelled)."""
    data, weight = precision.data.width, precision.weight.width
    per_layer = []
    for layer in layers:
        kind = layer["kind"]
        entry: dict[str, Any] = {"node": layer["node"], "kind": kind}
        if kind == "dense":
            mults = math.ceil(layer["n_in"] * layer["n_out"] / layer["reuse_factor"])
            entry |= {
                "multipliers": mults,
                "dsp": mults * _dsps_per_multiply(data, weight),
                "weight_bits": layer["n_in"] * layer["n_out"] * weight,
            }
        elif kind == "shiftquant_dense":
            bits = layer["bits"]
            mults = math.ceil(layer["n_in"] * layer["n_out"] / layer["reuse_factor"])
            groups = math.ceil(layer["n_in"] / layer["group"])
            # b-bit x data products fit in LUTs (adders for 2 bits); scales are shifts: no DSP
            entry |= {
                "multipliers": mults,
                "dsp": 0,
                "lut_multipliers": mults,
                "weight_bits": layer["n_in"] * layer["n_out"] * bits + groups * layer["n_out"] * 8,
            }
        elif kind in ("layer_norm", "rms_norm", "crms_norm", "l1_norm"):
            n = layer["n"]
            squares = {"layer_norm": n, "rms_norm": n, "crms_norm": n + 1, "l1_norm": 0}[kind]
            # squares, then one reciprocal square root (about 3 Newton steps: 6 multiplies) or,
            # for L1, one reciprocal; then the scaling multiplies (and the affine)
            roots = 6 if kind != "l1_norm" else 0
            scales = n * (2 if kind in ("layer_norm", "l1_norm") else 1)
            mults = squares + roots + scales
            entry |= {
                "multipliers": mults,
                "dsp": mults * _dsps_per_multiply(data, data),
                "squares": squares,
                "square_roots": 1 if kind != "l1_norm" else 0,
                "divisions": 1 if kind == "l1_norm" else 0,
                "weight_bits": 2 * n * weight,
            }
        elif kind in ("matmul", "softmax_attention", "linear_attention"):
            entry |= {"multipliers": "sequential (one MAC pipeline per loop)", "dsp": 1}
        else:
            entry |= {"dsp": 0}
        entry["bram18"] = math.ceil(entry.get("weight_bits", 0) / BRAM_BITS)
        per_layer.append(entry)
    total = {
        "dsp": sum(e.get("dsp", 0) for e in per_layer if isinstance(e.get("dsp"), int)),
        "bram18": sum(e["bram18"] for e in per_layer),
        "weight_bits": sum(e.get("weight_bits", 0) for e in per_layer),
    }
    return {"modelled": True, "reuse_factor": reuse_factor, "layers": per_layer, "total": total}
