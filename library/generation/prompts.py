"""The prompt language of kohya's ``gen_img_diffusers.py`` and the WebUI, in three layers.

1. **Dynamic prompts** (kohya): ``{a|b|c}`` picks one variant at random, ``{e$$a|b}`` expands
   into one prompt per variant, ``{2$$a|b|c}`` / ``{1-3$$a|b|c}`` pick several distinct
   variants joined by ``", "`` (or by a custom separator: ``{2$$ and $$a|b|c}``).
2. **In-prompt options** (kohya): ``a cat --n blurry --w 768 --h 512 --s 30 --d 1,2 --l 7
   --nl 4 --ss euler_a --am 0.8,0.5``: the line is split on ``" --"``.
3. **Attention weights** (WebUI / kohya "lpw"), ``library.text.weighting``.

kohya applies them in that order: dynamic variants first (so ``--n {a|b}`` varies too), then
the options, then the weights of the remaining prompt text.
"""

from __future__ import annotations

import itertools
import logging
import random
import re
from dataclasses import dataclass, field

from library.generation.samplers import SAMPLER_NAMES
from library.images import MAX_RESOLUTION

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# 1. Dynamic prompts

# {[e$$][count$$][separator$$]variant|variant|...}: the three optional prefixes end in "$$".
_DYNAMIC = re.compile(
    r"\{"
    r"(?P<enumerate>[eE]\$\$)?"
    r"(?:(?P<count>[\d\-]+)\$\$)?"
    r"(?:(?P<separator>[^|}]+?)\$\$)?"
    r"(?P<variants>.+?(?:\|.+?)*?)"
    r"\}"
)
DEFAULT_SEPARATOR = ", "


@dataclass(frozen=True)
class _Variants:
    """One ``{...}`` group: which variants, how many to pick, how to join them."""

    variants: list[str]
    low: int
    high: int
    separator: str
    enumerate_all: bool

    def all_choices(self) -> list[str]:
        return [
            self.separator.join(combination)
            for count in range(self.low, self.high + 1)
            for combination in itertools.combinations(self.variants, count)
        ]

    def random_choice(self, rng: random.Random) -> str:
        # randint then sample, in this order, so a seeded rng gives the same picks as kohya's
        count = rng.randint(self.low, self.high)
        return self.separator.join(rng.sample(self.variants, count))


def _count_range(text: str | None, num_variants: int, group: str) -> tuple[int, int]:
    """``"2"`` -> (2, 2), ``"1-3"`` -> (1, 3); clamped to what the variants allow."""
    if text is None:
        return 1, 1
    parts = text.split("-")
    if len(parts) > 2 or not all(part.isdigit() for part in parts):
        logger.warning("invalid count '%s' in %s; choosing one variant", text, group)
        return 1, 1
    low, high = int(parts[0]), int(parts[-1])
    low, high = min(low, high), max(low, high)
    high = min(high, num_variants)
    return min(low, high), high


def _parse_group(match: re.Match[str]) -> _Variants:
    variants = match.group("variants").split("|")
    low, high = _count_range(match.group("count"), len(variants), match.group(0))
    separator = match.group("separator")
    return _Variants(
        variants=variants,
        low=low,
        high=high,
        separator=DEFAULT_SEPARATOR if separator is None else separator,
        enumerate_all=match.group("enumerate") is not None,
    )


def expand_dynamic_prompt(prompt: str, rng: random.Random, *, repeat_count: int = 1) -> list[str]:
    """Expand kohya's ``{...}`` variants into concrete prompts.

    Mirrors kohya's ``handle_dynamic_prompt_variants``: a prompt without groups comes back as
    ``[prompt]`` (the caller repeats it); with only random groups, ``repeat_count`` independently
    drawn prompts (kohya passes ``--images_per_prompt``); with any ``e$$`` group, one prompt per
    combination of the enumerated groups, each with its own random picks for the other groups.
    Random draws use ``rng`` in kohya's order, so a seeded ``random.Random`` is reproducible.
    """
    matches = list(_DYNAMIC.finditer(prompt))
    if not matches:
        return [prompt]
    groups = [_parse_group(m) for m in matches]
    # the text around the groups: literal[0] group[0] literal[1] group[1] ... literal[-1]
    bounds = [0, *itertools.chain.from_iterable(m.span() for m in matches), len(prompt)]
    literals = [prompt[bounds[i] : bounds[i + 1]] for i in range(0, len(bounds), 2)]

    def assemble(choices: list[str]) -> str:
        return "".join(itertools.chain.from_iterable(zip(literals, [*choices, ""])))

    if not any(group.enumerate_all for group in groups):
        return [assemble([group.random_choice(rng) for group in groups]) for _ in range(repeat_count)]

    picks: list[list[str | None]] = [[None] * len(groups)]
    for index, group in enumerate(groups):
        if group.enumerate_all:
            picks = [[*p[:index], choice, *p[index + 1 :]] for p in picks for choice in group.all_choices()]
    for index, group in enumerate(groups):  # kohya draws group by group, prompt by prompt
        if not group.enumerate_all:
            for p in picks:
                p[index] = group.random_choice(rng)
    return [assemble(p) for p in picks]


# ---------------------------------------------------------------------------------------------
# 2. In-prompt options

SAMPLERS = SAMPLER_NAMES

# options kohya's scripts understand but this project does not implement
UNSUPPORTED_OPTIONS = {
    "t": "img2img strength",
    "c": "CLIP guidance prompt",
    "dsd1": "Deep Shrink",
    "dst1": "Deep Shrink",
    "dsd2": "Deep Shrink",
    "dst2": "Deep Shrink",
    "dsr": "Deep Shrink",
    "glt": "gradual latent",
    "glr": "gradual latent",
    "gle": "gradual latent",
    "gls": "gradual latent",
    "glsn": "gradual latent",
    "glus": "gradual latent",
    "f": "frame count / file name",
    "g": "distilled guidance scale",
    "cn": "ControlNet image",
    "i": "inpainting image",
}

_UNSIGNED_INT = re.compile(r"\d+")
_UNSIGNED_FLOAT = re.compile(r"\d+(?:\.\d*)?|\.\d+")
_SEED_LIST = re.compile(r"\d+(?:\s*,\s*\d+)*")
_SIGNED_FLOAT = r"-?(?:\d+(?:\.\d*)?|\.\d+)"
_FLOAT_LIST = re.compile(rf"{_SIGNED_FLOAT}(?:\s*,\s*{_SIGNED_FLOAT})*")


@dataclass
class SDXLSizes:
    """SDXL's size conditioning of generated images (kohya's ``--original_width`` ... ``--crop_left``,
    in prompts ``--ow --oh --nw --nh --ct --cl``); ``None`` is kohya's default: the original size
    is the image's size, the negative prompt's original size the original size, the crop 0."""

    original_width: int | None = None
    original_height: int | None = None
    original_width_negative: int | None = None
    original_height_negative: int | None = None
    crop_top: int | None = None
    crop_left: int | None = None

    def given(self) -> bool:
        return any(value is not None for value in vars(self).values())

    def over(self, defaults: SDXLSizes) -> SDXLSizes:
        """These values where given, else ``defaults``'."""
        return SDXLSizes(
            **{
                name: default if value is None else value
                for (name, value), default in zip(vars(self).items(), vars(defaults).values())
            }
        )


SDXL_SIZE_OPTIONS = {
    "ow": "original_width",
    "oh": "original_height",
    "nw": "original_width_negative",
    "nh": "original_height_negative",
    "ct": "crop_top",
    "cl": "crop_left",
}


@dataclass
class PromptSpec:
    """One prompt line with its in-prompt options; ``None`` means "not given, use the default".

    ``negative_scale_off`` is ``--nl none``: switch the negative scale off for this prompt even
    when ``--negative_scale`` is set on the command line. ``network_multipliers`` is ``--am``:
    the LoRA files' strengths for this prompt, in ``--network_weights`` order.
    """

    prompt: str
    negative_prompt: str | None = None
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    seeds: list[int] | None = None
    scale: float | None = None
    negative_scale: float | None = None
    sampler: str | None = None
    negative_scale_off: bool = False
    sizes: SDXLSizes = field(default_factory=lambda: SDXLSizes())
    network_multipliers: list[float] | None = None


def _ignored_value(key: str, value: str, expected: str) -> None:
    logger.warning("prompt option --%s: '%s' is not %s; option ignored", key, value, expected)


def _apply_option(spec: PromptSpec, key: str, value: str) -> None:
    """Set one ``--key value`` on ``spec``; bad values and unknown keys are warned about, as kohya
    does not stop a batch of prompts for one typo."""
    if key == "n":
        spec.negative_prompt = value
    elif key in SDXL_SIZE_OPTIONS:
        if not _UNSIGNED_INT.fullmatch(value):
            return _ignored_value(key, value, "a whole number of pixels")
        setattr(spec.sizes, SDXL_SIZE_OPTIONS[key], int(value))
    elif key in ("w", "h"):
        if not _UNSIGNED_INT.fullmatch(value) or not 0 < int(value) <= MAX_RESOLUTION:  # 0: the default
            return _ignored_value(key, value, f"a whole number of pixels from 1 to {MAX_RESOLUTION}")
        setattr(spec, "width" if key == "w" else "height", int(value))
    elif key == "s":
        if not _UNSIGNED_INT.fullmatch(value):
            return _ignored_value(key, value, "a whole number of steps")
        spec.steps = max(1, min(1000, int(value)))  # kohya's clamp
    elif key == "d":
        if not _SEED_LIST.fullmatch(value):
            return _ignored_value(key, value, "a seed or a comma-separated list of seeds")
        spec.seeds = [int(seed) for seed in value.split(",")]
    elif key in ("l", "nl"):
        if key == "nl" and value.lower() == "none":
            spec.negative_scale, spec.negative_scale_off = None, True
        elif not _UNSIGNED_FLOAT.fullmatch(value):
            return _ignored_value(key, value, "a number" + (" or 'none'" if key == "nl" else ""))
        elif key == "l":
            spec.scale = float(value)
        else:
            spec.negative_scale, spec.negative_scale_off = float(value), False
    elif key == "ss":
        if value.lower() not in SAMPLERS:
            return _ignored_value(key, value, "a sampler (one of " + ", ".join(SAMPLERS) + ")")
        spec.sampler = value.lower()
    elif key == "am":
        if not _FLOAT_LIST.fullmatch(value):
            return _ignored_value(key, value, "a strength or a comma-separated list of strengths")
        spec.network_multipliers = [float(strength) for strength in value.split(",")]
    elif key in UNSUPPORTED_OPTIONS:
        logger.warning(
            "prompt option --%s (%s) is not supported here; ignored", key, UNSUPPORTED_OPTIONS[key]
        )
    else:
        logger.warning("unknown prompt option --%s; ignored", key)


def parse_prompt_options(line: str) -> PromptSpec:
    """Split a prompt line on ``" --"`` into the prompt and kohya's in-prompt options.

    Option names are case-insensitive (``--W`` = ``--w``); a later option overrides an earlier
    one. The prompt keeps everything before the first ``" --"``.
    """
    head, *options = line.strip().split(" --")
    spec = PromptSpec(prompt=head.strip())
    for option in options:
        key, _, value = option.strip().partition(" ")
        if not key:
            logger.warning("empty prompt option '--' in '%s'; ignored", line.strip())
            continue
        _apply_option(spec, key.lower(), value.strip())
    return spec
