"""``make demo``: the whole job on an embedded default, offline, in about a minute on a CPU.

1. builds a tiny random SD 1.x-shaped model (all three layouts) and a few synthetic images,
2. trains a 2-vector embedding ``demotoy`` with the real CLI (kohya-style command line),
3. renders an image with ``gen_img_diffusers.py`` using the embedding just trained.

The model is random, so the picture is noise-like; the point is that every step runs and the
files are the ones users get. Everything goes to ``demo_output/`` (git-ignored).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "demo_output"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def synthetic_images(folder: Path, count: int = 4) -> None:
    """Little pictures of one 'toy': a coloured disc on a plain background, captioned with the word."""
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:64, 0:64]
    for i in range(count):
        image = np.full((64, 64, 3), (30 + 40 * i, 60, 90), dtype=np.uint8)
        disc = (xx - 32 - 4 * i) ** 2 + (yy - 30) ** 2 < 14**2
        image[disc] = (230, 180, 40)
        Image.fromarray(image).save(folder / f"toy{i}.png")
        (folder / f"toy{i}.txt").write_text(f"a photo of demotoy, view {i}")


def run(command: list[str]) -> None:
    print("\n$ " + " ".join(command[1:]), flush=True)
    # tiny model: one thread per process is faster than two fighting over small kernels
    env = {"OMP_NUM_THREADS": "1", **os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    subprocess.run(command, check=True, cwd=ROOT, env=env)


def main() -> None:
    from tiny_models import ensure_tiny_model

    model = ensure_tiny_model("sd1") / "model.safetensors"
    data = OUT / "data"
    synthetic_images(data / "10_demotoy")
    run([
        sys.executable, "train_textual_inversion.py",
        f"--pretrained_model_name_or_path={model}", f"--train_data_dir={data}", f"--output_dir={OUT / 'ti'}",
        "--output_name=demotoy", "--caption_extension=.txt", "--resolution=64,64", "--train_batch_size=2",
        "--learning_rate=5e-3", "--max_train_steps=30", "--save_model_as=safetensors", "--seed=42",
        "--token_string=demotoy", "--init_word=toy", "--num_vectors_per_token=2",
        "--max_data_loader_n_workers=0",
    ])  # fmt: skip
    embedding = OUT / "ti" / "demotoy.safetensors"
    run([
        sys.executable, "gen_img_diffusers.py", f"--ckpt={model}", f"--outdir={OUT / 'images'}",
        f"--textual_inversion_embeddings={embedding}", "--prompt=a photo of demotoy on a table",
        "--W=64", "--H=64", "--steps=10", "--sampler=euler_a", "--seed=1", "--sequential_file_name",
    ])  # fmt: skip
    images = sorted((OUT / "images").glob("*.png"))
    print(f"\ndemo done: embedding {embedding.relative_to(ROOT)}, image {images[-1].relative_to(ROOT)}")


if __name__ == "__main__":
    main()
