"""Benchmarks of the Textual Inversion trainer: ``make bench`` (or ``.venv/bin/python -m bench.bench``).

What it measures, on the current device (CUDA if present, else CPU), with a full-size SD 1.5
architecture (random weights, built once into ``.cache/bench/``):

* seconds per optimizer step of the real trainer (``train_textual_inversion.main``), per size,
  batch, dtype, with/without gradient checkpointing and latent caching;
* the floor: UNet forward + backward to the text conditioning only, in the same process, and
  the ratio step / floor; the text encoder's share separately;
* peak memory and the optimizer state's bytes vs N x dim x slots x 4;
* the model load time of the single-file checkpoint;
* generation s/image: ``library.generation.generator`` vs a bare diffusers pipeline;
* with ``--profile``: a torch.profiler breakdown of what a step adds beyond the floor.

Every configuration runs in its own process (``bench/worker.py``). Results go to
``bench/results/`` (JSON + Markdown) and the Markdown is copied to ``bench/RESULTS.md``.
See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

from bench.checkpoint import ensure_checkpoint  # noqa: E402
from bench.generation import GenerationSpec  # noqa: E402
from bench.machine import describe_machine  # noqa: E402
from bench.profiling import ProfileSpec  # noqa: E402
from bench.report import attach_floors, config_name, markdown  # noqa: E402
from bench.training import TrainSpec  # noqa: E402

RESULTS_MD = ROOT / "bench" / "RESULTS.md"
FIXED_SECONDS = 25.0  # per worker: imports, model load, latent caching
# The trainer keeps freed memory in the process on CPU (library/host_memory.py). Any glibc malloc
# tunable makes it leave the allocator alone; perturb=0 is glibc's own default, so this extra row
# runs the trainer as it was before that change, and the report compares the two.
GLIBC_DEFAULT_ALLOCATOR = {"GLIBC_TUNABLES": "glibc.malloc.perturb=0"}
GRAD_CKPT_FACTOR = 1.4  # a checkpointed step recomputes the UNet forward
FLOOR_FACTOR = 0.9  # the floor is a little cheaper than a step


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny subset: 256 px, batch 1, fp32 + half, 2 warm-up + 3 timed steps, no extras",
    )
    parser.add_argument("--sizes", type=_ints, help="image sizes in px, e.g. 256,512 (default 256,512)")
    parser.add_argument("--batches", type=_ints, help="batch sizes, e.g. 1,4 (default 1,4)")
    parser.add_argument(
        "--dtypes", type=_words, help="fp32 and/or the half dtype (bf16 on CPU, fp16 on CUDA); default both"
    )
    parser.add_argument("--steps", type=int, help="timed steps per configuration, at most (default 3)")
    parser.add_argument("--warmup", type=int, help="warm-up steps before timing (default 1, --quick 2)")
    parser.add_argument(
        "--budget",
        type=float,
        default=120.0,
        help="seconds of timed steps per configuration; slow ones get fewer steps (default 120)",
    )
    parser.add_argument(
        "--max-config-minutes",
        type=float,
        default=8.0,
        help="skip configurations estimated to take longer than this (default 8)",
    )
    parser.add_argument(
        "--extras",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also run grad checkpointing (512 px b1 fp32) and uncached latents (256 px b1 "
        "fp32); default on, off with --quick",
    )
    parser.add_argument(
        "--generation",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="measure generation overhead (default on, off with --quick)",
    )
    parser.add_argument("--gen-size", type=int, default=256, help="generation image size (default 256)")
    parser.add_argument("--gen-steps", type=int, default=10, help="generation DDIM steps (default 10)")
    parser.add_argument("--gen-rounds", type=int, default=4, help="timed images per pipeline (default 4)")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also profile the step (fp32, 256 px, b1, cached) and compare it to the floor",
    )
    parser.add_argument("--profile-only", action="store_true", help="only the profile (implies --profile)")
    parser.add_argument(
        "--checkpoint", type=Path, help="benchmark this .safetensors instead of the random one"
    )
    parser.add_argument(
        "--trainer-args",
        type=shlex.split,
        default=[],
        help="extra trainer options for every training row (note the =): "
        "--trainer-args='--max_data_loader_n_workers=0'",
    )
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="environment variable for every measurement process (repeatable), e.g. to try allocator "
        "settings: --env MALLOC_MMAP_THRESHOLD_=1073741824",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="results folder")
    args = parser.parse_args(argv)
    quick = args.quick
    args.sizes = args.sizes or ([256] if quick else [256, 512])
    args.batches = args.batches or ([1] if quick else [1, 4])
    args.steps = args.steps or 3
    args.warmup = args.warmup if args.warmup is not None else (2 if quick else 1)
    args.extras = (not quick) if args.extras is None else args.extras
    args.generation = (not quick) if args.generation is None else args.generation
    args.profile = args.profile or args.profile_only
    if quick:
        args.mode = "quick"
    elif argv == []:
        args.mode = "default"
    else:
        args.mode = "default" if is_default_set(args, parse_args([])) else "custom"
    return args


SET_OPTIONS = (
    *("sizes", "batches", "dtypes", "steps", "warmup", "budget", "max_config_minutes", "extras"),
    *("generation", "gen_size", "gen_steps", "gen_rounds", "checkpoint", "trainer_args", "env"),
)


def is_default_set(args: argparse.Namespace, defaults: argparse.Namespace) -> bool:
    """True when the options that choose what is measured are all at their defaults."""
    return all(getattr(args, name) == getattr(defaults, name) for name in SET_OPTIONS)


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part]


def _words(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


# ---------------------------------------------------------------------------------------------
# running workers


class Runner:
    """Starts ``bench/worker.py`` processes, streams their progress, keeps their logs."""

    def __init__(self, out: Path, extra_env: list[str]):
        self.extra_env = dict(item.split("=", 1) for item in extra_env)
        self.logs = out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.count = 0

    def run(self, kind: str, spec: dict, label: str) -> dict:
        """Run one measurement; ``spec["worker_env"]`` (if any) is added to that process's environment."""
        self.count += 1
        stem = f"{self.count:02d}-{kind}"
        result_path, log_path = self.logs / f"{stem}.json", self.logs / f"{stem}.log"
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONWARNINGS": "ignore",
            **self.extra_env,
            **spec.get("worker_env", {}),
        }
        command = [
            sys.executable,
            "-m",
            "bench.worker",
            kind,
            json.dumps(spec, default=str),
            str(result_path),
        ]
        started = time.perf_counter()
        say(f"[{_clock()}] {label}")
        with log_path.open("w") as log:
            process = subprocess.Popen(
                command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=log, text=True
            )
            for line in process.stdout:
                say(line.rstrip())
            process.wait()
        result = json.loads(result_path.read_text()) if result_path.is_file() else {}
        result.setdefault("spec", spec)
        if process.returncode != 0 and "error" not in result:
            result["error"] = f"worker exited with {process.returncode}"
        if "error" in result:
            say(f"    FAILED: {result['error']} (log: {log_path})")
        say(f"    ({time.perf_counter() - started:.0f} s)")
        return result


def say(text: str) -> None:
    print(text, flush=True)


def _clock() -> str:
    return datetime.datetime.now().strftime("%H:%M:%S")


# ---------------------------------------------------------------------------------------------
# the plan


def training_plan(args, half: str, device: str) -> list[TrainSpec]:
    """Cheapest first: the first row calibrates the time estimates of the others."""
    dtypes = args.dtypes or ["fp32", half]
    for dtype in dtypes:
        if dtype not in ("fp32", half):
            raise SystemExit(f"--dtypes {dtype}: use fp32 or {half} on this device ({device})")
    base = TrainSpec(
        extra_args=args.trainer_args,
        checkpoint="",
        device=device,
        warmup=args.warmup,
        timed=args.steps,
        floor_timed=args.steps + 1,
    )
    plan = [
        replace(base, size=size, batch=batch, dtype=dtype)
        for dtype in dtypes
        for size in sorted(args.sizes)
        for batch in sorted(args.batches)
    ]
    if args.extras and "fp32" in dtypes:
        small, large = min(args.sizes), max(args.sizes)
        plan.insert(1, replace(base, size=small, batch=1, cache_latents=False, floor=False))
        plan.append(replace(base, size=large, batch=1, gradient_checkpointing=True, floor=False))
    order = {"fp32": 0, half: 1}
    plan = sorted(plan, key=lambda s: (order[s.dtype], s.size * s.size * s.batch, s.gradient_checkpointing))
    if args.mode == "default":
        # the fp32 batch-1 rows carry the headline ratios: more samples against the noise (8 for
        # the cheap first row; the budget may cut the larger one)
        for i, spec in enumerate(plan):
            if (spec.dtype, spec.batch, spec.cache_latents, spec.gradient_checkpointing) == (
                "fp32",
                1,
                True,
                False,
            ):
                timed = 8 if i == 0 else 6
                plan[i] = replace(spec, timed=max(spec.timed, timed), floor_timed=max(spec.timed, timed) + 1)
    if (
        args.extras
        and plan
        and plan[0].dtype == "fp32"
        and device == "cpu"
        and sys.platform.startswith("linux")
    ):
        plan.insert(
            1,
            replace(
                plan[0], worker_env=GLIBC_DEFAULT_ALLOCATOR, timed=args.steps, floor_timed=args.steps + 1
            ),
        )
    return plan


def estimate_step(spec: TrainSpec, done: list[dict], probe: dict | None) -> float | None:
    """Seconds per step, scaled from the most similar finished row (pixels x batch, dtype, ckpt)."""
    measured = [
        r
        for r in done
        if "step_median" in r and r["spec"]["cache_latents"] and not r["spec"]["gradient_checkpointing"]
    ]
    if not measured:
        return None

    def similarity(row):
        s = row["spec"]
        return (s["dtype"] == spec.dtype, s["size"] == spec.size, -abs(s["batch"] - spec.batch))

    ref = max(measured, key=similarity)
    s = ref["spec"]
    seconds = ref["step_median"] * (spec.size**2 * spec.batch) / (s["size"] ** 2 * s["batch"])
    if s["dtype"] != spec.dtype and probe and spec.dtype != "fp32":
        seconds *= max(1.0, probe["slowdown_vs_fp32"])
    return seconds * (GRAD_CKPT_FACTOR if spec.gradient_checkpointing else 1.0)


def fit_to_budget(spec: TrainSpec, step: float | None, args) -> tuple[TrainSpec, float | None]:
    """Fewer repetitions for slow configurations; returns the spec and its estimated total seconds."""
    if step is None:
        return spec, None
    timed = max(1, min(max(args.steps, spec.timed), int(args.budget // step)))
    warmup = args.warmup if step < 30 else (1 if step < 60 else 0)
    cheap = step < 10  # cheap rows get a floor warm-up and one floor call more than timed steps
    floor_warmup, floor_timed = (1, timed + 1) if cheap else (0, timed)
    spec = replace(spec, timed=timed, warmup=warmup, floor_warmup=floor_warmup, floor_timed=floor_timed)
    total = (warmup + timed) * step + FIXED_SECONDS
    if spec.floor:
        total += (floor_warmup + floor_timed) * step * FLOOR_FACTOR
    return spec, total


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    half = "fp16" if device == "cuda" else "bf16"
    args.out.mkdir(parents=True, exist_ok=True)
    checkpoint = args.checkpoint or ensure_checkpoint(log=say)
    machine = describe_machine()
    say(
        f"benchmark ({args.mode}) on {device}: {machine['cpu']['model']}, {machine['cpu_count']} cores, "
        f"torch {machine['torch']}; load average {machine['load_average_at_start']}"
    )
    for item in args.env:
        if "=" not in item:
            raise SystemExit(f"--env {item}: use KEY=VALUE")
    runner = Runner(args.out, args.env)
    results: dict = {
        "command": "python -m bench.bench " + " ".join(sys.argv[1:] if argv is None else argv),
        "environment": args.env,
        "mode": args.mode,
        "model": str(checkpoint.name)
        + (" (random weights, SD1.5 architecture)" if not args.checkpoint else ""),
        "checkpoint_gb": checkpoint.stat().st_size / 1e9,
        "machine": machine,
        "device": device,
        "half_dtype": half,
        "training": [],
        "skipped": [],
    }

    if args.profile:
        spec = ProfileSpec(
            checkpoint=str(checkpoint), out_dir=str(args.out), device=device, extra_args=args.trainer_args
        )
        results["profile"] = runner.run("profile", asdict(spec), "profile: fp32, 256 px, b1, cached latents")
    if not args.profile_only:
        results["load"] = runner.run("load", {"checkpoint": str(checkpoint)}, "model load: load_sd_model x 2")
        run_training_plan(args, results, runner, str(checkpoint), half, device)
        if args.generation:
            spec = GenerationSpec(
                checkpoint=str(checkpoint),
                size=args.gen_size,
                steps=args.gen_steps,
                rounds=args.gen_rounds,
                device=device,
            )
            results["generation"] = runner.run(
                "generate", asdict(spec), f"generation: {spec.size} px, {spec.steps} steps, per image"
            )

    results["duration_minutes"] = (time.perf_counter() - started) / 60
    # only the default set replaces the committed RESULTS.md; experiments stay in results/
    write_results(results, args.out, latest=args.mode == "default" and not args.profile_only)
    return 0


def run_training_plan(args, results: dict, runner: Runner, checkpoint: str, half: str, device: str) -> None:
    plan = training_plan(args, half, device)
    if any(spec.dtype == half for spec in plan):
        probe = runner.run("probe", {"device": device}, f"probe: {half} vs fp32 kernels")
        results["half_probe"] = probe if "error" not in probe else None
        if results["half_probe"] and results["half_probe"]["emulated"]:
            say(
                f"    {half} is {probe['slowdown_vs_fp32']:.0f}x slower than fp32 here (no native kernels): "
                f"{half} rows get the fewest repetitions, and rows over "
                f"{args.max_config_minutes:g} min are skipped"
            )
    emulated = bool(results.get("half_probe") and results["half_probe"]["emulated"])
    for i, spec in enumerate(plan, 1):
        spec = replace(spec, checkpoint=checkpoint)
        step = estimate_step(spec, results["training"], results.get("half_probe"))
        spec, total = fit_to_budget(spec, step, args)
        label = f"training {i}/{len(plan)}: {config_name(asdict(spec))}"
        if spec.dtype == half and emulated:
            # one step says enough (and its floor would cost as much again); the probe's kernel ratio
            # is a poor predictor of a whole step, so the first such row always runs
            spec = replace(spec, warmup=0, timed=1, floor=False)
            if not any(r["spec"]["dtype"] == half and "step_median" in r for r in results["training"]):
                label += f" ({half} emulated: 1 step, no floor)"
                results["training"].append(runner.run("train", asdict(spec), label))
                continue
        if total is not None:
            if total > args.max_config_minutes * 60:
                reason = (
                    f"{config_name(asdict(spec))}: estimated {total / 60:.0f} min "
                    f"(~{step:.0f} s/step) > --max-config-minutes {args.max_config_minutes:g}"
                )
                say(f"[{_clock()}] skipped {reason}")
                results["skipped"].append(reason)
                continue
            label += f" (~{step:.1f} s/step, {spec.warmup}+{spec.timed} steps, about {total / 60:.1f} min)"
        results["training"].append(runner.run("train", asdict(spec), label))
    attach_floors(results["training"])


def write_results(results: dict, out: Path, latest: bool = True) -> None:
    """JSON + Markdown into ``out``; the Markdown also becomes bench/RESULTS.md when ``latest``."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    json_path, md_path = out / f"bench-{stamp}.json", out / f"bench-{stamp}.md"
    json_path.write_text(json.dumps(results, indent=1, default=str))
    text = markdown(results)
    md_path.write_text(text)
    if latest:
        RESULTS_MD.write_text(text)
    say("")
    say(text)
    say(f"results: {json_path}\n         {md_path}" + (f"\n         {RESULTS_MD} (latest)" if latest else ""))


if __name__ == "__main__":
    sys.exit(main())
