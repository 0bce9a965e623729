"""Shared modules of the Textual Inversion trainer and generator (one module per concern)."""
