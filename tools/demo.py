"""``make demo``: teach the small real model a concept from 8 pictures, then show and judge it.

1. draws 8 pictures of the concept (a heart, which the base model only knows under a word you
   would not guess) in varied colours into a kohya DreamBooth folder, captioned as users caption
   their pictures: ``a red myshape``;
2. trains the word ``myshape`` with the real CLI and a kohya-style command line, starting from the
   generic word ``shape`` (which draws any of the seven shapes);
3. renders a grid, ``demo_output/grid.png``: one row per prompt (the init word, the learned word,
   the learned word in two colours), one column per seed;
4. judges the embedding with ``tools/concept_eval.py`` on 144 + 144 pictures and prints its line.

Everything goes to ``demo_output/`` (git-ignored). Run ``python -m tools.demo``; with ``--sdxl``
(``make demo-sdxl``) the same demo runs on the SDXL-layout model with
``sdxl_train_textual_inversion.py`` into ``demo_output_sdxl/``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from tools import shapes
from tools.concept_eval import SHAPES_MODEL, SHAPES_SDXL_MODEL, evaluate_embedding, generate

ROOT = Path(__file__).resolve().parent.parent
WORD = "myshape"
PICTURES = 8
SEED = 1


class Demo:
    """Where one demo reads and writes: the model, the trainer script, the output folder."""

    def __init__(self, sdxl: bool):
        self.model = SHAPES_SDXL_MODEL if sdxl else SHAPES_MODEL
        self.script = "sdxl_train_textual_inversion.py" if sdxl else "train_textual_inversion.py"
        self.out = ROOT / ("demo_output_sdxl" if sdxl else "demo_output")

    def train_options(self) -> list[str]:
        """The training command, as a kohya user would write it (paths relative to the repository)."""
        return [
            f"--pretrained_model_name_or_path={self.model.relative_to(ROOT)}",
            f"--train_data_dir={(self.out / 'data').relative_to(ROOT)}",
            f"--output_dir={(self.out / 'ti').relative_to(ROOT)}",
            "--resolution=64",
            "--train_batch_size=8",
            "--learning_rate=5e-3",
            "--max_train_steps=150",
            "--save_model_as=safetensors",
            "--caption_extension=.txt",
            "--cache_latents",
            f"--seed={SEED}",
            f"--token_string={WORD}",
            f"--init_word={shapes.GENERIC_WORD}",
            "--num_vectors_per_token=1",
            "--max_data_loader_n_workers=0",
        ]


TRAIN_OPTIONS = Demo(sdxl=False).train_options()  # the SD 1.x demo's command (bench/quality.py varies it)


def replacing(options: tuple[str, ...], changes: tuple[str, ...]) -> tuple[str, ...]:
    """``options`` with ``changes`` added, each replacing the option of the same name (the part
    before ``=``), so that a command line never carries two of one option."""
    changed = {option.split("=", 1)[0] for option in changes}
    return (*(o for o in options if o.split("=", 1)[0] not in changed), *changes)


def varied_command(
    extra: list[str], *, steps: int, save_every: int, seed: int, data: Path, out: Path
) -> list[str]:
    """The SD 1.x demo's training command (python and arguments) with ``extra`` options replacing
    the demo's of the same name, run for ``steps`` and saving every ``save_every`` steps: what the
    quality benches vary."""
    run = (
        f"--max_train_steps={steps}",
        f"--save_every_n_steps={save_every}",
        f"--seed={seed}",
        f"--output_dir={out}",
        f"--train_data_dir={data}",
    )
    return [sys.executable, "train_textual_inversion.py", *replacing(tuple(TRAIN_OPTIONS), (*extra, *run))]


def run_offline(command: list[str], tag: str) -> float:
    """Run a training command from the repository, offline, quietly; its wall time in seconds.
    A failure ends in a ``RuntimeError`` with the end of the trainer's stderr under ``tag``."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    started = time.time()
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{tag}: the trainer failed:\n{result.stderr[-3000:]}")
    return time.time() - started


GRID_ROWS = [f"a {shapes.GENERIC_WORD}", f"a {WORD}", f"a blue {WORD}", f"a yellow {WORD}"]
GRID_SEEDS = list(range(8))


def draw_training_pictures(folder: Path, count: int = PICTURES, seed: int = SEED) -> None:
    """``count`` pictures of the concept shape, one colour after another, captioned ``a <colour> WORD``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    colors = list(shapes.COLORS)
    for i in range(count):
        color = colors[i % len(colors)]
        scene = shapes.random_scene(rng, shape=shapes.CONCEPT_SHAPE, color=color)
        shapes.render(scene).save(folder / f"{i:02d}.png")
        (folder / f"{i:02d}.txt").write_text(f"a {color} {WORD}")


def train(demo: Demo) -> float:
    """Run the trainer CLI; returns its wall time in seconds."""
    options = demo.train_options()
    command = [sys.executable, demo.script, *options]
    print(f"$ python {demo.script} " + " \\\n    ".join(options), flush=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    started = time.time()
    subprocess.run(command, check=True, cwd=ROOT, env=env)
    return time.time() - started


def save_grid(rows: list[list[Image.Image]], path: Path, scale: int = 2) -> None:
    size = shapes.SIZE * scale
    grid = Image.new("RGB", (size * len(rows[0]), size * len(rows)), "white")
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            grid.paste(image.resize((size, size), Image.NEAREST), (c * size, r * size))
    grid.save(path)


def main(argv: list[str] | None = None) -> None:
    import shutil

    parser = argparse.ArgumentParser(description="Teach the small real model a concept and judge it.")
    parser.add_argument("--sdxl", action="store_true", help="the SDXL-layout model and trainer")
    demo = Demo(parser.parse_args(argv).sdxl)
    shutil.rmtree(demo.out, ignore_errors=True)
    draw_training_pictures(demo.out / "data" / f"1_{WORD}")
    seconds = train(demo)
    embedding = demo.out / "ti" / f"{WORD}.safetensors"

    from library.embeddings.install import install_embeddings
    from library.models.loading import load_sd_model

    model = load_sd_model(demo.model)
    installed = install_embeddings(model, [embedding])
    rows = [generate(model, [prompt] * len(GRID_SEEDS), GRID_SEEDS, installed) for prompt in GRID_ROWS]
    save_grid(rows, demo.out / "grid.png")
    grid = (demo.out / "grid.png").relative_to(ROOT)
    print(f"\ngrid: {grid} (rows: {'; '.join(GRID_ROWS)})", flush=True)

    report, _, _ = evaluate_embedding(demo.model, embedding, WORD)
    print(report.line(seconds), flush=True)


if __name__ == "__main__":
    main()
