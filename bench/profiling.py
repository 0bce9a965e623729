"""Where a training step's time goes beyond the floor (``bench.py --profile``).

The trainer's ``main()`` runs under ``torch.profiler`` with operator input shapes. The optimizer
post-step hook advances the profiler's schedule, so only steady-state steps are recorded, and
right after each recorded step it runs the floor (the trainer's own UNet: forward + backward
to the conditioning) inside a ``bench.floor`` range. Step and floor thus share the recording
window and the machine's load at that moment; every operator event is then counted as floor
(inside a ``bench.floor`` range) or step (outside), and the per-operator difference per step is
the list of what the trainer adds beyond the floor.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.profiler import ProfilerActivity, profile, record_function, schedule

from bench.training import SeenModels, TrainSpec, floor_call, make_dataset, tmp_root, trainer_argv

FLOOR_RANGE = "bench.floor"


@dataclass
class ProfileSpec:
    checkpoint: str
    out_dir: str
    size: int = 256
    batch: int = 1
    dtype: str = "fp32"
    cache_latents: bool = True
    warmup: int = 2
    active: int = 2
    device: str = "cpu"
    extra_args: list[str] = field(default_factory=list)


def run_profile(spec: ProfileSpec, log=print) -> dict:
    import train_textual_inversion

    out_dir = Path(spec.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train = TrainSpec(
        checkpoint=spec.checkpoint,
        size=spec.size,
        batch=spec.batch,
        dtype=spec.dtype,
        cache_latents=spec.cache_latents,
        warmup=spec.warmup,
        timed=spec.active,
        device=spec.device,
        extra_args=spec.extra_args,
    )
    work = Path(tempfile.mkdtemp(prefix="profile-", dir=tmp_root()))
    seen = SeenModels()
    ends: list[float] = []
    # profiler step i = training step i + 1; the first `warmup` steps (and setup) are not recorded
    plan = schedule(wait=spec.warmup - 1, warmup=1, active=spec.active, repeat=1)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if spec.device == "cuda" else [])
    try:
        data = make_dataset(work / "data", spec.size, images=spec.batch, repeats=train.warmup + train.timed)
        with profile(activities=activities, schedule=plan, record_shapes=True) as prof:

            def on_step(optimizer, args, kwargs):
                ends.append(time.perf_counter())
                if len(ends) > spec.warmup and seen.complete:
                    with record_function(FLOOR_RANGE):
                        floor_call(seen, torch.device(spec.device))()
                prof.step()

            hooks = seen.install() + [register_optimizer_step_post_hook(on_step)]
            try:
                train_textual_inversion.main(trainer_argv(train, data, work / "out"))
            finally:
                for hook in hooks:
                    hook.remove()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    step_ops, floor_ops = split_by_floor(prof.events(), by_shape=False)
    step_shapes, floor_shapes = split_by_floor(prof.events(), by_shape=True)
    per_step = {k: v / spec.active for k, v in step_ops.items()}
    per_floor = {k: v / spec.active for k, v in floor_ops.items()}
    extra_rows = differences(per_step, per_floor, 0.002)
    shape_rows = differences(
        {k: v / spec.active for k, v in step_shapes.items()},
        {k: v / spec.active for k, v in floor_shapes.items()},
        0.004,
    )[:30]
    step_self, floor_self = sum(per_step.values()), sum(per_floor.values())
    report = [
        f"# Profile: {spec.size} px, batch {spec.batch}, {spec.dtype}, cached latents={spec.cache_latents}",
        f"{spec.active} trainer steps, each followed by one floor call, in one recording window.",
        f"self CPU time per step: {step_self:.3f} s; per floor call: {floor_self:.3f} s; ratio "
        f"{step_self / floor_self:.3f}",
        "",
        "## Step minus floor, per step, by operator (seconds of self CPU time)",
        *format_rows(extra_rows),
        "",
        "## Step minus floor, per step, by operator and input shapes (largest)",
        *format_rows(shape_rows, width=120),
        "",
        "## Everything recorded (steps and floor calls)",
        prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40),
    ]
    path = out_dir / f"profile-{spec.size}px-b{spec.batch}-{spec.dtype}.txt"
    path.write_text("\n".join(report))
    durations = [b - a for a, b in zip(ends, ends[1:])]
    log(f"    step self CPU {step_self:.2f} s, floor {floor_self:.2f} s; report: {path}")
    return {
        "spec": asdict(spec),
        "report": str(path),
        "step_intervals_seconds": durations,
        "step_self_cpu_seconds": step_self,
        "floor_self_cpu_seconds": floor_self,
        "extra_by_op": extra_rows[:40],
        "extra_by_op_and_shape": shape_rows,
    }


def split_by_floor(events, by_shape: bool) -> tuple[dict[str, float], dict[str, float]]:
    """Self CPU seconds per operator, (outside, inside) the ``bench.floor`` ranges."""
    floors = [(e.time_range.start, e.time_range.end) for e in events if e.name == FLOOR_RANGE]
    outside: dict[str, float] = defaultdict(float)
    inside: dict[str, float] = defaultdict(float)
    for event in events:
        if event.name == FLOOR_RANGE or event.name.startswith("ProfilerStep"):
            continue
        key = f"{event.name} {event.input_shapes}" if by_shape else event.name
        start = event.time_range.start
        target = inside if any(a <= start <= b for a, b in floors) else outside
        target[key] += event.self_cpu_time_total / 1e6
    return outside, inside


def differences(step: dict[str, float], floor: dict[str, float], limit: float) -> list[dict]:
    rows = [
        {"op": k, "step_s": step.get(k, 0.0), "floor_s": floor.get(k, 0.0)} for k in set(step) | set(floor)
    ]
    for row in rows:
        row["extra_s"] = row["step_s"] - row["floor_s"]
    return sorted((r for r in rows if abs(r["extra_s"]) >= limit), key=lambda r: -r["extra_s"])


def format_rows(rows: list[dict], width: int = 60) -> list[str]:
    return [f"{'operator':{width}s} {'step':>8s} {'floor':>8s} {'extra':>8s}"] + [
        f"{r['op'][:width]:{width}s} {r['step_s']:8.3f} {r['floor_s']:8.3f} {r['extra_s']:8.3f}" for r in rows
    ]
