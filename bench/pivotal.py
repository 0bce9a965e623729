"""Pivotal tuning against Textual Inversion alone, on the small real model.

    python -m bench.pivotal            # both concepts, every method but the regularized one, 3 seeds
    python -m bench.pivotal --quick    # the new glyph, one seed
    python -m bench.pivotal --cost     # time per step against TI alone, LoRA sizes at full size
    python -m bench.pivotal --vae      # what the model's VAE keeps of each concept, by size

Two concepts, each taught from 16 pictures (one colour after another, captioned ``a COLOUR
myshape``) through the real trainer CLI:

* **new glyph**: an arrow, a shape the model never saw under any word (``tools.shapes.NEW_GLYPH``;
  the judge learns its template for this evaluation only). A word can only point at what the
  model draws, so Textual Inversion alone should stay near the init word; the LoRA can teach the
  UNet the arrow.
* **heart**: the demo's concept, which the model already draws under ``dax``: how fast each
  method gets there, and what it costs in editability.

Each save is judged with ``tools.concept_eval.evaluate_edits`` (concept on plain prompts, colour
editability in the colours the model draws reliably, background editability), its embedding
installed and, for pivotal tuning, its own LoRA attached. A method reaches the target at the
first judged step from which the mean over seeds has concept >= 90 % and colour >= 80 % at every
later save. Results go to ``bench/results/pivotal-<date>.json`` and the pivotal section of
``bench/QUALITY.md``; the LoRA's size and time per step are printed too.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import statistics
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench.launch import measure
from tools import shapes
from tools.concept_eval import SHAPES_MODEL, evaluate_edits
from tools.demo import WORD, replacing, run_offline, varied_command

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / ".cache" / "pivotal"
RESULTS = ROOT / "bench" / "results"
QUALITY_MD = ROOT / "bench" / "QUALITY.md"
SECTION = "## Pivotal tuning"
CONCEPT_TARGET, COLOR_TARGET = 0.9, 0.8
JUDGED_STEPS = (20, 40, 80, 160, 300, 500)
STEPS = 300  # at LORA_OPTIONS' rate the glyph rose to about 300 steps and fell by 500 (docs/quality.md)
PICTURES = 16  # with 8, pivotal tuning overfits the glyph's few pictures (docs/quality.md)
# The smallest size (half its extent, in pixels) a concept is drawn at for training. The small
# model's VAE keeps the arrow's head apart from its shaft only from about 14 px: below that,
# encoding and decoding turns a fifth to a third of arrows into a blob the judge calls a circle
# (``--vae``, docs/quality.md). Pictures that small teach the word a blob; no method could learn
# from them what the judge asks. The heart survives the VAE at every size the world draws.
SMALLEST_RADIUS = {shapes.NEW_GLYPH: 14.0}


def smallest_radius(shape: str) -> float:
    """The smallest size ``shape`` is drawn at for training (``SMALLEST_RADIUS``, else the world's)."""
    return SMALLEST_RADIUS.get(shape, shapes.MIN_RADIUS)


# rank 16 on the transformer layers and the 3x3 convolutions: this model's attention sits only at
# its 8 x 8 level, so a shape it never drew needs the convolutions too (transformer layers alone
# reached about 60-75 % on one seed in the calibration runs, docs/quality.md)
LORA_OPTIONS = (
    "--network_module=networks.lora",
    "--network_dim=16",
    "--network_alpha=16",
    "--network_args",
    "conv_dim=16",
    "conv_alpha=16",
    "--unet_lr=1e-3",
)


@dataclass(frozen=True)
class Method:
    name: str
    options: tuple[str, ...]
    regularized: bool = False  # with --reg_data_dir: pictures of the world's shapes (draw_world_pictures)
    steps: int | None = None  # the method's own run length; None: the bench's --steps

    def length(self, default: int) -> int:
        """How many steps the method trains for when the bench asks for ``default``."""
        return self.steps or default


METHODS = (
    Method("TI alone", ()),
    Method("pivotal", LORA_OPTIONS),
    # kohya's min-SNR loss weighting: more of each step's weight on the noisy timesteps, where a
    # picture's layout (the glyph's outline) is decided; the best of the weightings on the glyph (docs/quality.md)
    Method("pivotal, min-SNR 5", (*LORA_OPTIONS, "--min_snr_gamma=5")),
    # the LoRA at half the rate for 5/3 the steps: the glyph's seeds end closer together (docs/quality.md)
    Method(
        "pivotal, min-SNR 5, LoRA at 5e-4 to 500 steps",
        replacing(LORA_OPTIONS, ("--min_snr_gamma=5", "--unet_lr=5e-4")),
        steps=500,
    ),
    Method("pivotal, vectors for the first half", (*LORA_OPTIONS, "--train_vectors_fraction=0.5")),
    Method("pivotal, regularized", LORA_OPTIONS, regularized=True),
)
CONCEPTS = {"new glyph": shapes.NEW_GLYPH, "heart": shapes.CONCEPT_SHAPE}


def draw_pictures(folder: Path, shape: str, count: int = 16, seed: int = 1) -> None:
    """``count`` pictures of ``shape``, one colour after another, captioned ``a COLOUR WORD``, at
    the sizes the model's VAE keeps (``SMALLEST_RADIUS``)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    colors = list(shapes.COLORS)
    for i in range(count):
        color = colors[i % len(colors)]
        scene = shapes.random_scene(rng, shape=shape, color=color)
        while scene.radius < smallest_radius(shape):
            scene = shapes.random_scene(rng, shape=shape, color=color)
        shapes.render(scene).save(folder / f"{i:02d}.png")
        (folder / f"{i:02d}.txt").write_text(f"a {color} {WORD}")


def draw_world_pictures(folder: Path, count: int, seed: int = 2) -> None:
    """``count`` pictures of the shapes the model knows, captioned as the model was trained: the
    regularization pictures (kohya's ``--reg_data_dir``) that hold the LoRA to the rest of the world."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        scene = shapes.random_scene(rng)
        shapes.render(scene).save(folder / f"{i:02d}.png")
        (folder / f"{i:02d}.txt").write_text(shapes.caption(scene, rng))


def through_the_vae(model, picture: Image.Image) -> Image.Image:
    """``picture`` encoded and decoded by the model's VAE: what the UNet is taught when it is a
    training picture, and the best a generated picture can be."""
    from tools.build_shapes_model import reconstruct

    pixels = torch.from_numpy(np.array(picture.convert("RGB"))).permute(2, 0, 1)[None]
    return Image.fromarray(reconstruct(model.vae, pixels)[0])


def vae_keep_rates(
    model, shape: str, radii: tuple[int, ...], per_radius: int = 48, seed: int = 7
) -> dict[int, float]:
    """For each radius r: the share of ``per_radius`` pictures of ``shape`` drawn at r to r + 1 px
    that the judge still finds after the VAE."""
    rng = np.random.default_rng(seed)
    extra = () if shape in shapes.ALL_SHAPES else (shape,)
    rates = {}
    for radius in radii:
        kept = 0
        for _ in range(per_radius):
            scene = shapes.random_scene(rng, shape=shape)
            while not radius <= scene.radius < radius + 1:  # placed for its own size, as in training
                scene = shapes.random_scene(rng, shape=shape)
            kept += shapes.judge(through_the_vae(model, shapes.render(scene)), extra).shape == shape
        rates[radius] = kept / per_radius
    return rates


def vae_section() -> str:
    """What the VAE keeps of each concept by size: the reason for ``SMALLEST_RADIUS``."""
    from library.models.loading import load_sd_model

    model = load_sd_model(SHAPES_MODEL)
    radii = tuple(range(shapes.MIN_RADIUS, 19)) + (shapes.MAX_RADIUS - 1,)
    lines = [
        "Pictures the judge still finds after the VAE, by size (half the extent in pixels, 48 per size):",
        "",
        "| concept | " + " | ".join(f"{r} px" for r in radii) + " |",
        "|---|" + "---|" * len(radii),
    ]
    for concept, shape in CONCEPTS.items():
        rates = vae_keep_rates(model, shape, radii)
        lines.append(f"| {concept} | " + " | ".join(f"{100 * rates[r]:.0f} %" for r in radii) + " |")
    return "\n".join(lines) + "\n"


def judged_steps(steps: int) -> list[int]:
    """The saves judged in a run of ``steps``: those of ``JUDGED_STEPS`` it reaches, and its last."""
    return sorted({*(step for step in JUDGED_STEPS if step < steps), steps})


def command(
    method: Method, seed: int, data: Path, out: Path, steps: int, extra: tuple[str, ...] = ()
) -> list[str]:
    """The demo's command, run longer, saving every 20 steps, with the method's options and
    ``extra`` (calibration: ``--extra=--unet_lr=5e-4``; the same name replaces the method's)."""
    options = replacing(method.options, extra)
    return varied_command(list(options), steps=steps, save_every=20, seed=seed, data=data, out=out)


def run_trial(
    concept: str,
    method: Method,
    seed: int,
    images: int,
    pictures: int,
    steps: int,
    extra: tuple[str, ...] = (),
) -> dict:
    """Train once (for the method's own steps if it has them); judge every judged save.
    Returns {"seconds", "judged": {step: scores}, "lora_bytes"}."""
    from library.embeddings.install import install_embeddings
    from library.models.loading import load_sd_model
    from library.networks.lora import network_from_file, read_lora_file

    steps = method.length(steps)
    # the pictures' own folder, and the start of the runs' folder names
    drawn = f"{concept}-{pictures}-from-{smallest_radius(CONCEPTS[concept]):g}px"
    tag = re.sub(r"\W+", "-", f"{drawn}-{method.name}-{seed}-{steps}{''.join(extra)}")
    data = WORK / re.sub(r"\W+", "-", drawn) / "data"
    if not data.is_dir():
        draw_pictures(data / f"1_{WORD}", CONCEPTS[concept], pictures)
    out = WORK / "runs" / tag
    if method.regularized:
        reg = WORK / f"world-{pictures}"
        if not reg.is_dir():
            draw_world_pictures(reg / f"1_{shapes.GENERIC_WORD}", pictures)
        extra = (*extra, f"--reg_data_dir={reg}")
    seconds = run_offline(command(method, seed, data, out, steps, extra), tag)
    trial = {"concept": concept, "method": method.name, "seed": seed, "seconds": seconds}
    trial["pictures"] = pictures
    trial["extra"] = list(extra)
    trial["judged"] = {}
    model = load_sd_model(SHAPES_MODEL)
    for step in judged_steps(steps):
        suffix = "" if step == steps else f"-step{step:08d}"
        word = f"{WORD}{step}"  # a fresh word per save: the tokenizer keeps what was installed
        installed = install_embeddings(model, [out / f"{WORD}{suffix}.safetensors"], [word])
        lora_path = out / f"{WORD}_lora{suffix}.safetensors"
        network = network_from_file(read_lora_file(lora_path), model).attach() if lora_path.exists() else None
        report = evaluate_edits(model, installed, word, images, target=CONCEPTS[concept])
        if network is not None:
            network.detach()
            trial["lora_bytes"] = lora_path.stat().st_size
        trial["judged"][step] = {
            "concept": report.concept,
            "color": report.color,
            "background": report.background,
        }
        print(f"  {tag} step {step}: {report}", flush=True)
    return trial


def summarise(trials: list[dict]) -> list[dict]:
    """Per (concept, method): mean and spread over seeds at each step, the step the target is
    reached and held, and the seconds per run."""
    rows = []
    for concept in CONCEPTS:
        for method in METHODS:
            mine = [t for t in trials if t["concept"] == concept and t["method"] == method.name]
            if not mine:
                continue
            by_step = {}
            steps = sorted(mine[0]["judged"])
            for step in steps:
                scores = [t["judged"][step] for t in mine]
                by_step[step] = {
                    key: (
                        statistics.mean(s[key] for s in scores),
                        min(s[key] for s in scores),
                        max(s[key] for s in scores),
                    )
                    for key in ("concept", "color", "background")
                }
            reached = None
            for step in reversed(steps):
                held = (
                    by_step[step]["concept"][0] >= CONCEPT_TARGET
                    and by_step[step]["color"][0] >= COLOR_TARGET
                )
                if not held:
                    break
                reached = step
            rows.append(
                {
                    "concept": concept,
                    "method": method.name,
                    "seeds": len(mine),
                    "by_step": by_step,
                    "reached": reached,
                    "seconds": statistics.mean(t["seconds"] for t in mine),
                    "lora_bytes": mine[0].get("lora_bytes"),
                    "pictures": mine[0].get("pictures", PICTURES),
                }
            )
    return rows


def picture_counts(rows: list[dict]) -> str:
    """How many pictures taught each concept: "16 pictures of each concept" or "16 pictures (heart), ..."."""
    counts = {r["concept"]: r["pictures"] for r in rows}
    if len(set(counts.values())) == 1:
        return f"{next(iter(counts.values()))} pictures of each concept"
    return ", ".join(f"{count} pictures ({concept})" for concept, count in sorted(counts.items()))


def markdown(rows: list[dict], machine: str, images: int) -> str:
    lines = [
        SECTION,
        "",
        f"`python -m bench.pivotal` on {machine}; {rows[0]['seeds'] if rows else 0} training seeds, {images} "
        f"pictures per kind per judged save; the demo's command on "
        + picture_counts(rows)
        + ", run to "
        + " or ".join(str(n) for n in sorted({max(r["by_step"]) for r in rows}))
        + " steps (each row's last judged step), LoRA "
        f"`{' '.join(LORA_OPTIONS)}`. Concept / colour / background at the last save (mean over seeds, "
        "min-max in brackets), the step from which concept >= 90 % and colour >= 80 % hold, and the "
        "wall time of a run (training and its saves, not the judging). "
        + " ".join(
            f"The {concept}'s pictures are drawn {SMALLEST_RADIUS[shape]:g} px or more in radius (half their extent), "
            "the sizes the model's VAE keeps (`--vae`)."
            for concept, shape in CONCEPTS.items()
            if shape in SMALLEST_RADIUS
        ),
        "",
        "| concept | method | concept | colour | background | target from step | run (s) | LoRA file |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        last = row["by_step"][max(row["by_step"])]
        cells = [
            f"{100 * m:.0f} % ({100 * lo:.0f}-{100 * hi:.0f})"
            for m, lo, hi in (last[k] for k in ("concept", "color", "background"))
        ]
        size = f"{row['lora_bytes'] / 1e3:.0f} kB" if row["lora_bytes"] else "-"
        reached = str(row["reached"]) if row["reached"] else "not reached"
        lines.append(
            f"| {row['concept']} | {row['method']} | {' | '.join(cells)} | {reached} | {row['seconds']:.0f} | {size} |"
        )
    lines.append("")
    lines.append("Concept by judged step (mean over seeds):")
    lines.append("")
    judged = sorted({step for row in rows for step in row["by_step"]})
    lines.append("| concept | method | " + " | ".join(str(s) for s in judged) + " |")
    lines.append("|---|---|" + "---|" * len(judged))
    for row in rows:
        values = " | ".join(
            f"{100 * row['by_step'][s]['concept'][0]:.0f} %" if s in row["by_step"] else "-" for s in judged
        )
        lines.append(f"| {row['concept']} | {row['method']} | {values} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# cost: the LoRA file's size at full size, and the time per step against Textual Inversion alone


def full_size_lora_megabytes(family: str, rank: int, with_convs: bool) -> float:
    """The size in MB of an fp16 LoRA file at ``rank`` (3x3 convolutions at the same rank) on the
    real architecture, counted on a model built on the meta device (no memory, no weights)."""
    from types import SimpleNamespace

    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    from library.models.family import FAMILIES
    from library.models.loading import base_config
    from library.networks.lora import default_unet_layers

    with init_empty_weights():
        unet = UNet2DConditionModel(**base_config(family)["unet"])
    model = SimpleNamespace(unet=unet, family=FAMILIES[family], text_encoders=[])
    weights = 0
    for layer in default_unet_layers(model, with_convs).values():
        if isinstance(layer, torch.nn.Conv2d):
            kernel = layer.kernel_size[0] * layer.kernel_size[1]
            weights += rank * (layer.in_channels * kernel + layer.out_channels) + 1
        else:
            weights += rank * (layer.in_features + layer.out_features) + 1
    return weights * 2 / 1e6


TIMED_STEPS, WARMUP_STEPS = 120, 20  # the steps of a timing run, and its first steps left out
TIMING_REPEATS = 5  # a method's runs spread by about ±10 % here: the range is printed with the median


def seconds_per_step(method: Method, data: Path) -> float:
    """A run's seconds per step past its warm-up, by the wall clock of its progress bar
    (``bench.launch``): start-up, loading and the final save are left out. Runs no judge."""
    out = WORK / "timing" / re.sub(r"\W+", "-", method.name)
    command_line = [
        o for o in command(method, 1, data, out, TIMED_STEPS) if not o.startswith("--save_every_n_steps")
    ]
    figures = measure(command_line, ROOT, TIMED_STEPS, warmup=WARMUP_STEPS)
    if "error" in figures:
        raise RuntimeError(f"{method.name}: the timing run failed:\n{figures['error']}")
    return figures["seconds_per_step"]


def cost_section(machine: str) -> str:
    """Time per step on the shapes model and full-size LoRA sizes. The methods take turns, each
    repeat timing every method once, so that the machine's drift reaches all of them alike."""
    data = WORK / f"heart-{PICTURES}" / "data"
    if not data.is_dir():
        draw_pictures(data / f"1_{WORD}", shapes.CONCEPT_SHAPE, PICTURES)
    # the regularized method is not timed: its step is pivotal's (the pictures differ, not the work)
    timed = [m for m in METHODS if not m.regularized]
    timings = {m.name: [] for m in timed}
    for _ in range(TIMING_REPEATS):
        for method in timed:
            timings[method.name].append(seconds_per_step(method, data))
    per_step = {name: statistics.median(values) for name, values in timings.items()}
    base = per_step[METHODS[0].name]
    lines = [
        "### Cost",
        "",
        f"Seconds per optimizer step on the shapes model (batch 8 of 64 x 64 pictures, cached latents), "
        f"on {machine}: steps {WARMUP_STEPS}-{TIMED_STEPS} of a {TIMED_STEPS}-step run, timed by its progress bar, "
        f"median and range of {TIMING_REPEATS} repeats in which the methods take turns; past the pivot "
        f"(step {TIMED_STEPS // 2}) a step skips the text encoders' backward pass. Two methods whose ranges "
        "overlap are not told apart by this timing.",
        "",
        "| method | s/step | range | against TI alone |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {name} | {value:.3f} | {min(timings[name]):.3f}-{max(timings[name]):.3f} | {value / base:.2f}x |"
        for name, value in per_step.items()
    ]
    lines += [
        "",
        "A LoRA file's size (fp16, `--save_precision fp16`; fp32 doubles it) on the real architectures,",
        "counted on models built without weights: kohya's default layers, and with `conv_dim` at the same rank.",
        "",
        "| model | rank | transformer layers | + 3x3 convolutions |",
        "|---|---|---|---|",
    ]
    for family, label in (("sd1", "SD 1.5"), ("sdxl", "SDXL")):
        for rank in (4, 16, 32):
            plain, convs = (full_size_lora_megabytes(family, rank, c) for c in (False, True))
            lines.append(f"| {label} | {rank} | {plain:.1f} MB | {convs:.1f} MB |")
    return "\n".join(lines) + "\n"


def write_section(text: str) -> None:
    """Replace (or append) the pivotal section of bench/QUALITY.md, leaving the others as they are."""
    old = QUALITY_MD.read_text() if QUALITY_MD.exists() else ""
    start = old.find(SECTION)
    if start < 0:
        QUALITY_MD.write_text(old.rstrip("\n") + "\n\n" + text)
        return
    rest = old[start + len(SECTION) :]
    end = rest.find("\n## ")
    tail = rest[end:] if end >= 0 else ""
    QUALITY_MD.write_text(old[:start] + text + tail)


REFERENCE_SETTINGS = ("seeds", "concepts", "methods", "images", "pictures", "steps", "extra", "quick")


def is_reference_run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> bool:
    """Whether the run is the one QUALITY.md reports (every default); a subset or a calibration
    run must not replace its section."""
    return all(getattr(args, name) == parser.get_default(name) for name in REFERENCE_SETTINGS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="the new glyph only, one seed, 8 pictures per kind"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--concepts", nargs="+", choices=list(CONCEPTS), default=list(CONCEPTS))
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=[m.name for m in METHODS],
        default=[m.name for m in METHODS if not m.regularized],  # regularized: calibration, docs/quality.md
    )
    parser.add_argument("--images", type=int, default=12, help="pictures per kind per judged save")
    parser.add_argument("--pictures", type=int, default=PICTURES, help="training pictures per concept")
    parser.add_argument(
        "--steps",
        type=int,
        default=STEPS,
        help="training steps of a run whose method has no length of its own",
    )
    parser.add_argument("--machine", default="this machine", help="how the report names the machine")
    parser.add_argument(
        "--from-json", type=Path, nargs="*", default=None, help="merge saved trials instead of running"
    )
    parser.add_argument(
        "--extra",
        action="append",
        default=[],
        help="calibration: a trainer option added to every run, replacing the method's of the same name "
        "(--extra=--unet_lr=5e-4; --extra=--network_args --extra=conv_dim=32 --extra=conv_alpha=32); "
        "not written to QUALITY.md (nor is a run with other seeds, concepts, methods or sizes)",
    )
    parser.add_argument("--cost", action="store_true", help="only the time per step and the LoRA sizes")
    parser.add_argument("--vae", action="store_true", help="only what the VAE keeps of each concept, by size")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.vae:
        print(vae_section())
        return
    if args.cost:
        text = cost_section(args.machine)
        print(text)
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "pivotal-cost.md").write_text(text)
        return
    seeds, concepts, images = (
        (args.seeds, args.concepts, args.images) if not args.quick else ([1], ["new glyph"], 8)
    )
    machine = args.machine
    if args.from_json:
        saved = [json.loads(path.read_text()) for path in args.from_json]
        trials = [t for record in saved for t in record["trials"]]
        images, machine = saved[0]["images"], saved[0]["machine"]
        for t in trials:
            t["judged"] = {int(k): v for k, v in t["judged"].items()}
    else:
        methods = [m for m in METHODS if m.name in args.methods]
        trials = [
            run_trial(c, m, s, images, args.pictures, args.steps, tuple(args.extra))
            for c in concepts
            for m in methods
            for s in seeds
        ]
        RESULTS.mkdir(parents=True, exist_ok=True)
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        path = RESULTS / f"pivotal-{stamp}.json"
        path.write_text(json.dumps({"machine": machine, "images": images, "trials": trials}, indent=1))
        print(f"trials saved to {path}")
    text = markdown(summarise(trials), machine, images)
    cost = RESULTS / "pivotal-cost.md"
    if cost.exists():  # measured apart (--cost), added to the section
        text += "\n" + cost.read_text()
    print(text)
    if args.from_json or is_reference_run(parser, args):
        write_section(text)
    else:
        print(f"a partial or calibration run: {QUALITY_MD.relative_to(ROOT)} is left as it is")


if __name__ == "__main__":
    main()
