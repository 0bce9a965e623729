"""Captions: reading caption files, kohya's caption processing, and the Textual Inversion rules.

``process_caption`` follows kohya's order: prefix/suffix, caption dropout, wildcards (or the first
line), fixed/flexible parts with token warm-up, shuffling and tag dropout, then the secondary
separator. All randomness comes from the ``numpy.random.Generator`` passed in, so a caption is a
pure function of its inputs (see ``augment.item_rng``).

Fixes over kohya:
- ``keep_tokens_separator`` is removed from the text even when nothing is shuffled (kohya leaves
  ``|||`` in the caption unless shuffling, warm-up or tag dropout is on).
- The Textual Inversion token is expanded as a whole word (``library.text.tokens.expand_placeholder``);
  kohya's ``str.replace`` also rewrites ``sks`` inside ``sksy`` or ``sks1``.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from library.errors import UserError
from library.text.tokens import expand_placeholder, placeholder_names

logger = logging.getLogger(__name__)

# The prompt templates of the Textual Inversion paper (Gal et al. 2022), as kohya uses them:
# "{}" is filled with the placeholder tokens.
OBJECT_TEMPLATES = (
    "a photo of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "a photo of a clean {}",
    "a photo of a dirty {}",
    "a dark photo of the {}",
    "a photo of my {}",
    "a photo of the cool {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a cropped photo of a {}",
    "a photo of the {}",
    "a good photo of the {}",
    "a photo of one {}",
    "a close-up photo of the {}",
    "a rendition of the {}",
    "a photo of the clean {}",
    "a rendition of a {}",
    "a photo of a nice {}",
    "a good photo of a {}",
    "a photo of the nice {}",
    "a photo of the small {}",
    "a photo of the weird {}",
    "a photo of the large {}",
    "a photo of a cool {}",
    "a photo of a small {}",
)

STYLE_TEMPLATES = (
    "a painting in the style of {}",
    "a rendering in the style of {}",
    "a cropped painting in the style of {}",
    "the painting in the style of {}",
    "a clean painting in the style of {}",
    "a dirty painting in the style of {}",
    "a dark painting in the style of {}",
    "a picture in the style of {}",
    "a cool painting in the style of {}",
    "a close-up painting in the style of {}",
    "a bright painting in the style of {}",
    "a cropped painting in the style of {}",
    "a good painting in the style of {}",
    "a close-up painting in the style of {}",
    "a rendition in the style of {}",
    "a nice painting in the style of {}",
    "a small painting in the style of {}",
    "a weird painting in the style of {}",
    "a large painting in the style of {}",
)

TEMPLATES = {"object": OBJECT_TEMPLATES, "style": STYLE_TEMPLATES}


@dataclass
class TokenCaptionRule:
    """The Textual Inversion caption rules the trainer asks for.

    ``token_string`` is replaced by ``tok tok1 ... tok{N-1}`` wherever it is a whole word; with a
    ``template`` ("object" or "style", from --use_object_template / --use_style_template) every
    caption is replaced by a random template of the paper filled with those tokens.
    """

    token_string: str
    num_vectors: int
    template: str | None = None

    def __post_init__(self) -> None:
        if not self.token_string or not self.token_string.strip():
            raise UserError("--token_string: give the word that stands for the new concept (e.g. sks)")
        if self.num_vectors < 1:
            raise UserError("--num_vectors_per_token must be at least 1")
        if self.template is not None and self.template not in TEMPLATES:
            raise UserError(f"unknown caption template {self.template!r}: use 'object' or 'style'")

    @property
    def expanded(self) -> str:
        return " ".join(placeholder_names(self.token_string, self.num_vectors))

    def apply(self, caption: str, rng: np.random.Generator) -> str:
        if self.template is not None:
            templates = TEMPLATES[self.template]
            return templates[int(rng.integers(len(templates)))].format(self.expanded)
        return expand_placeholder(caption, self.token_string, self.num_vectors)


@dataclass(frozen=True)
class CaptionSettings:
    """The caption options of one subset (see ``config.SubsetParams``)."""

    shuffle_caption: bool = False
    caption_separator: str = ","
    keep_tokens: int = 0
    keep_tokens_separator: str | None = None
    secondary_separator: str | None = None
    enable_wildcard: bool = False
    caption_prefix: str | None = None
    caption_suffix: str | None = None
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0
    token_warmup_min: int = 1
    token_warmup_step: float = 0.0

    @classmethod
    def from_subset(cls, subset) -> CaptionSettings:
        return cls(**{name: getattr(subset, name) for name in cls.__dataclass_fields__})


def read_caption_file(path: Path, enable_wildcard: bool) -> str | None:
    """The caption in ``path``: its first line, or all non-empty lines with wildcards enabled.

    Returns None for an empty file, so that the class tokens are used instead.
    """
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise UserError(f"caption file {path} is not UTF-8 text; save it as UTF-8") from None
    except OSError as exc:
        raise UserError(f"cannot read caption file {path}: {exc}") from None
    lines = [line.strip() for line in text.splitlines()]
    if enable_wildcard:
        lines = [line for line in lines if line]
        return "\n".join(lines) if lines else None
    return lines[0] if lines and lines[0] else None


def caption_candidates(image_path: Path, extension: str) -> list[Path]:
    """Caption files for an image: ``name.ext``, then (face-crop names) ``name`` without ``_cx_cy_w_h``."""
    candidates = [image_path.with_name(image_path.stem + extension)]
    parts = image_path.stem.split("_")
    if len(parts) >= 5:
        candidates.append(image_path.with_name("_".join(parts[:-4]) + extension))
    return candidates


def join_separator(separator: str) -> str:
    """Parts are rejoined with the separator and one space (", " for the default ",")."""
    return separator.strip() + " " if separator.strip() else separator


def warmup_length(
    flexible_count: int, settings: CaptionSettings, step: int, max_train_steps: int
) -> int | None:
    """How many flexible parts token warm-up allows at ``step``, or None when there is no warm-up."""
    warmup_steps = settings.token_warmup_step
    if 0 < warmup_steps < 1:
        warmup_steps = math.floor(warmup_steps * max_train_steps)
    if not warmup_steps or step >= warmup_steps:
        return None
    grown = math.floor(step * ((flexible_count - settings.token_warmup_min) / warmup_steps))
    return grown + settings.token_warmup_min


def _split(text: str, separator: str) -> list[str]:
    return [part.strip() for part in text.split(separator) if part.strip()]


def _choose_wildcards(caption: str, rng: np.random.Generator) -> str:
    """One line of a multi-line caption, then one option of each ``{a|b|c}``; ``{{``/``}}`` are literal."""
    lines = caption.split("\n")
    caption = lines[int(rng.integers(len(lines)))] if len(lines) > 1 else caption
    open_mark, close_mark = "\x00\x01", "\x00\x02"  # placeholders without braces
    caption = caption.replace("{{", open_mark).replace("}}", close_mark)

    def choose(match: re.Match) -> str:
        options = match.group(1).split("|")
        return options[int(rng.integers(len(options)))]

    caption = re.sub(r"\{([^{}]+)\}", choose, caption)
    return caption.replace(open_mark, "{").replace(close_mark, "}")


def process_caption(
    caption: str,
    settings: CaptionSettings,
    rng: np.random.Generator,
    *,
    epoch: int = 0,
    step: int = 0,
    max_train_steps: int = 0,
) -> str:
    """The caption text the model sees, before the Textual Inversion token rule.

    ``epoch`` counts from 0 (``caption_dropout_every_n_epochs`` drops the captions of epochs
    N, 2N, ... counted from 1, as kohya does).
    """
    if settings.caption_prefix:
        caption = settings.caption_prefix + " " + caption
    if settings.caption_suffix:
        caption = caption + " " + settings.caption_suffix

    drop = settings.caption_dropout_rate > 0 and rng.random() < settings.caption_dropout_rate
    every = settings.caption_dropout_every_n_epochs
    if drop or (every > 0 and (epoch + 1) % every == 0):
        return ""

    if settings.enable_wildcard:
        caption = _choose_wildcards(caption, rng)
    else:
        caption = caption.split("\n")[0]

    separator = settings.caption_separator
    keep_separator = settings.keep_tokens_separator
    has_fixed_parts = bool(keep_separator) and keep_separator in caption
    rearrange = (
        settings.shuffle_caption
        or settings.token_warmup_step > 0
        or settings.caption_tag_dropout_rate > 0
        or has_fixed_parts
    )
    if rearrange:
        caption = _rearrange(caption, settings, rng, step, max_train_steps)

    if settings.secondary_separator:
        caption = caption.replace(settings.secondary_separator, separator)
    return caption


def _rearrange(
    caption: str, settings: CaptionSettings, rng: np.random.Generator, step: int, max_train_steps: int
) -> str:
    separator = settings.caption_separator
    keep_separator = settings.keep_tokens_separator
    fixed_suffix: list[str] = []
    if keep_separator and keep_separator in caption:
        fixed_text, flexible_text = caption.split(keep_separator, 1)
        if keep_separator in flexible_text:
            flexible_text, suffix_text = flexible_text.split(keep_separator, 1)
            fixed_suffix = _split(suffix_text.replace(keep_separator, separator), separator)
        fixed = _split(fixed_text, separator)
        flexible = _split(flexible_text, separator)
    else:
        parts = _split(caption, separator)
        fixed, flexible = parts[: settings.keep_tokens], parts[settings.keep_tokens :]

    allowed = warmup_length(len(flexible), settings, step, max_train_steps)
    if allowed is not None:
        flexible = flexible[: max(allowed, 0)]
    if settings.shuffle_caption:
        flexible = [flexible[i] for i in rng.permutation(len(flexible))]
    if settings.caption_tag_dropout_rate > 0:
        flexible = [part for part in flexible if rng.random() >= settings.caption_tag_dropout_rate]
    return join_separator(separator).join(fixed + flexible + fixed_suffix)
