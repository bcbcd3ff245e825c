"""Memory accounting of a streamed run: giving freed heap back to the system between tensors
(:func:`trim_heap`) and measuring the growth of the resident set (:class:`ResidentPeak`), which a
streamed rewrite reports against the largest tensor it read or wrote.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

__all__ = ["ResidentPeak", "trim_heap"]

_LIBC: Any = None


def trim_heap() -> None:
    """Return freed heap memory to the system (glibc ``malloc_trim``), where there is glibc.

    Passes free their working tensors tensor by tensor; glibc keeps freed blocks below its
    mmap threshold in the heap, so without a trim the resident set of a long streamed run
    creeps up to the sum of those holes. (A low fixed mmap threshold does the same but makes
    every block a fresh mapping: measured 5x slower quantization.) A trim costs well under a
    millisecond when there is little to return.
    """
    global _LIBC
    if _LIBC is None:
        import ctypes
        import ctypes.util

        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.malloc_trim  # noqa: B018 - glibc only
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


class ResidentPeak:
    """The growth of the resident set over its value on entry: ``growth`` (bytes) after the
    block. Uses the kernel's high-water mark, reset on entry (``/proc/self/clear_refs``); where
    that is unavailable, a sampling thread."""

    def __init__(self, interval: float = 0.01) -> None:
        self.interval = interval
        self.baseline = 0
        self.peak = 0
        self._thread: Any = None
        self._stop = False
        self._kernel = False

    def __enter__(self) -> ResidentPeak:
        self.baseline = _status("VmRSS")
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self._kernel = _status("VmHWM") > 0
        except OSError:
            self._kernel = False
        if not self._kernel:
            import threading

            self.peak = self.baseline

            def sample() -> None:
                while not self._stop:
                    self.peak = max(self.peak, _status("VmRSS"))
                    time.sleep(self.interval)

            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.sample()
        if self._thread is not None:
            self._stop = True
            self._thread.join()

    def sample(self) -> int:
        """The growth so far."""
        now = _status("VmHWM") if self._kernel else max(self.peak, _status("VmRSS"))
        self.peak = max(self.peak, now)
        return self.growth

    @property
    def growth(self) -> int:
        return max(0, self.peak - self.baseline)


def _status(field: str) -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    if field == "VmRSS":
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return 0
