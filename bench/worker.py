"""One measurement in a fresh process: ``python -m bench.worker KIND SPEC_JSON OUT_JSON``.

A process per configuration keeps measurements independent: memory peaks are not inflated by
an earlier configuration's freed-but-kept allocations, accelerate's process-wide state starts
clean for every ``--mixed_precision``, and a crash costs one row, not the whole run.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def log(message: str) -> None:
    print(message, flush=True)


def main(argv: list[str]) -> int:
    kind, spec_json, out_path = argv
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    spec = json.loads(spec_json)
    try:
        if kind == "train":
            from bench.training import TrainSpec, run_training

            result = run_training(TrainSpec(**spec), log)
        elif kind == "generate":
            from bench.generation import GenerationSpec, run_generation

            result = run_generation(GenerationSpec(**spec), log)
        elif kind == "profile":
            from bench.profiling import ProfileSpec, run_profile

            result = run_profile(ProfileSpec(**spec), log)
        elif kind == "load":
            from bench.training import time_model_load

            result = time_model_load(spec["checkpoint"], spec.get("repeats", 2), log)
        elif kind == "probe":
            from bench.machine import half_precision_probe

            result = half_precision_probe(spec.get("device", "cpu"))
        else:
            raise ValueError(f"unknown kind {kind!r}")
    except Exception as exc:  # the parent reports the failure and carries on with the next row
        traceback.print_exc()
        result = {"error": f"{type(exc).__name__}: {exc}"}
    Path(out_path).write_text(json.dumps(result, indent=1, default=str))
    return 0 if "error" not in result else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
