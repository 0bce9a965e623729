"""The same command lines give the same vectors as before a restructuring: two fixed runs of the real
CLI (a tiny model with many options, the small real model with the demo's settings) compared with
vectors recorded by the trainer before the code was reorganised (``tests/data/golden_vectors.json``).

On the machine that recorded them the vectors are identical; another CPU may round differently in
the last bits, so the comparison allows a relative difference of 1e-4.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import ROOT, run_train
from PIL import Image
from safetensors.torch import load_file

GOLDEN = Path(__file__).parent / "data" / "golden_vectors.json"
SHAPES_MODEL = ROOT / "models" / "shapes-sd1.safetensors"


def tiny_pictures(root: Path) -> Path:
    """Four captioned pictures, the same on every machine (no path enters the random numbers)."""
    folder = root / "2_mychar4 toy"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(3)
    for i in range(4):
        pixels = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
        pixels[:32] = [200, 40 * i, 90]
        Image.fromarray(pixels).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"a photo of mychar4 toy, number {i}")
    return root


def shape_pictures(root: Path) -> Path:
    from tools.demo import draw_training_pictures

    draw_training_pictures(root / "1_myshape")
    return root


def tiny_command(data: Path, out: Path, model: Path) -> list[str]:
    return [
        f"--pretrained_model_name_or_path={model}",
        f"--train_data_dir={data}",
        f"--output_dir={out}",
        "--resolution=64,64",
        "--caption_extension=.txt",
        "--max_data_loader_n_workers=0",
        "--seed=7",
        "--token_string=mychar4",
        "--init_word=cute toy",
        "--num_vectors_per_token=3",
        "--clip_skip=2",
        "--gradient_accumulation_steps=2",
        "--cache_latents",
        "--max_token_length=150",
        "--noise_offset=0.05",
        "--min_snr_gamma=5",
        "--optimizer_type=Lion",
        "--lr_scheduler=cosine",
        "--lr_warmup_steps=1",
        "--preserve_embedding_norm",
        "--max_train_epochs=2",
        "--learning_rate=1e-3",
        "--init_word_mode=spread",
        "--validation_split=0.25",
        "--save_model_as=safetensors",
    ]


def shapes_command(data: Path, out: Path) -> list[str]:
    return [
        f"--pretrained_model_name_or_path={SHAPES_MODEL}",
        f"--train_data_dir={data}",
        f"--output_dir={out}",
        "--resolution=64",
        "--train_batch_size=8",
        "--learning_rate=5e-3",
        "--max_train_steps=20",
        "--save_model_as=safetensors",
        "--caption_extension=.txt",
        "--cache_latents",
        "--seed=1",
        "--token_string=myshape",
        "--init_word=shape",
        "--max_data_loader_n_workers=0",
    ]


def golden(name: str) -> torch.Tensor:
    return torch.tensor(json.loads(GOLDEN.read_text())[name])


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_a_tiny_run_with_many_options_gives_the_recorded_vectors(family, tiny_sd1, tiny_sd2, tmp_path):
    model = {"sd1": tiny_sd1, "sd2": tiny_sd2}[family] / "model.safetensors"
    run_train(*tiny_command(tiny_pictures(tmp_path / "data"), tmp_path / "out", model))
    vectors = load_file(str(tmp_path / "out" / "mychar4.safetensors"))["emb_params"]
    torch.testing.assert_close(vectors, golden(f"tiny-{family}"), rtol=1e-4, atol=1e-6)


def test_the_demo_settings_on_the_real_model_give_the_recorded_vector(tmp_path):
    run_train(*shapes_command(shape_pictures(tmp_path / "data"), tmp_path / "out"))
    vectors = load_file(str(tmp_path / "out" / "myshape.safetensors"))["emb_params"]
    torch.testing.assert_close(vectors, golden("shapes"), rtol=1e-4, atol=1e-6)
