"""FPGA-oriented HLS backend: a rewritten graph (or one block of it) as a Vitis-HLS-style C++
project built from the templates in ``kernels/hls`` (:func:`export`, :mod:`.project`: the
lowering of :mod:`.emit` with the op handlers of :mod:`.ops`, fixed-point types of
:mod:`.precision`, the resource model of :mod:`.resources`, the files of :mod:`.files`), its C
simulation with g++ against the ``ap_types`` headers of the installed ``hls4ml`` wheel
(:func:`csim`, :mod:`.simulation`), and :class:`HlsBackend`, the shared interface
(:mod:`.backend`).
"""

from __future__ import annotations

from rewriter.backends.hls.backend import CHECK_LSBS, HlsBackend
from rewriter.backends.hls.files import KERNELS
from rewriter.backends.hls.precision import FixedType, Precision, from_ranges, parse_type
from rewriter.backends.hls.project import HlsProject, ap_types_dir, export, lowered, native
from rewriter.backends.hls.simulation import calibrate, csim, port_values

__all__ = [
    "CHECK_LSBS",
    "KERNELS",
    "FixedType",
    "HlsBackend",
    "HlsProject",
    "Precision",
    "ap_types_dir",
    "calibrate",
    "csim",
    "export",
    "from_ranges",
    "lowered",
    "native",
    "parse_type",
    "port_values",
]
