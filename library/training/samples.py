"""Sample images during training (``--sample_prompts``), with kohya's prompt files and names.

Prompt files: ``.txt`` (one prompt a line with `` --n --w --h --d --l --s --ss`` options, ``#``
lines skipped), ``.toml`` (``[prompt]`` defaults plus ``[[prompt.subset]]`` entries) or ``.json``
(a list of objects) with kohya's keys. The images are rendered by the same pipeline code as
``gen_img_diffusers.py`` (``library.generation.generator``), with the token string expanded to all vectors,
and saved as ``output_dir/sample/<name>_<e000001|000100>_<i>_<time>_<seed>.png``.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from library.errors import UserError
from library.files import read_text_file, save_image, tomllib
from library.generation.prompts import PromptSpec, parse_prompt_options
from library.text.tokenizer import CHUNK_TOKENS

if TYPE_CHECKING:
    from library.training.run import Run

logger = logging.getLogger(__name__)

DEFAULTS = {"width": 512, "height": 512, "steps": 30, "scale": 7.5}


@dataclass(frozen=True)
class SampleSettings:
    """``--sample_*``: which prompt file, when, and with which sampler (fields named like the options)."""

    sample_prompts: str | None = None
    sample_every_n_steps: int | None = None
    sample_every_n_epochs: int | None = None
    sample_at_first: bool = False
    sample_sampler: str = "ddim"

    def __post_init__(self) -> None:
        wants = self.sample_every_n_steps or self.sample_every_n_epochs or self.sample_at_first
        if wants and not self.sample_prompts:
            raise UserError(
                "--sample_every_n_steps/--sample_every_n_epochs/--sample_at_first need --sample_prompts"
            )


def read_sample_prompts(path: str | Path) -> list[PromptSpec]:
    """The prompts of a kohya sample-prompt file, each as a ``PromptSpec``."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--sample_prompts {path}: not found")
    text = read_text_file(path, "--sample_prompts")
    if path.suffix.lower() == ".txt":
        lines = [line.strip() for line in text.splitlines()]
        return [parse_prompt_options(line) for line in lines if line and not line.startswith("#")]
    try:
        if path.suffix.lower() == ".toml":
            data = tomllib.loads(text)
            defaults = {k: v for k, v in data.get("prompt", {}).items() if k != "subset"}
            entries = [{**defaults, **subset} for subset in data.get("prompt", {}).get("subset", [])]
        elif path.suffix.lower() == ".json":
            entries = json.loads(text)
        else:
            raise UserError(f"--sample_prompts {path}: use a .txt, .toml or .json file")
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"--sample_prompts {path}: cannot parse ({exc})") from exc
    return [_spec_from_dict(entry, path) for entry in entries]


def _spec_from_dict(entry: dict[str, Any], path: Path) -> PromptSpec:
    if not isinstance(entry, dict) or "prompt" not in entry:
        raise UserError(f"--sample_prompts {path}: every entry needs a 'prompt'")
    seed = entry.get("seed")
    return PromptSpec(
        prompt=str(entry["prompt"]),
        negative_prompt=entry.get("negative_prompt"),
        width=entry.get("width"),
        height=entry.get("height"),
        steps=entry.get("sample_steps"),
        seeds=[int(seed)] if seed is not None else None,
        scale=entry.get("scale"),
        sampler=entry.get("sample_sampler"),
    )


@dataclass
class SampleSchedule:
    """Which prompts to render, and when (kohya's rules: epochs win over steps when both are set)."""

    prompts: list[PromptSpec] = field(default_factory=list)
    every_n_steps: int | None = None
    every_n_epochs: int | None = None
    num_vectors: int = 1
    sampler: str = "ddim"

    @classmethod
    def from_settings(cls, settings: SampleSettings, num_vectors: int) -> SampleSchedule:
        wants = settings.sample_every_n_steps or settings.sample_every_n_epochs or settings.sample_at_first
        prompts = read_sample_prompts(settings.sample_prompts) if settings.sample_prompts else []
        if settings.sample_prompts and not wants:
            logger.warning(
                "--sample_prompts is set but no --sample_every_n_steps/epochs or --sample_at_first"
            )
        return cls(
            prompts,
            settings.sample_every_n_steps,
            settings.sample_every_n_epochs,
            num_vectors,
            settings.sample_sampler,
        )

    def due_at_step(self, step: int) -> bool:
        return bool(
            self.prompts and self.every_n_steps and not self.every_n_epochs and step % self.every_n_steps == 0
        )

    def due_at_epoch(self, epoch: int) -> bool:
        return bool(self.prompts and self.every_n_epochs and epoch % self.every_n_epochs == 0)


def sample_images(run: Run, schedule: SampleSchedule, *, epoch: int | None) -> list[Path]:
    """Render every sample prompt on the main process with the run's current vectors; the others wait.
    The RNG state is restored; ``epoch`` names an epoch's samples, else they are named by the step."""
    accelerator, step = run.accelerator, run.progress.global_step
    written: list[Path] = []
    if accelerator.is_main_process and schedule.prompts:
        from library.generation.generator import ImageGenerator

        rng_state = torch.get_rng_state()
        folder = run.output_dir / "sample"
        folder.mkdir(parents=True, exist_ok=True)
        suffix = f"e{epoch:06d}" if epoch is not None else f"{step:06d}"
        max_token_length = run.text.max_token_length
        generator = ImageGenerator(
            run.model,
            tokenizers=run.text.tokenizers,
            clip_skip=run.text.clip_skip,
            max_embeddings_multiples=None if max_token_length is None else max_token_length // CHUNK_TOKENS,
            device=accelerator.device,
            dtype=run.precision.weight_dtype,
            vae_dtype=run.precision.vae_dtype,
            placeholder_vectors={run.settings.word.token_string: schedule.num_vectors},
        )
        with torch.no_grad(), accelerator.autocast():
            for i, spec in enumerate(schedule.prompts):
                request = _with_defaults(spec, schedule.sampler)
                images = generator.generate(request)  # one image: the first seed (kohya's sampling)
                seed = request.seeds[0] if request.seeds else None
                stamp = time.strftime("%Y%m%d%H%M%S")
                name = (
                    f"{run.output_name}_{suffix}_{i:02d}_{stamp}"
                    + ("" if seed is None else f"_{seed}")
                    + ".png"
                )
                save_image(images[0], folder / name)
                written.append(folder / name)
        generator.close()
        torch.set_rng_state(rng_state)
        logger.info("wrote %d sample images to %s", len(written), folder)
    accelerator.wait_for_everyone()
    return written


def _with_defaults(spec: PromptSpec, sampler: str) -> PromptSpec:
    """kohya's sample defaults (512x512, 30 steps, scale 7.5) where the prompt file says nothing."""
    from dataclasses import replace

    return replace(
        spec,
        seeds=spec.seeds[:1] if spec.seeds else None,
        width=spec.width or DEFAULTS["width"],
        height=spec.height or DEFAULTS["height"],
        steps=spec.steps or DEFAULTS["steps"],
        scale=spec.scale if spec.scale is not None else DEFAULTS["scale"],
        sampler=spec.sampler or sampler,
    )
