"""SDXL side by side with kohya: ``python -m bench.sdxl [--kohya DIR --kohya_python PY]``.

One command line (kohya's own options) run through ``sdxl_train_textual_inversion.py`` here and,
when its folder and environment are given, through kohya's script of the same name, on the same
full-size random SDXL single file (``bench.checkpoint``, 6.9 GB, never committed): 512 px,
batch 1, cached latents, one vector, fp32 and bf16. Each run's peak resident memory, also over the
steps alone, and its seconds per step after a warm-up step come from outside the process
(``bench.launch``). The runs alternate (ours, kohya's) so that both see the same machine; the
machine is printed with the table.

kohya needs the tokenizers in its cache layout offline: ``--tokenizer_cache_dir`` is passed to
both, and the shipped tokenizer is written there first in kohya's folders
(``openai_clip-vit-large-patch14``, ``laion_CLIP-ViT-bigG-14-laion2B-39B-b160k``), as our trainer
does on its first run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from bench.checkpoint import SDXL_CHECKPOINT, ensure_checkpoint
from bench.launch import measure
from bench.machine import describe_machine, preloaded_allocator
from bench.training import make_dataset, tmp_root
from library.text.tokenizer import family_tokenizers

ROOT = Path(__file__).resolve().parent.parent
STEPS = 5  # the first is warm-up; the others are timed by the wall clock
OURS_ONLY = {"--highvram"}  # kohya's trainers have no such option: compared with kohya's run without it


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


def run_name(program: str, extra: list[str], precision: str) -> str:
    """A run's name in the table and the JSON: ``ours --highvram no``, ``kohya bf16``."""
    return " ".join([program, *extra, precision])


def kohya_counterpart(extra: list[str], precision: str) -> str:
    """The kohya run a run of ours is compared with: the same options, less those kohya lacks."""
    return run_name("kohya", [option for option in extra if option not in OURS_ONLY], precision)


def print_row(name: str, figure: dict, kohya: dict) -> None:
    """One table row; the ratios to kohya's run of the same precision (and options) when there is one."""
    if "error" in figure:
        print(f"| {name} | failed: {figure['error'].strip().splitlines()[-1]} | | | | |", flush=True)
        return
    ratios = "| | "
    if kohya.get("peak_rss_bytes"):
        ratios = (
            f"| {figure['peak_rss_bytes'] / kohya['peak_rss_bytes']:.2f} "
            f"| {figure['seconds_per_step'] / kohya['seconds_per_step']:.2f} "
        )
    print(
        f"| {name} | {figure['peak_rss_bytes'] / 1e9:.2f} GB | {figure['steps_peak_rss_bytes'] / 1e9:.2f} GB "
        f"| {figure['seconds_per_step']:.1f} {ratios}|",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kohya", type=Path, help="kohya's sd-scripts folder (its script runs there)")
    parser.add_argument("--kohya_python", type=Path, help="the python of kohya's environment")
    parser.add_argument("--precisions", nargs="+", default=["no", "bf16"])
    parser.add_argument(
        "--with_option",
        action="append",
        default=[],
        help="also run both programs with this option (e.g. --with_option=--gradient_checkpointing)",
    )
    parser.add_argument("--programs", nargs="+", choices=["ours", "kohya"], default=["ours", "kohya"])
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    checkpoint = ensure_checkpoint(SDXL_CHECKPOINT, family="sdxl")
    work = Path(tempfile.mkdtemp(prefix="sdxl-", dir=tmp_root()))
    data = make_dataset(work / "data", 512, images=2, repeats=1)
    family_tokenizers("sdxl", tokenizer_cache_dir=work / "tokenizers")  # kohya's cache, written as ours does
    machine = describe_machine()
    cpu = machine["cpu"]
    print(
        f"{machine['date']}  {cpu['model']} ({', '.join(cpu['flags']) or 'no AVX512-BF16/AMX'})  torch {machine['torch']}"
        f"  ours allocate with {machine['cli_allocator']}, kohya with {preloaded_allocator()}"
    )
    print(
        "| run | peak RSS | steps' peak RSS | s/step | RSS / kohya | s/step / kohya |\n|---|---|---|---|---|---|",
        flush=True,
    )
    figures: dict = {}
    ours = [sys.executable, str(ROOT / "sdxl_train_textual_inversion.py")]
    kohyas = (
        [str(args.kohya_python), "sdxl_train_textual_inversion.py"]
        if args.kohya and args.kohya_python
        else None
    )
    for precision in args.precisions:
        options_sets = [
            [],
            *([["--highvram"]] if precision == "no" else []),
            *[[o] for o in args.with_option],
        ]
        for extra in options_sets:
            runs = {run_name("ours", extra, precision): (ours, ROOT)} if "ours" in args.programs else {}
            if kohyas and "kohya" in args.programs and not set(extra) & OURS_ONLY:
                runs[run_name("kohya", extra, precision)] = (kohyas, args.kohya)
            for name, (program, cwd) in runs.items():
                out = work / name.replace(" ", "").replace("-", "_")
                options = command_line(checkpoint, data, out, work / "tokenizers", precision)
                figures[name] = measure([*program, *options, *extra], cwd, STEPS)
            kohya = figures.get(kohya_counterpart(extra, precision), {})
            for name in runs:
                print_row(name, figures[name], {} if name.startswith("kohya") else kohya)
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "runs": figures}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
