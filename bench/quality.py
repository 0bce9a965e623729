"""How fast and how well Textual Inversion learns, measured on the small real model in models/.

    python -m bench.quality                     # every variant below, ~25 min on 2 CPU cores
    python -m bench.quality --variants default  # the default settings only, ~2 min
    python -m bench.quality --from-json A.json B.json  # QUALITY.md from runs made side by side
    python -m bench.quality --suite hard [--quick]     # the hard suite (bench/hard_suite.py)

Each variant trains the demo's concept (8 pictures of the heart the model knows only as ``dax``,
captioned ``a <colour> myshape``) with the real CLI, saving every ``--early-every`` steps up to
``--early-until`` (where learning happens on this model) and every ``--every`` steps after, and judges
each save with the concept evaluation (``tools/concept_eval.py``): concept and colour accuracy,
and for the default settings the first step that reaches 90 % concept accuracy and the time to
it. Variants with validation also report where early stopping ended the run and how the best
checkpoint compares with the last. Results: ``bench/results/quality-*.json`` and a Markdown table
(``bench/QUALITY.md``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from safetensors import safe_open

from bench.machine import describe_machine
from library.embeddings.formats import load_embedding_file
from tools.concept_eval import SHAPES_MODEL, evaluate_embedding
from tools.demo import TRAIN_OPTIONS, WORD, draw_training_pictures

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / ".cache" / "quality"
RESULTS = ROOT / "bench" / "results"
QUALITY_MD = ROOT / "bench" / "QUALITY.md"
TARGET = 0.9

# name: (extra options, steps); the demo's options are the base (library defaults elsewhere)
VARIANTS: dict[str, tuple[list[str], int]] = {
    "default": ([], 150),
    "early stopping": (["--early_stopping", "--early_stopping_window=40"], 300),
    "300 steps": ([], 300),
    "preserve norm": (["--preserve_embedding_norm"], 150),
    "lr 1e-3": (["--learning_rate=1e-3"], 300),
    "lr 2e-2": (["--learning_rate=2e-2"], 150),
    "2 vectors": (["--num_vectors_per_token=2"], 150),
    "init cycle": (["--init_word=shape ring", "--num_vectors_per_token=3", "--init_word_mode=cycle"], 150),
    "init spread": (["--init_word=shape ring", "--num_vectors_per_token=3", "--init_word_mode=spread"], 150),
    "init mean": (["--init_word=shape ring", "--num_vectors_per_token=3", "--init_word_mode=mean"], 150),
}


def options_for(extra: list[str], steps: int, every: int, out: Path, data: Path) -> list[str]:
    replaced = {o.split("=", 1)[0] for o in extra}
    base = [
        o
        for o in TRAIN_OPTIONS
        if o.split("=", 1)[0] not in replaced | {"--max_train_steps", "--output_dir", "--train_data_dir"}
    ]
    return [
        *base,
        *extra,
        f"--max_train_steps={steps}",
        f"--save_every_n_steps={every}",
        f"--output_dir={out}",
        f"--train_data_dir={data}",
    ]


def init_word_of(extra: list[str]) -> str:
    """The variant's init word (the demo's unless it sets its own): the baseline to judge against."""
    given = [o.split("=", 1)[1] for o in [*TRAIN_OPTIONS, *extra] if o.startswith("--init_word=")]
    return given[-1]


def saved_step(path: Path, final_step: int) -> int:
    """The step a save holds: in its name, in the best file's metadata, else the run's last."""
    if "-step" in path.name:
        return int(re.search(r"step(\d+)", path.name).group(1))
    with safe_open(str(path), "pt") as f:
        return int((f.metadata() or {}).get("ti_trainer.step", final_step))


def max_norm(path: Path) -> float:
    """The largest vector norm in an embedding file (editability: far above a token's, the word drowns the rest)."""
    return float(load_embedding_file(path).vectors.float().norm(dim=1).max())


def judged_steps(steps: int, every: int, early_every: int, early_until: int) -> set[int]:
    """Dense where learning happens (the first ``early_until`` steps), sparse after."""
    return {s for s in range(1, steps + 1) if (s <= early_until and s % early_every == 0) or s % every == 0}


def run_variant(name: str, extra: list[str], steps: int, judged: set[int], images: int, data: Path) -> dict:
    out = WORK / re.sub(r"\W+", "-", name)
    every = math.gcd(*judged) if judged else steps
    command = [sys.executable, "train_textual_inversion.py", *options_for(extra, steps, every, out, data)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    started = time.time()
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.time() - started
    if result.returncode != 0:
        raise RuntimeError(f"{name}: the trainer failed:\n{result.stderr[-3000:]}")
    stopped = re.search(r"early stopping at step (\d+)", result.stderr)
    final_step = int(stopped.group(1)) if stopped else steps
    saves = [p for p in sorted(out.glob(f"{WORD}-step*.safetensors")) if saved_step(p, final_step) in judged]
    rows = []
    baseline = None  # the init word's score, the same for every save of the run
    for path in [*saves, out / f"{WORD}.safetensors", out / f"{WORD}-best.safetensors"]:
        if not path.is_file():
            continue
        report, _, _ = evaluate_embedding(
            SHAPES_MODEL, path, WORD, init_word=init_word_of(extra), images=images, init_baseline=baseline
        )
        baseline = report.init_word
        rows.append(
            {
                "file": path.name,
                "step": saved_step(path, final_step),
                "concept": report.concept,
                "init_word": report.init_word,
                "color": report.color,
                "max_norm": max_norm(path),
            }
        )
        print(f"  {name}: {path.name}: {report.line(None)}", flush=True)
    first = next((r for r in rows if r["file"].startswith(f"{WORD}-step") and r["concept"] >= TARGET), None)
    # the save's own write time: start-up and model load included, as a user waits for it
    to_target = (out / first["file"]).stat().st_mtime - started if first else None
    return {
        "name": name,
        "options": extra,
        "steps": steps,
        "stopped_at": int(stopped.group(1)) if stopped else None,
        "train_seconds": seconds,
        "seconds_per_step": seconds / final_step,
        "first_step_at_target": first["step"] if first else None,
        "seconds_to_target": to_target,
        "rows": rows,
    }


def token_norms() -> tuple[float, float]:
    """The init word's norm and the vocabulary's mean row norm in the shapes model: what a vector's norm compares to."""
    from library.models.loading import load_sd_model
    from tools.shapes import GENERIC_WORD

    model = load_sd_model(SHAPES_MODEL)
    table = model.text_encoder.get_input_embeddings().weight.detach().float()
    (word_id,) = model.tokenizer(GENERIC_WORD, add_special_tokens=False).input_ids
    return float(table[word_id].norm()), float(table.norm(dim=1).mean())


def markdown(results: list[dict], machine: dict, images: int, norms: tuple[float, float]) -> str:
    lines = [
        "# Quality on the small real model",
        "",
        f"Measured {time.strftime('%Y-%m-%d')} on {machine['cpu']['model']} ({os.cpu_count()} cores; "
        f"flags: {', '.join(machine['cpu']['flags']) or 'none of note'}), "
        f"torch {machine['torch']}; {images} + {images} pictures judged per embedding "
        "(`tools/concept_eval.py`). Time to 90 %: from the trainer's start (model load included) to "
        "the save that first reached it. "
        f"Norms: the init word `shape` {norms[0]:.2f}, the vocabulary's mean row {norms[1]:.2f}.",
        "",
        "| variant | options | stopped at | steps to 90 % concept | time to 90 % | last: concept / color / max norm | "
        "best: step, concept / color |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        last = next((x for x in r["rows"] if x["file"] == f"{WORD}.safetensors"), None)
        best = next((x for x in r["rows"] if x["file"] == f"{WORD}-best.safetensors"), None)
        first = r["first_step_at_target"]
        seconds = r.get("seconds_to_target")
        if seconds is None and first is not None:  # older results: the run's average pace
            seconds = first * r["seconds_per_step"]
        to_target = "—" if first is None else f"{seconds:.0f} s"
        lines.append(
            f"| {r['name']} | `{' '.join(r['options']) or 'demo settings'}` | {r['stopped_at'] or '—'} "
            f"| {first or 'not reached'} | {to_target} "
            f"| {_pct(last, 'concept')} / {_pct(last, 'color')} / {_norm(last)} "
            f"| {'—' if best is None else str(best['step']) + ', ' + _pct(best, 'concept') + ' / ' + _pct(best, 'color')} |"
        )
    lines += ["", "Concept accuracy by step (saves every few steps):", ""]
    for r in results:
        curve = ", ".join(
            f"{x['step']}: {100 * x['concept']:.0f}%" for x in r["rows"] if "-step" in x["file"]
        )
        lines.append(f"- {r['name']}: {curve}")
    return "\n".join(lines) + "\n"


def _norm(row: dict | None) -> str:
    return "—" if row is None else f"{row['max_norm']:.2f}"


def _pct(row: dict | None, key: str) -> str:
    return "—" if row is None else f"{100 * row[key]:.0f}%"


HARD_SECTION = "## Hard suite"


def write_demo_section(text: str) -> None:
    """QUALITY.md's demo tables, keeping the hard suite's section after them."""
    old = QUALITY_MD.read_text() if QUALITY_MD.exists() else ""
    hard = HARD_SECTION + old.split(HARD_SECTION, 1)[1] if HARD_SECTION in old else ""
    QUALITY_MD.write_text(f"{text.rstrip()}\n\n{hard}" if hard else text)


def run_hard_suite(args: argparse.Namespace) -> None:
    """The hard suite; its table replaces the hard-suite section of QUALITY.md, its last line is the
    recommendation against kohya's example settings on the entangled pictures."""
    from bench import hard_suite

    if args.from_json:
        summaries, machine, reference, plan = hard_suite.summaries_from_json(args.from_json)
        saved = args.from_json[-1]
    else:
        plan = hard_suite.plan_for(args.quick, args.cases, args.methods, args.seeds, args.images)
        trials, summaries, reference = hard_suite.run_suite(plan)
        machine = describe_machine()
        saved = hard_suite.save_results(trials, summaries, plan, machine, reference)
    section = hard_suite.markdown(summaries, plan, machine, reference)
    if not args.quick:
        before = QUALITY_MD.read_text().split(HARD_SECTION)[0].rstrip() if QUALITY_MD.exists() else ""
        QUALITY_MD.write_text(f"{before}\n\n{section}")
    print(f"\n{section}\nresults: {saved}")
    line = hard_suite.final_line(summaries)
    if line:
        print(line, flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names (default: all)")
    parser.add_argument("--every", type=int, default=25, help="judge a save every N steps")
    parser.add_argument("--early-every", type=int, default=5, help="... but every N steps at the start")
    parser.add_argument("--early-until", type=int, default=50, help="the start: up to this step")
    parser.add_argument(
        "--images", type=int, help="pictures per word and embedding (default 32; hard suite: per kind, 24)"
    )
    parser.add_argument(
        "--from-json",
        nargs="+",
        type=Path,
        metavar="FILE",
        help="write bench/QUALITY.md from these earlier results (e.g. two runs of different "
        "--variants side by side, one core each) instead of training",
    )
    parser.add_argument("--suite", choices=["demo", "hard"], default="demo", help="demo (above) or hard")
    parser.add_argument("--quick", action="store_true", help="hard suite: one seed, one case, two methods")
    parser.add_argument("--cases", help="hard suite: comma-separated case names (default: all)")
    parser.add_argument("--methods", help="hard suite: comma-separated method names (default: all)")
    parser.add_argument("--seeds", type=int, help="hard suite: training seeds 1..N (default 3; --quick 1)")
    args = parser.parse_args(argv)
    if args.suite == "hard":
        run_hard_suite(args)
        return
    args.images = args.images or 32
    if args.from_json:
        runs = [json.loads(path.read_text()) for path in args.from_json]
        by_name = {}  # a later run of the same variant replaces the earlier one
        for run in runs:
            by_name.update({r["name"]: r for r in run["results"]})
        results = list(by_name.values())
        write_demo_section(
            markdown(results, runs[0]["machine"], runs[0].get("images", args.images), token_norms())
        )
        print(QUALITY_MD.read_text())
        return
    data = WORK / "data"
    draw_training_pictures(data / f"1_{WORD}")
    results = []
    for name in args.variants.split(","):
        extra, steps = VARIANTS[name]
        print(f"{name}: {' '.join(extra)} ({steps} steps)", flush=True)
        judged = judged_steps(steps, args.every, args.early_every, args.early_until)
        results.append(run_variant(name, extra, steps, judged, args.images, data))
    machine = describe_machine()
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (RESULTS / f"quality-{stamp}.json").write_text(
        json.dumps({"machine": machine, "images": args.images, "results": results}, indent=1)
    )
    write_demo_section(markdown(results, machine, args.images, token_norms()))
    print(QUALITY_MD.read_text())


if __name__ == "__main__":
    main()
