"""Shared modules of the Textual Inversion trainer and generator (one module per concern)."""

__version__ = "0.1.0"  # the project's version (pyproject.toml), recorded in the files we write
IMPLEMENTATION = f"ti-trainer/{__version__}"  # modelspec.implementation_version (kohya: sd-scripts/<commit>)
