"""Run a trainer's command line as a user does, and read from outside what it costs.

The command runs under a small launcher process (as in ``bench.trainer_memory``: a child started
by fork + exec reports at least the RSS its parent had, so the parent must be tiny), which reads
the child's peak resident memory from the kernel, samples it every 0.2 s, and stamps the child's
stderr with the wall clock as it arrives. The steps are timed by when the progress bar first
shows them done (tqdm, in our trainers and kohya's): the time between two counts seen on the bar
leaves out start-up, loading, caching and the final save, which timing whole runs does not (two
runs' start-ups differ by seconds from one run to the next here).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

# Runs argv[1:] and prints, as JSON: its exit code, its peak RSS from the kernel, its RSS sampled
# every 0.2 s and its stderr in timestamped pieces.
LAUNCHER = """
import json, resource, subprocess, sys, threading, time
child = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
start, samples, pieces = time.time(), [], []
def sample():
    while child.poll() is None:
        try:
            with open(f"/proc/{child.pid}/status") as status:
                rss = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))
            samples.append((time.time() - start, rss))
        except (OSError, StopIteration):
            pass
        time.sleep(0.2)
threading.Thread(target=sample, daemon=True).start()
for piece in iter(lambda: child.stderr.read1(65536), b""):
    pieces.append((time.time() - start, piece.decode(errors="replace")))
code = child.wait()
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
print(json.dumps({"code": code, "peak": peak, "samples": samples, "pieces": pieces}))
"""


def step_times(pieces: list[tuple[float, str]], steps: int) -> dict[int, float]:
    """When the progress bar of ``steps`` steps first showed each count it showed (seconds from
    the start). tqdm redraws at most every 0.1 s, so short steps skip counts; the wall clock of
    the pieces times them, not tqdm's smoothed rate, which weighs the first steps in."""
    done: dict[int, float] = {}
    for seconds, text in pieces:
        for count, total in re.findall(r"(\d+)/(\d+) \[", text):
            if int(total) == steps:
                done.setdefault(int(count), seconds)
    return done


def warm_count(done: dict[int, float], warmup: int) -> int | None:
    """The first count the bar showed at or past ``warmup``: where the timed steps begin."""
    return min((count for count in done if count >= warmup), default=None)


def seconds_per_step(done: dict[int, float], steps: int, warmup: int) -> float | None:
    """Seconds per step from the first count at or past ``warmup`` to the last step; None when the
    bar did not show both."""
    first = warm_count(done, warmup)
    if first is None or steps not in done or first == steps:
        return None
    return (done[steps] - done[first]) / (steps - first)


def measure(command: list[str], cwd: Path, steps: int, warmup: int = 1) -> dict:
    """Peak RSS (bytes: the whole run, and from the end of the warm-up on), seconds per step past
    the first ``warmup`` steps, and the wall time of ``command``, a run of ``steps`` steps; or
    ``{"error": the end of its stderr}``."""
    result = subprocess.run(
        [sys.executable, "-c", LAUNCHER, *command],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
    )
    report = json.loads(result.stdout.strip().splitlines()[-1]) if result.stdout.strip() else {}
    stderr = "".join(text for _, text in report.get("pieces", [])) or result.stderr
    if result.returncode or report.get("code"):
        return {"error": stderr[-2000:]}
    done = step_times(report["pieces"], steps)
    per_step = seconds_per_step(done, steps, warmup)
    if per_step is None:
        return {"error": "no training progress bar in the output:\n" + stderr[-1000:]}
    warm = done[warm_count(done, warmup)]
    return {
        "peak_rss_bytes": report["peak"],
        "steps_peak_rss_bytes": max(
            (rss for seconds, rss in report["samples"] if seconds >= warm), default=None
        ),
        "seconds_per_step": per_step,
        "wall_seconds": report["samples"][-1][0] if report["samples"] else None,
    }
