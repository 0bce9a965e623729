"""The shapes world: the pictures, captions and judge behind the project's small real model.

A picture is one flat-coloured shape on a plain neutral background, 64 x 64 pixels. Six shapes
have plain English names; a seventh, the *concept*, is a heart that the model learns under the
invented word ``dax`` (a nonsense word from language-learning experiments; nobody would guess
it). The generic word ``shape`` appears in a share of the captions of every shape, including the
heart, so it means "any shape": Textual Inversion starts from it and has to find, from pictures
alone, a vector that draws hearts.

The judge needs no training: shapes are saturated colours and backgrounds are neutral, so the
shape is the set of strongly coloured pixels. Its colour is the nearest palette colour to their
mean, and its kind is the template (each shape rendered and cropped to its bounding box) that
overlaps the cropped mask best. Fixed orientation keeps that rule exact on clean renders.

Everything here is a pure function of its arguments (a ``numpy`` generator for randomness).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

SIZE = 64  # pixels per side
SUPERSAMPLE = 4  # drawn at 4x and averaged down, for smooth edges

SHAPES = ("circle", "square", "triangle", "star", "cross", "ring")  # named in captions
CONCEPT_SHAPE = "heart"  # drawn, but only ever named by CONCEPT_WORD (or the generic word)
CONCEPT_WORD = "dax"
GENERIC_WORD = "shape"
ALL_SHAPES = (*SHAPES, CONCEPT_SHAPE)
# A glyph the model never saw, for the pivotal-tuning evaluation only (bench/pivotal.py): it is in
# no training picture of the model and the judge knows it only when asked to (``judge(extra=...)``).
NEW_GLYPH = "arrow"

COLORS = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (40, 70, 225),
    "yellow": (240, 210, 20),
    "purple": (140, 40, 185),
    "orange": (245, 130, 20),
}
BACKGROUNDS = {"white": 240, "gray": 128, "black": 24}  # grey levels

# caption templates: {c} colour, {s} shape word, {b} background; "a" before every colour keeps
# the grammar of a prompt users would type ("a orange dax" is fine in this world)
TEMPLATES = (
    "a {c} {s}",
    "a photo of a {c} {s}",
    "a {c} {s} on a {b} background",
    "a drawing of a {c} {s}",
    "{c} {s}",
    "a {s}",
    "a {s} on a {b} background",
)
GENERIC_SHARE = 0.25  # captions that say "shape" instead of the shape's own word
MIN_RADIUS, MAX_RADIUS = 12, 25  # half the shape's extent, in pixels
COLOR_JITTER = 12  # per channel, on the shape
BACKGROUND_JITTER = 14  # on the grey level; backgrounds stay neutral (equal channels)

# the judge: a pixel belongs to the shape when its chroma (max - min channel) is above this
CHROMA_THRESHOLD = 70
MIN_SHAPE_PIXELS = 20
TEMPLATE_SIZE = 24


@dataclass(frozen=True)
class Scene:
    shape: str
    color: str
    background: str
    radius: float
    center: tuple[float, float]
    rgb: tuple[int, int, int]  # the shape's colour after jitter
    grey: int  # the background's level after jitter


# ---------------------------------------------------------------------------------------------
# drawing


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "triangle":
        return [(cx, cy - r), (cx + r * 0.95, cy + r * 0.8), (cx - r * 0.95, cy + r * 0.8)]
    if shape == "star":
        points = []
        for i in range(10):
            radius = r if i % 2 == 0 else r * 0.45
            angle = -math.pi / 2 + i * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        return points
    if shape == "arrow":  # pointing right: a shaft and a head, unlike any shape of the world
        shaft, head, neck = r * 0.28, r * 0.8, cx + r * 0.1
        return [
            (cx - r, cy - shaft),
            (neck, cy - shaft),
            (neck, cy - head),
            (cx + r, cy),
            (neck, cy + head),
            (neck, cy + shaft),
            (cx - r, cy + shaft),
        ]
    if shape == "heart":
        points = []
        for i in range(64):
            t = 2 * math.pi * i / 64
            x = 16 * math.sin(t) ** 3
            y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
            points.append((cx + r * x / 16.5, cy - r * (y + 2.5) / 15))
        return points
    raise ValueError(shape)


def draw_shape(
    draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill, background
) -> None:
    """One shape on ``draw``, centred at (cx, cy), extending about ``r`` each way."""
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        inner = r * 0.55
        draw.ellipse([cx - inner, cy - inner, cx + inner, cy + inner], fill=background)
    elif shape == "square":
        half = r * 0.85
        draw.rectangle([cx - half, cy - half, cx + half, cy + half], fill=fill)
    elif shape == "cross":
        arm, half = r * 0.9, r * 0.3
        draw.rectangle([cx - arm, cy - half, cx + arm, cy + half], fill=fill)
        draw.rectangle([cx - half, cy - arm, cx + half, cy + arm], fill=fill)
    else:
        draw.polygon(_polygon(shape, cx, cy, r), fill=fill)


def render(scene: Scene) -> Image.Image:
    """The 64 x 64 RGB picture of ``scene``."""
    big = SIZE * SUPERSAMPLE
    background = (scene.grey,) * 3
    image = Image.new("RGB", (big, big), background)
    cx, cy = (c * SUPERSAMPLE for c in scene.center)
    draw_shape(ImageDraw.Draw(image), scene.shape, cx, cy, scene.radius * SUPERSAMPLE, scene.rgb, background)
    return image.resize((SIZE, SIZE), Image.BOX)


def random_scene(
    rng: np.random.Generator,
    shape: str | None = None,
    color: str | None = None,
    background: str | None = None,
) -> Scene:
    """A scene with the given shape/colour/background (random when ``None``) at a random size and place."""
    shape = shape or ALL_SHAPES[rng.integers(len(ALL_SHAPES))]
    color = color or list(COLORS)[rng.integers(len(COLORS))]
    drawn = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]  # drawn always: the same pictures as before
    background = background or drawn
    radius = float(rng.uniform(MIN_RADIUS, MAX_RADIUS))
    margin = radius + 2
    center = (float(rng.uniform(margin, SIZE - margin)), float(rng.uniform(margin, SIZE - margin)))
    rgb = tuple(
        int(np.clip(v + rng.integers(-COLOR_JITTER, COLOR_JITTER + 1), 0, 255)) for v in COLORS[color]
    )
    grey = int(
        np.clip(BACKGROUNDS[background] + rng.integers(-BACKGROUND_JITTER, BACKGROUND_JITTER + 1), 0, 255)
    )
    return Scene(shape, color, background, radius, center, rgb, grey)


# ---------------------------------------------------------------------------------------------
# captions


def shape_word(shape: str) -> str:
    """The word the base model learns for a shape: its name, or the concept's invented word."""
    return CONCEPT_WORD if shape == CONCEPT_SHAPE else shape


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """A caption of ``scene`` in one of the templates; a share say ``shape`` instead of the name."""
    template = TEMPLATES[rng.integers(len(TEMPLATES))]
    word = GENERIC_WORD if rng.random() < GENERIC_SHARE else shape_word(scene.shape)
    return template.format(c=scene.color, s=word, b=scene.background)


def prompts_for(word: str, color: str | None = None) -> list[str]:
    """Prompts in the model's caption templates that name ``word``; with ``color``, only those
    that also name the colour (a background is named as ``gray``, which every shape colour
    stands out on)."""
    chosen = [t for t in TEMPLATES if ("{c}" in t) == (color is not None)]
    return [t.format(c=color, s=word, b="gray") for t in chosen]


# ---------------------------------------------------------------------------------------------
# the judge


@dataclass(frozen=True)
class Verdict:
    shape: str | None  # None: no shape found
    color: str | None
    background: str | None = None  # the nearest background grey to the pixels away from the shape


def shape_mask(pixels: np.ndarray) -> np.ndarray:
    """The largest connected group of strongly coloured pixels (a boolean ``[H, W]`` mask)."""
    chroma = pixels.max(axis=2).astype(np.int16) - pixels.min(axis=2)
    coloured = chroma > CHROMA_THRESHOLD
    labels, count = ndimage.label(coloured)
    if count == 0:
        return coloured
    sizes = ndimage.sum(coloured, labels, index=range(1, count + 1))
    return labels == (1 + int(np.argmax(sizes)))


def _normalised(mask: np.ndarray) -> np.ndarray | None:
    """The mask cropped to its bounding box and resized to TEMPLATE_SIZE x TEMPLATE_SIZE."""
    rows, cols = np.nonzero(mask)
    if len(rows) < MIN_SHAPE_PIXELS:
        return None
    crop = mask[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].astype(np.float32)
    image = Image.fromarray(crop * 255).convert("L")
    return np.asarray(image.resize((TEMPLATE_SIZE, TEMPLATE_SIZE), Image.BILINEAR), np.float32) / 255


@cache
def _templates(extra: tuple[str, ...] = ()) -> dict[str, list[np.ndarray]]:
    """Each shape (and each ``extra`` one) rendered at a few sizes, judged by the same mask rule, normalised."""
    templates: dict[str, list[np.ndarray]] = {}
    for shape in (*ALL_SHAPES, *extra):
        templates[shape] = []
        for radius in (MIN_RADIUS, (MIN_RADIUS + MAX_RADIUS) / 2, MAX_RADIUS):
            scene = Scene(shape, "red", "gray", radius, (SIZE / 2, SIZE / 2), COLORS["red"], 128)
            templates[shape].append(_normalised(shape_mask(np.asarray(render(scene)))))
    return templates


def judge(image: Image.Image, extra: tuple[str, ...] = ()) -> Verdict:
    """The shape (by best template overlap) and colour (nearest palette colour) in ``image``;
    ``extra``: shapes outside the world the judge should also recognise (``NEW_GLYPH``)."""
    pixels = np.asarray(image.convert("RGB").resize((SIZE, SIZE), Image.BOX))
    mask = shape_mask(pixels)
    normal = _normalised(mask)
    if normal is None:
        return Verdict(None, None)
    mean = pixels[mask].reshape(-1, 3).mean(axis=0)
    color = min(COLORS, key=lambda name: float(np.sum((np.array(COLORS[name]) - mean) ** 2)))

    def overlap(template: np.ndarray) -> float:
        return float(np.minimum(normal, template).sum() / np.maximum(normal, template).sum())

    templates = _templates(tuple(extra))
    shape = max(templates, key=lambda name: max(overlap(t) for t in templates[name]))
    return Verdict(shape, color, _background(pixels, mask))


def _background(pixels: np.ndarray, mask: np.ndarray) -> str:
    """The background grey nearest to the mean of the pixels two or more pixels away from the shape."""
    away = ~ndimage.binary_dilation(mask, iterations=2)
    level = float(pixels[away].mean()) if away.any() else float(pixels.mean())
    return min(BACKGROUNDS, key=lambda name: abs(BACKGROUNDS[name] - level))
