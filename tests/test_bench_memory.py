"""bench.trainer_memory reads the peak memory of the command alone, not of whoever starts it."""

from __future__ import annotations

import sys

from bench.trainer_memory import peak_rss_bytes

TOUCH_300_MB = "import numpy; a = numpy.ones(300_000_000 // 8); print(a.sum())"


def test_the_peak_is_the_commands_own_even_when_the_caller_is_large():
    ballast = bytearray(b"x" * 800_000_000)  # a caller far larger than the command (fork copies its RSS)
    peak = peak_rss_bytes([sys.executable, "-c", TOUCH_300_MB])
    assert 300e6 < peak < 600e6, peak
    del ballast
