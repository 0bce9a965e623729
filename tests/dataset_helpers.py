"""Helpers for the dataset tests: tiny images, argument namespaces, a tokenizer, a tiny VAE.

No tests here; the ``test_dataset_*.py`` files import these helpers.
"""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from library.options import settings_from
from library.text.tokenizer import shipped_tokenizer
from library.text.tokens import placeholder_names
from library.training.dataset import add_dataset_arguments
from library.training.dataset.args import DataOptions

_PARSER = argparse.ArgumentParser()
add_dataset_arguments(_PARSER)


def make_args(*cli: str, **values) -> DataOptions:
    """The dataset options of a kohya-style command line, with some overridden by keyword."""
    unknown = set(values) - {field.name for field in fields(DataOptions)}
    assert not unknown, f"not dataset options: {unknown}"
    return settings_from(DataOptions, _PARSER.parse_args(list(cli)), **{"bucket_reso_multiple": 64, **values})


def make_image(
    path: Path, size: tuple[int, int] = (64, 64), seed: int = 0, mode: str = "RGB", **save_kwargs
) -> Path:
    """A random-noise image of ``size`` = (width, height); RGBA gets a left-half-transparent alpha."""
    rng = np.random.default_rng(seed)
    channels = 4 if mode == "RGBA" else 3
    pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    if mode == "RGBA":
        pixels[:, : size[0] // 2, 3] = 0
        pixels[:, size[0] // 2 :, 3] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, mode).save(path, **save_kwargs)
    return path


def make_dreambooth(
    root: Path, folders: dict[str, list[tuple[int, int]]], captions: dict[str, str] | None = None
):
    """``root/<folder>/imgN.png`` for each size; ``captions`` maps 'folder/imgN' to .txt text."""
    for folder, sizes in folders.items():
        for index, size in enumerate(sizes):
            make_image(root / folder / f"img{index}.png", size, seed=hash((folder, index)) % 1000)
    for name, text in (captions or {}).items():
        (root / f"{name}.txt").write_text(text, encoding="utf-8")
    return root


def tokenizer_with(token: str = "sks", vectors: int = 3):
    tokenizer = shipped_tokenizer(False)
    tokenizer.add_tokens(placeholder_names(token, vectors))
    return tokenizer


def tiny_vae():
    """An AutoencoderKL with SD's /8 downscale (three downsampling blocks) and 4 latent channels."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 8, 8, 8),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=64,
    )
    return vae.eval()


SMALL_BUCKETS = ("--enable_bucket", "--min_bucket_reso", "64", "--max_bucket_reso", "256")
