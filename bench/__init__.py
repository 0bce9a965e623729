"""Benchmarks of the Textual Inversion trainer (``make bench``); see docs/benchmarks.md."""

import library  # noqa: F401  (first: it quiets bitsandbytes' offline notice before diffusers imports it)
