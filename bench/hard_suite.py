"""The hard suite: cases where Textual Inversion fails as it does on real pictures, and the methods
that are meant to help, measured on the small real model.

    python -m bench.quality --suite hard           # every case, 3 methods, 3 seeds (an hour on 2 cores)
    python -m bench.quality --suite hard --quick   # one seed, one case, two methods (2 minutes)

Run halves side by side with ``--cases`` (and ``OMP_NUM_THREADS=1``: half an hour on 2 cores) and
merge their results with ``--from-json``.

On the demo's concept every setting reaches the judge's ceiling, so nothing can be compared
there. Here:

* **entangled**: every training picture is a purple heart on black, captioned only ``a myshape``.
  The word can learn "purple, on black" as well as "heart", and then ``a red myshape`` stays
  purple;
* **entangled captioned**: the same pictures captioned ``a purple myshape on a black background``
  (the data-side remedy, on which the recommendation is compared with kohya's example settings);
* **misleading init**: the demo's pictures, but the vectors start from ``ring``, another shape;
* **overfit**: the demo's pictures with many vectors, a high learning rate and a long run.

Each method trains through the real CLI with several training seeds and saves at fixed steps; each
judged save gets ``tools.concept_eval.evaluate_edits``: concept (plain prompts), colour
editability (a heart in the asked colour, in the colours the base model draws reliably) and
background editability. A method reaches the target at the first judged step from which the
mean over seeds has concept and colour both >= 90 % at every later save: a word that is right
at step 20 and purple by step 40 has not reached it, because a user does not stop at step 20.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from tools import shapes
from tools.concept_eval import SHAPES_MODEL, evaluate_edits
from tools.demo import WORD, draw_training_pictures, run_offline, varied_command

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / ".cache" / "quality-hard"
TARGET = 0.9


def draw_entangled_pictures(folder: Path, count: int = 8, seed: int = 1, caption: str = f"a {WORD}") -> None:
    """``count`` purple hearts on black, each captioned ``caption`` (by default only ``a WORD``)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        scene = shapes.random_scene(rng, shape=shapes.CONCEPT_SHAPE, color="purple", background="black")
        shapes.render(scene).save(folder / f"{i:02d}.png")
        (folder / f"{i:02d}.txt").write_text(caption)


def draw_captioned_entangled_pictures(folder: Path) -> None:
    """The entangled pictures with captions that name what they share: the data-side remedy."""
    draw_entangled_pictures(folder, caption=f"a purple {WORD} on a black background")


@dataclass(frozen=True)
class Case:
    name: str
    draw: Callable[[Path], None]  # the training pictures into a kohya folder
    options: tuple[str, ...] = ()  # what the case changes in every method's command
    steps: int | None = None  # every method's run length in this case (default: the method's)


CASES = {
    "entangled": Case("entangled", draw_entangled_pictures),
    "entangled captioned": Case("entangled captioned", draw_captioned_entangled_pictures),
    "misleading init": Case("misleading init", draw_training_pictures, ("--init_word=ring",)),
    "overfit": Case(
        "overfit", draw_training_pictures, ("--num_vectors_per_token=4", "--learning_rate=2e-2"), steps=400
    ),
}


@dataclass(frozen=True)
class Method:
    name: str
    options: tuple[str, ...]
    steps: int  # the longest run; saves are judged at JUDGED_STEPS up to it


# kohya's documented example (docs/train_ti_README: 4 vectors, learning rate 1e-4, 1,600 steps at
# batch 1); here at the demo's batch of 8, so 400 steps see twice its pictures
KOHYA_EXAMPLE = Method("kohya example", ("--learning_rate=1e-4", "--num_vectors_per_token=4"), 400)
DEFAULT = Method("default", (), 160)
RECOMMENDED = Method("recommended", ("--direction_only",), 160)
# The recommendation is options and captions: on the entangled pictures no option kept colour
# editable (docs/quality.md), captions naming what every picture shares did; kohya's example
# settings are compared on the same captioned pictures.
RECOMMENDED_CASE = "entangled captioned"
METHODS = {
    m.name: m
    for m in (
        DEFAULT,
        KOHYA_EXAMPLE,
        RECOMMENDED,
        Method("kohya example 800 steps", KOHYA_EXAMPLE.options, 800),  # does it get there later?
        Method("preserve norm", ("--preserve_embedding_norm",), 160),
        Method("direction only at init norm", ("--direction_only", "--direction_norm=init"), 160),
        Method("cross init", ("--cross_init",), 160),
        Method("cross init + pull", ("--cross_init", "--init_pull=1"), 160),
        Method("cross init + direction", ("--cross_init", "--direction_only"), 160),
        Method("pull 0.01", ("--init_pull=0.01",), 160),
        Method("pull 0.001", ("--init_pull=0.001",), 160),
    )
}
JUDGED_STEPS = (10, 20, 40, 80, 160, 400, 800)


@dataclass(frozen=True)
class SuitePlan:
    cases: tuple[str, ...]
    methods: tuple[str, ...]
    seeds: tuple[int, ...]
    images: int  # pictures per kind (concept, colour, background) and judged save
    steps_cap: int | None = None  # --quick: shorter runs


# every case with today's default, kohya's example and the recommendation; other methods with --methods
FULL = SuitePlan(
    ("entangled", "misleading init", "overfit", "entangled captioned"),
    ("default", "kohya example", "recommended"),
    (1, 2, 3),
    12,
)
QUICK = SuitePlan((RECOMMENDED_CASE,), ("recommended", "kohya example"), (1,), 12, steps_cap=160)


def merged_options(case: Case, method: Method) -> list[str]:
    """The case's options with the method's replacing any of the same name (as argparse reads them)."""
    by_name = {o.split("=", 1)[0]: o for o in [*case.options, *method.options]}
    return list(by_name.values())


def command(case: Case, method: Method, steps: int, seed: int, data: Path, out: Path) -> list[str]:
    """The demo's command with the case's and the method's options (theirs win), saving at every
    judged step."""
    extra = merged_options(case, method)
    return varied_command(extra, steps=steps, save_every=10, seed=seed, data=data, out=out)


@dataclass
class Trial:
    """One (case, method, seed): judged saves by step."""

    case: str
    method: str
    seed: int
    seconds: float
    judged: dict[int, dict[str, float]] = field(default_factory=dict)


def run_trial(case: Case, method: Method, seed: int, plan: SuitePlan) -> Trial:
    from library.embeddings.install import install_embeddings
    from library.models.loading import load_sd_model

    tag = re.sub(r"\W+", "-", f"{case.name}-{method.name}-{seed}")
    data = WORK / re.sub(r"\W+", "-", case.name) / "data"
    if not data.is_dir():
        case.draw(data / f"1_{WORD}")
    out = WORK / "runs" / tag
    steps = case.steps or method.steps
    steps = min(steps, plan.steps_cap or steps)
    trial = Trial(
        case.name, method.name, seed, run_offline(command(case, method, steps, seed, data, out), tag)
    )
    model = load_sd_model(SHAPES_MODEL)  # its own: each save's word is added to the tokenizer
    judged = [s for s in JUDGED_STEPS if s <= steps]
    for step in judged:
        path = out / f"{WORD}-step{step:08d}.safetensors"
        if step == steps:
            path = out / f"{WORD}.safetensors"
        word = f"{WORD}{step}"  # a fresh word per save: the model's tokenizer keeps what was installed
        installed = install_embeddings(model, [path], [word])
        report = evaluate_edits(model, installed, word, plan.images)
        trial.judged[step] = {
            "concept": report.concept,
            "color": report.color,
            "background": report.background,
        }
        print(f"  {tag} step {step}: {report}", flush=True)
    return trial


@dataclass(frozen=True)
class Summary:
    """A method on a case, over seeds: the first step from which the target holds at every later
    judged save to the run's end (else the last step) with the mean and spread (population standard deviation over seeds) of each figure there, and
    the means at the last step (does the word stay editable if the run goes on?)."""

    case: str
    method: str
    at_step: int
    reached: bool
    means: dict[str, float]
    spreads: dict[str, float]
    last_step: int
    last: dict[str, float]
    curve: dict[int, tuple[float, float, float]]  # step: (concept, colour, background) means


def summarise(trials: list[Trial]) -> Summary:
    steps = sorted(set.intersection(*(set(t.judged) for t in trials)))
    keys = ("concept", "color", "background")

    def means_at(step: int) -> dict[str, float]:
        return {k: statistics.mean(t.judged[step][k] for t in trials) for k in keys}

    curve = {s: tuple(means_at(s).values()) for s in steps}
    on_target = {s: curve[s][0] >= TARGET and curve[s][1] >= TARGET for s in steps}
    reached = [s for s in steps if all(on_target[t] for t in steps if t >= s)]  # and held to the end
    at = reached[0] if reached else steps[-1]
    return Summary(
        case=trials[0].case,
        method=trials[0].method,
        at_step=at,
        reached=bool(reached),
        means=means_at(at),
        spreads={k: statistics.pstdev(t.judged[at][k] for t in trials) for k in keys},
        last_step=steps[-1],
        last=means_at(steps[-1]),
        curve=curve,
    )


def run_suite(plan: SuitePlan) -> tuple[list[Trial], list[Summary], dict]:
    from library.models.loading import load_sd_model

    model = load_sd_model(SHAPES_MODEL)
    reference = evaluate_edits(model, None, shapes.CONCEPT_WORD, plan.images)  # the base model's own word
    print(f"the base model's word {shapes.CONCEPT_WORD!r}: {reference}", flush=True)
    trials, summaries = [], []
    for case_name in plan.cases:
        for method_name in plan.methods:
            mine = [run_trial(CASES[case_name], METHODS[method_name], seed, plan) for seed in plan.seeds]
            trials += mine
            summaries.append(summarise(mine))
            print(f"{case_name} / {method_name}: {line_part(summaries[-1])}", flush=True)
    return trials, summaries, vars(reference)


def line_part(s: Summary) -> str:
    return (
        f"concept {100 * s.means['concept']:.0f}% color {100 * s.means['color']:.0f}% "
        f"background {100 * s.means['background']:.0f}% at {s.at_step} steps"
    )


def final_line(summaries: list[Summary]) -> str | None:
    """The recommendation on the entangled pictures against kohya's example settings (None: not run)."""
    by = {(s.case, s.method): s for s in summaries}
    ours, kohya = by.get((RECOMMENDED_CASE, RECOMMENDED.name)), by.get((RECOMMENDED_CASE, KOHYA_EXAMPLE.name))
    if ours is None or kohya is None:
        return None
    return f"hard: {line_part(ours)} (kohya example: {line_part(kohya)})"


def markdown(summaries: list[Summary], plan: SuitePlan, machine: dict, reference: dict) -> str:
    lines = [
        "## Hard suite",
        "",
        f"`python -m bench.quality --suite hard{' --quick' if plan.steps_cap else ''}`, measured "
        f"{time.strftime('%Y-%m-%d')} on {machine['cpu']['model']} ({os.cpu_count()} cores), torch "
        f"{machine['torch']}; training seeds {', '.join(map(str, plan.seeds))}; {plan.images} pictures "
        "per kind and judged save. Figures are means over seeds (± the spread between seeds) at the "
        "first judged step from which concept and colour stay >= 90 % to the end of the run, or at "
        "the last step if never; "
        "then the means at the last step. Colour: a heart in the asked colour (red, blue, yellow, "
        "orange). Background: a heart on the asked background (white, gray, black); the base "
        f"model's own word `{shapes.CONCEPT_WORD}` gets "
        f"{100 * reference['background']:.0f}% (concept {100 * reference['concept']:.0f}%, colour "
        f"{100 * reference['color']:.0f}%), so backgrounds are reported, not targeted.",
        "",
        "| case | method | options | target reached at | concept | colour | background | last step: concept / colour / background |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        options = " ".join(merged_options(CASES[s.case], METHODS[s.method])) or "demo settings"
        last = " / ".join(f"{100 * s.last[k]:.0f}%" for k in ("concept", "color", "background"))
        lines.append(
            f"| {s.case} | {s.method} | `{options}` | {s.at_step if s.reached else 'not reached'} "
            f"| {_pm(s, 'concept')} | {_pm(s, 'color')} | {_pm(s, 'background')} | {s.last_step}: {last} |"
        )
    lines += ["", "Concept / colour / background by step (means over seeds):", ""]
    for s in summaries:
        curve = ", ".join(
            f"{k}: {100 * c:.0f}/{100 * e:.0f}/{100 * b:.0f}" for k, (c, e, b) in s.curve.items()
        )
        lines.append(f"- {s.case} / {s.method}: {curve}")
    return "\n".join(lines) + "\n"


def _pm(s: Summary, key: str) -> str:
    return f"{100 * s.means[key]:.0f}% ± {100 * s.spreads[key]:.0f}"


def save_results(trials: list[Trial], summaries: list[Summary], plan: SuitePlan, machine, reference) -> Path:
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    path = results / f"quality-hard-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(
        json.dumps(
            {
                "machine": machine,
                "plan": vars(plan),
                "reference": reference,
                "trials": [vars(t) for t in trials],
                "summaries": [vars(s) for s in summaries],
            },
            indent=1,
        )
    )
    return path


def summaries_from_json(paths: list[Path]) -> tuple[list[Summary], dict, dict, SuitePlan]:
    """Summaries of earlier runs (e.g. halves of the suite run side by side), a later run of the
    same case and method replacing an earlier one; the first run's machine, reference and plan."""
    runs = [json.loads(path.read_text()) for path in paths]
    by_key = {}
    for run in runs:
        for s in run["summaries"]:
            s["curve"] = {int(step): tuple(values) for step, values in s["curve"].items()}
            by_key[(s["case"], s["method"])] = Summary(**s)
    plan = runs[0]["plan"]
    plan = SuitePlan(
        tuple(plan["cases"]), tuple(plan["methods"]), tuple(plan["seeds"]), plan["images"], plan["steps_cap"]
    )
    return list(by_key.values()), runs[0]["machine"], runs[0]["reference"], plan


def plan_for(
    quick: bool, cases: str | None, methods: str | None, seeds: int | None, images: int | None = None
) -> SuitePlan:
    plan = QUICK if quick else FULL
    if images:
        plan = replace(plan, images=images)
    if cases:
        plan = replace(plan, cases=tuple(cases.split(",")))
    if methods:
        plan = replace(plan, methods=tuple(methods.split(",")))
    if seeds:
        plan = replace(plan, seeds=tuple(range(1, seeds + 1)))
    unknown = [c for c in plan.cases if c not in CASES] + [m for m in plan.methods if m not in METHODS]
    if unknown:
        raise SystemExit(
            f"unknown case or method {unknown[0]!r}; cases: {', '.join(CASES)}; methods: {', '.join(METHODS)}"
        )
    return plan
