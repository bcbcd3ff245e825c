"""Fixed-point precisions of an HLS export: per-node data types, accumulators, weights, tables.

Types are written as Vitis HLS types (``ap_fixed<W,I>``: W bits, I of them integer bits with the
sign). A :class:`Precision` has defaults and overrides by node name or source module (regular
expressions, full match, first match wins). :func:`from_ranges` picks each node's integer bits
from the largest magnitude it takes on calibration inputs, keeping the total width.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping

__all__ = ["FixedType", "Precision", "from_ranges", "parse_type"]


@dataclasses.dataclass(frozen=True)
class FixedType:
    """``ap_fixed<width, integer>`` (signed), rounding to nearest and saturating."""

    width: int
    integer: int

    def __post_init__(self) -> None:
        if not 1 <= self.width <= 64 or self.integer > self.width + 32:
            raise ValueError(f"ap_fixed<{self.width},{self.integer}> is not a usable type")

    @property
    def fraction(self) -> int:
        return self.width - self.integer

    def cpp(self) -> str:
        return f"ap_fixed<{self.width},{self.integer},AP_RND_CONV,AP_SAT>"

    def __str__(self) -> str:
        return f"ap_fixed<{self.width},{self.integer}>"

    def quantum(self) -> float:
        return 2.0**-self.fraction

    def largest(self) -> float:
        return 2.0 ** (self.integer - 1) - self.quantum()

    def bits(self, value: float) -> int:
        """The raw two's-complement bits of ``value`` (rounded, saturated), as a signed int."""
        code = round(value / self.quantum())
        top = 2 ** (self.width - 1)
        return max(-top, min(top - 1, code))


_TYPE = re.compile(r"\s*ap_fixed\s*<\s*(\d+)\s*,\s*(-?\d+)\s*>\s*")


def parse_type(text: str | FixedType) -> FixedType:
    """``"ap_fixed<18,8>"`` -> :class:`FixedType`."""
    if isinstance(text, FixedType):
        return text
    match = _TYPE.fullmatch(text)
    if not match:
        raise ValueError(f"not an ap_fixed<W,I> type: {text!r}")
    return FixedType(int(match.group(1)), int(match.group(2)))


@dataclasses.dataclass
class Precision:
    """Precisions for one export.

    ``data``: every activation; ``weight``: stored constants (weights, biases, norm affines);
    ``accum``: accumulators of sums and products; ``state``: linear attention's recurrent state;
    ``table``: GELU/SiLU/exp tables; ``overrides``: ``{regex: type}`` matched against each node's
    name and its source module path (full match, first wins) for its data type.
    """

    data: FixedType | str = "ap_fixed<18,8>"
    weight: FixedType | str = "ap_fixed<18,8>"
    accum: FixedType | str = "ap_fixed<48,24>"
    state: FixedType | str = "ap_fixed<32,12>"
    table: FixedType | str = "ap_fixed<18,4>"
    overrides: Mapping[str, FixedType | str] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        for field in ("data", "weight", "accum", "state", "table"):
            setattr(self, field, parse_type(getattr(self, field)))
        self.overrides = {key: parse_type(value) for key, value in self.overrides.items()}

    def for_node(self, name: str, module: str | None) -> FixedType:
        for pattern, kind in self.overrides.items():
            if re.fullmatch(pattern, name) or (module and re.fullmatch(pattern, module)):
                return kind  # type: ignore[return-value]
        return self.data  # type: ignore[return-value]

    def as_dict(self) -> dict[str, object]:
        return {
            "data": str(self.data),
            "weight": str(self.weight),
            "accum": str(self.accum),
            "state": str(self.state),
            "table": str(self.table),
            "overrides": {k: str(v) for k, v in self.overrides.items()},
        }


def from_ranges(
    ranges: Mapping[str, float], width: int = 18, margin: int = 1, base: Precision | None = None
) -> Precision:
    """A :class:`Precision` whose per-node data types keep ``width`` bits and give each node the
    integer bits its largest magnitude needs (``ranges``: node name -> max |value|, as
    ``rewriter.backends.hls.calibrate`` measures) plus ``margin``."""
    base = base or Precision()
    overrides: dict[str, FixedType | str] = {}
    for name, largest in ranges.items():
        integer = max(1, math.ceil(math.log2(largest + 1e-12)) + 1 + margin) if largest > 0 else 1
        overrides[re.escape(name)] = FixedType(width, min(integer, width))
    return dataclasses.replace(base, overrides={**overrides, **dict(base.overrides)})
