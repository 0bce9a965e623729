"""Peak memory of a phase of the benchmark, without new dependencies.

``ru_maxrss`` only knows the peak of the whole process (model loading included), so a thread
samples the resident set size every few milliseconds and keeps the peak since the last
``reset()``: that gives the peak of the training steps alone. On CUDA the allocator's own
``max_memory_allocated`` is exact and is used instead.
"""

from __future__ import annotations

import os
import resource
import sys
import threading
import time
from pathlib import Path

_STATM = Path("/proc/self/statm")


def current_rss_bytes() -> int:
    """Resident set size now: /proc (Linux), psutil if installed, else the process peak."""
    if _STATM.is_file():
        return int(_STATM.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:
        return process_peak_rss_bytes()


_STATUS = Path("/proc/self/status")


def process_peak_rss_bytes() -> int:
    """The process's peak RSS so far: ``VmHWM`` on Linux, else ``ru_maxrss``.

    Not ``ru_maxrss`` on Linux: a child started with fork + exec reports at least its parent's
    resident size at the fork, so every worker of a bench that had built the 2 GB checkpoint
    showed the same 5.8 GB. ``VmHWM`` belongs to the process's own address space.
    """
    if _STATUS.is_file():
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


class PeakRSS:
    """A background sampler of the RSS peak; use as a context manager."""

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="peak-rss", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, current_rss_bytes())
            time.sleep(self.interval)

    def reset(self) -> None:
        """Start a new phase: the peak is counted from now on."""
        self.peak = current_rss_bytes()

    def __enter__(self) -> PeakRSS:
        self.reset()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, current_rss_bytes())
