"""Shared fixtures: tiny random SD1-like and SD2-like models in every layout, built once and cached.

The models live in ``.cache/tiny-models-v*/`` (git-ignored) and are reused across test runs;
bump ``FIXTURE_VERSION`` in ``tiny_models.py`` when their layout changes.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# tiny models: one thread is much faster than two fighting over small kernels (and CI has 2 cores)
os.environ.setdefault("OMP_NUM_THREADS", "1")
# the CLIs run as processes of their own keep glibc's malloc, whatever this machine has installed:
# a restart under tcmalloc repeats a run's imports (tests that restart say so)
os.environ.setdefault("TI_ALLOCATOR", "glibc")
torch.set_num_threads(1)


def ensure_tiny_model(family: str) -> Path:
    from tiny_models import ensure_tiny_model as build  # imported late: diffusers is slow to import

    return build(family)


@pytest.fixture(scope="session")
def tiny_sd1() -> Path:
    """Folder with ``diffusers/``, ``model.safetensors`` and ``model.ckpt`` of the tiny SD1 model."""
    return ensure_tiny_model("sd1")


@pytest.fixture(scope="session")
def tiny_sd2() -> Path:
    """Folder with ``diffusers/``, ``model.safetensors`` and ``model.ckpt`` of the tiny SD2 model."""
    return ensure_tiny_model("sd2")


@pytest.fixture(scope="session")
def tiny_sd1_dir(tiny_sd1: Path) -> Path:
    return tiny_sd1 / "diffusers"


@pytest.fixture(scope="session")
def tiny_sd1_safetensors(tiny_sd1: Path) -> Path:
    return tiny_sd1 / "model.safetensors"


@pytest.fixture(scope="session")
def tiny_sd1_ckpt(tiny_sd1: Path) -> Path:
    return tiny_sd1 / "model.ckpt"


@pytest.fixture(scope="session")
def tiny_sd2_dir(tiny_sd2: Path) -> Path:
    return tiny_sd2 / "diffusers"


@pytest.fixture(scope="session")
def tiny_sd2_safetensors(tiny_sd2: Path) -> Path:
    return tiny_sd2 / "model.safetensors"


@pytest.fixture(scope="session")
def tiny_sd2_ckpt(tiny_sd2: Path) -> Path:
    return tiny_sd2 / "model.ckpt"


@pytest.fixture(scope="session")
def tiny_sdxl() -> Path:
    """Folder with ``diffusers/``, ``model.safetensors`` and ``model.ckpt`` of the tiny SDXL-layout
    model (two text encoders of widths 32 and 64, SDXL's added conditioning)."""
    return ensure_tiny_model("sdxl")
