"""SDXL side by side with kohya: ``python -m bench.sdxl [--kohya DIR --kohya_python PY]``.

One command line (kohya's own options) run through ``sdxl_train_textual_inversion.py`` here and,
when its folder and environment are given, through kohya's script of the same name, on the same
full-size random SDXL single file (``bench.checkpoint``, 6.9 GB, never committed): 512 px,
batch 1, cached latents, one vector, fp32 and bf16. Each run's peak resident memory comes from
the kernel (``bench.trainer_memory``'s small launcher), its seconds per step from the progress
bar's last rate (tqdm, in both programs), after a warm-up step. The runs alternate (ours, kohya's)
so that both see the same machine; the machine is printed with the table.

kohya needs the tokenizers in its cache layout offline: ``--tokenizer_cache_dir`` is passed to
both, and our trainer writes kohya's folders there (``openai_clip-vit-large-patch14``,
``laion_CLIP-ViT-bigG-14-laion2B-39B-b160k``) on its first run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.checkpoint import SDXL_CHECKPOINT, ensure_checkpoint
from bench.machine import describe_machine
from bench.training import make_dataset, tmp_root

ROOT = Path(__file__).resolve().parent.parent
STEPS = 3  # the first is warm-up; the rate is tqdm's over the run

# Runs argv[1:], passes its stderr on and prints its peak RSS in bytes; small, so that the child's
# figure is its own (see bench.trainer_memory).
LAUNCHER = """
import resource, subprocess, sys
code = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode
if code:
    sys.exit(code)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)
"""


def command_line(checkpoint: Path, data: Path, out: Path, tokenizers: Path, precision: str) -> list[str]:
    """kohya's options, valid in both trainers."""
    return [
        f"--pretrained_model_name_or_path={checkpoint}",
        f"--train_data_dir={data}",
        f"--output_dir={out}",
        "--resolution=512",
        "--train_batch_size=1",
        f"--max_train_steps={STEPS}",
        "--learning_rate=1e-3",
        "--token_string=benchtok",
        "--init_word=toy",
        "--num_vectors_per_token=1",
        "--cache_latents",
        "--no_half_vae",
        "--caption_extension=.txt",
        "--save_model_as=safetensors",
        "--max_data_loader_n_workers=0",
        "--seed=0",
        f"--mixed_precision={precision}",
        f"--tokenizer_cache_dir={tokenizers}",
        "--sdpa",
    ]


def measure(command: list[str], cwd: Path) -> dict:
    """Peak RSS (bytes), the last seconds-per-step rate and the wall time of ``command``."""
    started = time.time()
    result = subprocess.run(
        [sys.executable, "-c", LAUNCHER, *command],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
    )
    if result.returncode:
        return {"error": result.stderr[-2000:]}
    rates = re.findall(r"(\d+(?:\.\d+)?)s/it", result.stderr)
    return {
        "peak_rss_bytes": int(result.stdout.strip().splitlines()[-1]),
        "seconds_per_step": float(rates[-1]) if rates else None,
        "wall_seconds": time.time() - started,
    }


def print_row(name: str, figure: dict, kohya: dict) -> None:
    """One table row; the ratios to kohya's run of the same precision when there is one."""
    if "error" in figure:
        print(f"| {name} | failed: {figure['error'].splitlines()[-1]} | | | |", flush=True)
        return
    ratios = "| | "
    if kohya.get("peak_rss_bytes"):
        ratios = (
            f"| {figure['peak_rss_bytes'] / kohya['peak_rss_bytes']:.2f} "
            f"| {figure['seconds_per_step'] / kohya['seconds_per_step']:.2f} "
        )
    print(
        f"| {name} | {figure['peak_rss_bytes'] / 1e9:.2f} GB | {figure['seconds_per_step']:.1f} {ratios}|",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kohya", type=Path, help="kohya's sd-scripts folder (its script runs there)")
    parser.add_argument("--kohya_python", type=Path, help="the python of kohya's environment")
    parser.add_argument("--precisions", nargs="+", default=["no", "bf16"])
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    checkpoint = ensure_checkpoint(SDXL_CHECKPOINT, family="sdxl")
    work = Path(tempfile.mkdtemp(prefix="sdxl-", dir=tmp_root()))
    data = make_dataset(work / "data", 512, images=2, repeats=1)
    machine = describe_machine()
    cpu = machine["cpu"]
    print(
        f"{machine['date']}  {cpu['model']} ({', '.join(cpu['flags']) or 'no AVX512-BF16/AMX'})  torch {machine['torch']}"
    )
    print("| run | peak RSS | s/step | RSS / kohya | s/step / kohya |\n|---|---|---|---|---|", flush=True)
    figures: dict = {}
    ours_program = [sys.executable, str(ROOT / "sdxl_train_textual_inversion.py")]
    for precision in args.precisions:
        runs = {"ours": (ours_program, ROOT, [])}
        if precision == "no":  # fp32 frozen weights: speed over memory
            runs["ours --highvram"] = (ours_program, ROOT, ["--highvram"])
        if args.kohya and args.kohya_python:
            runs["kohya"] = ([str(args.kohya_python), "sdxl_train_textual_inversion.py"], args.kohya, [])
        for name, (program, cwd, extra) in runs.items():
            out = work / f"{name}-{precision}".replace(" ", "")
            options = command_line(checkpoint, data, out, work / "tokenizers", precision)
            figures[f"{name} {precision}"] = measure([*program, *options, *extra], cwd)
        kohya = figures.get(f"kohya {precision}", {})
        for name in runs:
            print_row(f"{name} {precision}", figures[f"{name} {precision}"], kohya if name != "kohya" else {})
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "runs": figures}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
