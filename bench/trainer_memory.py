"""Peak memory of the trainer alone, as a user runs it: ``python -m bench.trainer_memory``.

The issue's comparison with kohya is the peak resident memory of the whole training process on
one command (full-size SD 1.5 single file, 256 px, batch 1, cached latents, 3 steps). The main
benchmark runs the trainer inside a measuring process (floor calls, hooks), which adds memory of
its own; this one starts the plain command line and reads the kernel's peak for it.

The peak comes from ``RUSAGE_CHILDREN`` of a small launcher process: a child started by fork +
exec reports at least the RSS its parent had at the fork, so the launcher must be tiny (the
benchmark parent that built the 2 GB checkpoint is not).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.checkpoint import ensure_checkpoint
from bench.machine import describe_machine
from bench.training import TrainSpec, make_dataset, tmp_root, trainer_argv

ROOT = Path(__file__).resolve().parent.parent
KOHYA_FP32_PEAK_GB = 7.17  # kohya's train_textual_inversion.py, same file and command (issue 15)

# Runs argv[1:] and prints the child's peak RSS in bytes; small, so the child's figure is its own.
LAUNCHER = """
import resource, subprocess, sys
code = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
if code.returncode:
    sys.stderr.write(code.stderr[-3000:])
    sys.exit(code.returncode)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)
"""

RUNS = {  # TrainSpec fields of each run; the rest is the main benchmark's plain kohya command line
    "fp32": {},
    "fp32 --gradient_checkpointing": {"gradient_checkpointing": True},
    "fp32 --highvram": {"extra_args": ["--highvram"]},  # frozen weights kept in fp32: speed over memory
    "--mixed_precision bf16": {"dtype": "bf16"},
}


def trainer_command(checkpoint: Path, data: Path, out: Path, run: dict) -> list[str]:
    """The issue's command: 256 px, batch 1, cached latents, 3 steps, one vector."""
    spec = TrainSpec(str(checkpoint), num_vectors=1, warmup=0, timed=3, **run)
    return [sys.executable, str(ROOT / "train_textual_inversion.py"), *trainer_argv(spec, data, out)]


def peak_rss_bytes(command: list[str]) -> int:
    """The peak resident memory of ``command``'s process, through the small launcher."""
    result = subprocess.run(
        [sys.executable, "-c", LAUNCHER, *command], capture_output=True, text=True, cwd=ROOT
    )
    if result.returncode:
        raise RuntimeError(f"the measured command failed:\n{result.stderr}")
    return int(result.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, help="measure this .safetensors instead of the random one")
    parser.add_argument("--runs", nargs="+", choices=list(RUNS), default=list(RUNS))
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    checkpoint = args.checkpoint or ensure_checkpoint()
    work = Path(tempfile.mkdtemp(prefix="memory-", dir=tmp_root()))
    data = make_dataset(work / "data", 256, images=4, repeats=1)
    machine = describe_machine()
    cpu = machine["cpu"]
    print(
        f"{machine['date']}  {cpu['model']} ({', '.join(cpu['flags']) or 'no AVX512-BF16/AMX'})  torch {machine['torch']}"
    )
    print("| run | peak RSS | × kohya fp32 (7.17 GB) |\n|---|---|---|")
    figures = {}
    for name in args.runs:
        peak = peak_rss_bytes(trainer_command(checkpoint, data, work / "out", RUNS[name]))
        figures[name] = peak
        print(f"| {name} | {peak / 1e9:.2f} GB | {peak / 1e9 / KOHYA_FP32_PEAK_GB:.2f} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "peak_rss_bytes": figures}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
