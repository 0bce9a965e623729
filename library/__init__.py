"""Shared modules of the Textual Inversion trainer and generator (folders by concern; docs/architecture.md)."""

import logging

__version__ = "0.1.0"  # the project's version (pyproject.toml), recorded in the files we write
IMPLEMENTATION = f"ti-trainer/{__version__}"  # modelspec.implementation_version (kohya: sd-scripts/<commit>)

# Imported through diffusers, bitsandbytes looks for an optional 4-bit CPU kernel on the Hugging
# Face hub and, offline, warns "Failed to load CPU gemm_4bit_forward": a notice that reads like a
# failure on every run, about a kernel nothing here uses. Only its errors are shown.
for _noisy in ("bitsandbytes", "kernels"):
    logging.getLogger(_noisy).setLevel(logging.ERROR)
