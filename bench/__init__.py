"""Benchmarks of the Textual Inversion trainer (``make bench``); see docs/benchmarks.md."""
