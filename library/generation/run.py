"""One generation run, kohya's way: prompts and source images in, batches of images out.

``gen_img_diffusers.py`` parses the command line into ``GenerationSettings`` and hands prompts and
source images to ``Run``, which draws seeds (kohya's rules), groups images into batches that share
size, steps and scales, renders them through ``library.generation.generator`` and writes PNGs with kohya's
names and metadata.
"""

from __future__ import annotations

import logging
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from library.errors import UserError
from library.files import read_text_file, save_image
from library.generation.prompts import SDXLSizes
from library.generation.samplers import DEFAULT_SCALE, DEFAULT_SIZE, DEFAULT_STEPS, DEFAULT_STRENGTH, MAX_SEED
from library.images import IMAGE_EXTENSIONS, has_image_extension, open_image, png_text

logger = logging.getLogger("gen_img")


@dataclass(frozen=True)
class GenerationSettings:
    """The options a run's loop reads (fields named like kohya's options, with its defaults)."""

    outdir: str = "outputs"
    W: int | None = None
    H: int | None = None
    steps: int = DEFAULT_STEPS
    scale: float = DEFAULT_SCALE
    negative_scale: float | None = None
    strength: float | None = None
    sampler: str = "ddim"
    n_iter: int = 1
    images_per_prompt: int = 1
    batch_size: int = 1
    seed: int | None = None
    iter_same_seed: bool = False
    shuffle_prompts: bool = False
    clip_skip: int | None = None
    max_embeddings_multiples: int | None = None
    sequential_file_name: bool = False
    use_original_file_name: bool = False
    highres_fix_scale: float | None = None
    highres_fix_steps: int = 28
    highres_fix_strength: float | None = None
    highres_fix_latents_upscaling: bool = False
    highres_fix_save_1st: bool = False
    original_width: int | None = None
    original_height: int | None = None
    original_width_negative: int | None = None
    original_height_negative: int | None = None
    crop_top: int | None = None
    crop_left: int | None = None

    @property
    def sizes(self) -> SDXLSizes:
        """SDXL's size conditioning as given on the command line (prompts may override each)."""
        return SDXLSizes(**{name: getattr(self, name) for name in SDXLSizes.__dataclass_fields__})


# ---------------------------------------------------------------------------------------------
# Source images and prompts


def load_images(path: str, flag: str) -> list:
    """An image file, or every image of a folder in name order, as the trainer reads its pictures
    (``library.images``: EXIF orientation, transparency on white, any letter case of the suffix)."""
    source = Path(path)
    if source.is_dir():
        files = sorted(f for f in source.iterdir() if f.is_file() and has_image_extension(f))
        if not files:
            raise UserError(f"{flag} {path}: the folder holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    elif source.is_file():
        files = [source]
    else:
        raise UserError(f"{flag} {path}: not found")
    images = []
    for file in files:
        image = open_image(file, what=f"{flag} image")
        image.source_path = str(file)  # the name --use_original_file_name reuses
        image.saved_text = png_text(file)  # a PNG's saved prompt, for img2img without a prompt
        images.append(image)
    return images


def prompt_from_metadata(image) -> str:
    """kohya: an img2img run without a prompt reuses the prompt saved in the source PNG."""
    text = getattr(image, "saved_text", None) or {}
    if "prompt" not in text:
        raise UserError(
            f"--image_path {image.source_path}: no prompt given and the image has no 'prompt' in its PNG "
            "metadata; pass --prompt or --from_file"
        )
    prompt = text["prompt"]
    if text.get("negative-prompt"):
        prompt += " --n " + text["negative-prompt"]
    return prompt


def read_prompt_file(path: str) -> list[str]:
    lines = read_text_file(path, "--from_file").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def stdin_prompts() -> Iterator[str]:
    logger.info("--interactive: reading prompts from standard input, one per line, until end of input")
    for line in sys.stdin:
        if line.strip() and not line.strip().startswith("#"):
            yield line.strip()


# ---------------------------------------------------------------------------------------------
# Seeds, batches and file names


@dataclass
class Item:
    """One image to generate."""

    step: int  # position in its iteration (picks the source image, as in kohya)
    number: int  # 1-based position in the whole run (sequential file names)
    prompt: str
    negative_prompt: str
    seed: int
    init_image: Any
    mask_image: Any


@dataclass
class AppliedLoRA:
    """A LoRA file on the model: its name (for the PNG metadata), its adapters and its
    ``--network_mul``, which a prompt's ``--am`` overrides."""

    name: str
    network: Any
    strength: float


@dataclass
class BatchSettings:
    """What the images of one batch share; a change starts a new batch (kohya's rule)."""

    width: int
    height: int
    steps: int
    scale: float
    negative_scale: float | None
    strength: float
    sampler: str
    sizes: SDXLSizes = field(default_factory=lambda: SDXLSizes())
    lora_strengths: tuple[float, ...] = ()


@dataclass
class OutputNamer:
    """kohya's file names, never overwriting a file (kohya would)."""

    outdir: Path
    sequential: bool
    original_names: bool
    written: list[Path] = field(default_factory=list)

    def name(self, item: Item, index: int, prefix: str) -> Path:
        """``im_<time>_<prefix><index in batch:03>_<seed>``, ``im_<prefix><number:06>`` with
        --sequential_file_name, or the source image's name with --use_original_file_name;
        ``prefix`` is kohya's highres mark ("0" first pass, "1" final, "" without highres fix)."""
        source = item.init_image
        if self.original_names and source is not None and hasattr(source, "source_path"):
            base = Path(source.source_path).stem
        elif self.sequential:
            base = f"im_{prefix}{item.number:06d}"
        else:
            base = f"im_{time.strftime('%Y%m%d%H%M%S')}_{prefix}{index:03d}_{item.seed}"
        path = self.outdir / f"{base}.png"
        n = 1
        while path.exists():
            path = self.outdir / f"{base}_{n}.png"
            n += 1
        return path


class Run:
    """Turns prompt lines into batches of images and writes them, following kohya's loop."""

    def __init__(
        self,
        settings: GenerationSettings,
        generator,
        model,
        embeddings: dict[str, int],
        loras: list[AppliedLoRA] | None = None,
    ):
        self.settings = settings
        self.generator = generator
        self.model = model
        self.embeddings = embeddings
        self.loras = loras or []
        self.rng = random.Random(self.settings.seed)  # None seeds from the OS
        self.namer = OutputNamer(
            Path(self.settings.outdir),
            self.settings.sequential_file_name,
            self.settings.use_original_file_name,
        )
        self.init_images: list | None = None
        self.mask_images: list | None = None
        self.highres = None
        self.item_count = 0
        if self.settings.highres_fix_scale is not None:
            from library.generation.generator import HighresFix

            self.highres = HighresFix(
                scale=self.settings.highres_fix_scale,
                steps=self.settings.highres_fix_steps,
                strength=self.settings.highres_fix_strength,
                latents_upscaling=self.settings.highres_fix_latents_upscaling,
                keep_first=self.settings.highres_fix_save_1st,
            )

    # -- seeds -----------------------------------------------------------------------------------

    def predefined_seeds(self, prompt_count: int) -> list[int] | None:
        """kohya: with --seed, every image's seed is drawn up front from it; one image gets it as is."""
        if self.settings.seed is None:
            return None
        count = self.settings.n_iter * prompt_count * self.settings.images_per_prompt
        seeds = [self.rng.randint(0, MAX_SEED) for _ in range(count)]
        if count == 1:
            seeds[0] = self.settings.seed
        return seeds

    # -- main loop -------------------------------------------------------------------------------

    def run(self, prompt_list: list[str], interactive: bool) -> list[Path]:
        from library.generation.prompts import expand_dynamic_prompt, parse_prompt_options

        predefined = self.predefined_seeds(len(prompt_list))
        for iteration in range(self.settings.n_iter):
            if self.settings.n_iter > 1:
                logger.info("iteration %d/%d", iteration + 1, self.settings.n_iter)
            iter_seed = self.rng.randint(0, MAX_SEED)
            if self.settings.shuffle_prompts:
                self.rng.shuffle(prompt_list)
            lines: Iterator[str] = iter(prompt_list)
            if interactive:
                lines = _chain(prompt_list, stdin_prompts())
            step = 0
            batch: list[Item] = []
            batch_settings: BatchSettings | None = None
            for number, line in enumerate(lines, start=1):
                variants = expand_dynamic_prompt(line, self.rng, repeat_count=self.settings.images_per_prompt)
                repeats = self.settings.images_per_prompt if len(variants) == 1 else len(variants)
                seed = None
                prompt_seeds: list[int] | None = None
                for i in range(repeats):
                    if i == 0 or len(variants) > 1:
                        spec = parse_prompt_options(variants[i if len(variants) > 1 else 0])
                        settings = self.settings_for(spec)
                        prompt_seeds = list(spec.seeds) if spec.seeds else None
                        seed = None
                        logger.info("prompt %d: %s", number, spec.prompt)
                    if prompt_seeds is not None:
                        if prompt_seeds:
                            seed = prompt_seeds.pop(0)  # exhausted: keep the last one (kohya)
                    elif predefined is not None:
                        seed = predefined.pop(0) if predefined else None
                    elif self.settings.iter_same_seed:
                        seed = iter_seed
                    else:
                        seed = None
                    if seed is None:
                        seed = self.rng.randint(0, MAX_SEED)
                    item, item_settings = self.make_item(step, spec, settings, seed)
                    if batch and item_settings != batch_settings:
                        self.process(batch, batch_settings)
                        batch = []
                    batch.append(item)
                    batch_settings = item_settings
                    if len(batch) == self.settings.batch_size:
                        self.process(batch, batch_settings)
                        batch = []
                    step += 1
                if interactive and batch:
                    self.process(batch, batch_settings)
                    batch = []
            if batch:
                self.process(batch, batch_settings)
        return self.namer.written

    def settings_for(self, spec) -> BatchSettings:
        if spec.negative_scale is not None:
            negative_scale = spec.negative_scale
        elif spec.negative_scale_off:
            negative_scale = None
        else:
            negative_scale = self.settings.negative_scale
        return BatchSettings(
            width=spec.width or self.settings.W or DEFAULT_SIZE,
            height=spec.height or self.settings.H or DEFAULT_SIZE,
            steps=spec.steps or self.settings.steps,
            scale=self.settings.scale if spec.scale is None else spec.scale,
            negative_scale=negative_scale,
            strength=DEFAULT_STRENGTH if self.settings.strength is None else self.settings.strength,
            sampler=spec.sampler or self.settings.sampler,
            sizes=spec.sizes.over(self.settings.sizes),
            lora_strengths=self.lora_strengths(spec.network_multipliers),
        )

    def lora_strengths(self, asked: list[float] | None) -> tuple[float, ...]:
        """A prompt's ``--am`` strengths, one per LoRA file; the last repeats for the files it
        does not reach (kohya's rule); without ``--am``, each file's ``--network_mul``."""
        if asked is None:
            return tuple(lora.strength for lora in self.loras)
        if not self.loras:
            logger.warning("prompt option --am: no LoRA file is applied (--network_weights); ignored")
            return ()
        if len(asked) > len(self.loras):
            logger.warning(
                "prompt option --am gives %d strengths for %d LoRA file(s); the extra ones are ignored",
                len(asked),
                len(self.loras),
            )
        return tuple([*asked, *[asked[-1]] * len(self.loras)][: len(self.loras)])

    def make_item(self, step: int, spec, settings: BatchSettings, seed: int) -> tuple[Item, BatchSettings]:
        init = mask = None
        if self.init_images:
            init = self.init_images[step % len(self.init_images)]
            if self.highres is None and not (self.settings.W and self.settings.H):
                # kohya: img2img renders at the source image's size, rounded down to 32
                width, height = init.size
                settings = BatchSettings(
                    **{
                        **settings.__dict__,
                        "width": max(32, width - width % 32),
                        "height": max(32, height - height % 32),
                    }
                )
        if self.mask_images:
            mask = self.mask_images[step % len(self.mask_images)]
        self.item_count += 1
        item = Item(step, self.item_count, spec.prompt, spec.negative_prompt or "", seed, init, mask)
        return item, settings

    # -- one batch -------------------------------------------------------------------------------

    def process(self, batch: list[Item], settings: BatchSettings) -> None:
        from library.generation.generator import GenerationRequest

        for lora, strength in zip(self.loras, settings.lora_strengths):
            lora.network.set_multiplier(strength)
        request = GenerationRequest(
            prompt=[item.prompt for item in batch],
            negative_prompt=[item.negative_prompt for item in batch],
            seeds=[item.seed for item in batch],
            width=settings.width,
            height=settings.height,
            steps=settings.steps,
            scale=settings.scale,
            negative_scale=settings.negative_scale,
            sampler=settings.sampler,
            strength=settings.strength,
            sizes=settings.sizes,
            init_image=[item.init_image for item in batch] if batch[0].init_image is not None else None,
            mask_image=[item.mask_image for item in batch] if batch[0].mask_image is not None else None,
        )
        if self.highres is None:
            self.save(batch, settings, self.generator.generate(request), prefix="")
            return
        result = self.generator.generate_highres(request, self.highres)
        if self.highres.keep_first:
            first_settings = BatchSettings(**{**settings.__dict__, "steps": self.highres.steps})
            self.save(batch, first_settings, result.first_pass, prefix="0", first_pass=True)
        self.save(batch, settings, result.images, prefix="1")

    def save(
        self, batch: list[Item], settings: BatchSettings, images: list, *, prefix: str, first_pass=False
    ) -> None:
        from PIL.PngImagePlugin import PngInfo

        self.namer.outdir.mkdir(parents=True, exist_ok=True)
        for index, (item, image) in enumerate(zip(batch, images)):
            info = PngInfo()
            for key, value in self.metadata(item, settings, image, first_pass).items():
                info.add_text(key, value)
            path = self.namer.name(item, index, prefix)
            save_image(image, path, pnginfo=info)
            self.namer.written.append(path)
            logger.info("saved %s (seed %d)", path, item.seed)

    def metadata(self, item: Item, settings: BatchSettings, image, first_pass: bool) -> dict[str, str]:
        """kohya's PNG keys (prompt, seed, sampler, steps, scale, negative-prompt, negative-scale),
        plus what is needed to reproduce the image here: size, clip-skip, embeddings, model."""
        data = {
            "prompt": item.prompt,
            "seed": str(item.seed),
            "sampler": settings.sampler,
            "steps": str(settings.steps),
            "scale": str(settings.scale),
            "negative-prompt": item.negative_prompt,
        }
        if settings.negative_scale is not None:
            data["negative-scale"] = str(settings.negative_scale)
        data["size"] = f"{image.width}x{image.height}"
        if self.settings.clip_skip is not None:
            data["clip-skip"] = str(self.settings.clip_skip)
        if self.settings.max_embeddings_multiples is not None:
            data["max-embeddings-multiples"] = str(self.settings.max_embeddings_multiples)
        if self.loras:
            data["networks"] = ", ".join(
                f"{lora.name}:{strength:g}" for lora, strength in zip(self.loras, settings.lora_strengths)
            )
        if self.embeddings:
            data["embeddings"] = ", ".join(f"{word}:{n}" for word, n in self.embeddings.items())
        if item.init_image is not None:
            data["strength"] = str(settings.strength)
            data["source-image"] = Path(getattr(item.init_image, "source_path", "")).name
            if item.mask_image is not None:
                data["mask-image"] = Path(getattr(item.mask_image, "source_path", "")).name
        if self.highres is not None:
            data["highres-fix"] = f"scale {self.highres.scale}, first pass {self.highres.steps} steps" + (
                ", latents upscaling" if self.highres.latents_upscaling else ""
            )
            if first_pass:
                data["highres-fix"] += ", first pass image"
        data["model"] = self.model.name
        return data


def _chain(first: list[str], rest: Iterator[str]) -> Iterator[str]:
    yield from first
    yield from rest


def resized(image, size: tuple[int, int]):
    from PIL import Image

    resized = image.resize(size, resample=Image.LANCZOS)
    resized.source_path = getattr(image, "source_path", "")
    return resized
