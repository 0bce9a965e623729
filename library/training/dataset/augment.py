"""Augmentations and the random numbers behind them.

Every random choice of an item comes from ``item_rng(seed, epoch, batch_index, item_index,
purpose)``: its own ``numpy.random.Generator`` per purpose (flip, crop, colour, caption,
template). Nothing reads the global RNG, so an item is the same whichever process or DataLoader
worker builds it, and a run resumed mid-epoch sees the same items as an uninterrupted one.
Separate streams per purpose also mean that turning on, say, ``flip_aug`` does not change the
caption shuffles.

``color_aug`` fixes kohya's: kohya treats RGB pixels as BGR for the hue shift and raises 0-255
values to the gamma power (255**1.05 = 336, clipped), which brightens or darkens far more than
the intended "weak" change. Here both happen on 0-1 RGB values.
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np

from library.training.dataset.images import FaceBox, resize_array


class Purpose(IntEnum):
    """One random stream per kind of decision."""

    FLIP = 1
    CROP = 2
    COLOR = 3
    CAPTION = 4
    TEMPLATE = 5
    FACE = 6


ITEM_STREAM = 2  # separates item streams from the batch-order stream (buckets.ORDER_STREAM)


def item_rng(
    seed: int, epoch: int, batch_index: int, item_index: int, purpose: Purpose
) -> np.random.Generator:
    """The generator for one decision about one item of one batch of one epoch."""
    entropy = [
        seed & 0xFFFFFFFFFFFFFFFF,
        ITEM_STREAM,
        epoch & 0xFFFFFFFF,
        batch_index & 0xFFFFFFFF,
        item_index & 0xFFFFFFFF,
        int(purpose),
    ]
    return np.random.default_rng(np.random.SeedSequence(entropy))


# ----------------------------------------------------------------------------------------------
# geometry


def crop_offset(length: int, target: int, random_crop: bool, rng: np.random.Generator) -> int:
    """Left/top of a crop of ``target`` from ``length``: centred, or uniform with ``random_crop``."""
    spare = length - target
    if spare <= 0:
        return 0
    return int(rng.integers(0, spare + 1)) if random_crop else spare // 2


def cover_size(width: int, height: int, target: tuple[int, int]) -> tuple[int, int]:
    """The smallest size with the same aspect that covers ``target`` = (width, height)."""
    scale = max(target[0] / width, target[1] / height)
    return max(target[0], int(width * scale + 0.5)), max(target[1], int(height * scale + 0.5))


def face_crop(
    pixels: np.ndarray,
    face: FaceBox,
    target: tuple[int, int],
    face_range: tuple[float, float],
    random_crop: bool,
    rng: np.random.Generator,
    interpolation: str | None,
) -> tuple[np.ndarray, tuple[int, int], tuple[int, int, int, int]]:
    """kohya's face-centred crop: scale so the face is 1/range of the crop side, crop around it.

    Returns the crop, the size the image was scaled to, and the crop box in that scaled image.
    Unlike kohya, an image smaller than the target is enlarged instead of failing an assert.
    """
    height, width = pixels.shape[:2]
    target_w, target_h = target
    face_size = max(face.width, face.height)
    short_side = min(target_w, target_h)
    cover = max(target_h / height, target_w / width)
    min_scale = max(cover, min(1.0, max(cover, short_side / (face_size * face_range[1]))))
    max_scale = max(cover, min(1.0, max(min_scale, short_side / (face_size * face_range[0]))))
    scale = min_scale if min_scale >= max_scale else float(rng.uniform(min_scale, max_scale))
    scaled = (max(target_w, int(width * scale + 0.5)), max(target_h, int(height * scale + 0.5)))
    pixels = resize_array(pixels, scaled, interpolation)
    centre = (int(face.cx * scale + 0.5), int(face.cy * scale + 0.5))
    offsets = []
    for length, size, position in ((scaled[0], target_w, centre[0]), (scaled[1], target_h, centre[1])):
        start = position - size // 2
        if random_crop:
            reach = max(length - position, position)
            start += int(rng.integers(0, reach + 1)) + int(rng.integers(0, reach + 1)) - reach
        elif face_range[0] != face_range[1] and face_size > short_side // 10 and face_size >= 40:
            start += int(rng.integers(-(face_size // 20), face_size // 20 + 1))
        offsets.append(max(0, min(start, length - size)))
    left, top = offsets
    box = (left, top, left + target_w, top + target_h)
    return pixels[top : top + target_h, left : left + target_w], scaled, box


# ----------------------------------------------------------------------------------------------
# colour

HUE_SHIFT_LIMIT = 8 / 180  # kohya's +-8 on OpenCV's 0-180 hue scale, as a fraction of the circle
GAMMA_RANGE = (0.95, 1.05)
COLOR_AUG_PROBABILITY = 0.33


def _rgb_to_hsv(rgb: np.ndarray) -> np.ndarray:
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    value = rgb.max(axis=-1)
    chroma = value - rgb.min(axis=-1)
    safe = np.where(chroma > 0, chroma, 1.0)
    hue = np.where(
        value == r, ((g - b) / safe) % 6.0, np.where(value == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0)
    )
    hue = np.where(chroma > 0, hue / 6.0, 0.0)
    saturation = np.where(value > 0, chroma / np.where(value > 0, value, 1.0), 0.0)
    return np.stack([hue, saturation, value], axis=-1)


def _hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    hue, saturation, value = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    sector = np.floor(hue * 6.0)
    fraction = hue * 6.0 - sector
    p = value * (1.0 - saturation)
    q = value * (1.0 - saturation * fraction)
    t = value * (1.0 - saturation * (1.0 - fraction))
    sector = sector.astype(np.int64) % 6
    choices_r = [value, q, p, p, t, value]
    choices_g = [t, value, value, q, p, p]
    choices_b = [p, p, t, value, value, q]
    r = np.choose(sector, choices_r)
    g = np.choose(sector, choices_g)
    b = np.choose(sector, choices_b)
    return np.stack([r, g, b], axis=-1)


def shift_hue(rgb01: np.ndarray, shift: float) -> np.ndarray:
    """Rotate the hue of 0-1 RGB values by ``shift`` (a fraction of the colour circle)."""
    hsv = _rgb_to_hsv(rgb01)
    hsv[..., 0] = (hsv[..., 0] + shift) % 1.0
    return _hsv_to_rgb(hsv)


def color_aug(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """With probability 0.33: a hue shift of up to +-16 degrees or a gamma of 0.95-1.05 (50/50).

    Works on uint8 HxWx3 RGB; the change happens on 0-1 values and the result is uint8 again.
    """
    if rng.random() > COLOR_AUG_PROBABILITY:
        return rgb
    values = rgb.astype(np.float64) / 255.0
    if rng.random() > 0.5:
        values = shift_hue(values, float(rng.uniform(-HUE_SHIFT_LIMIT, HUE_SHIFT_LIMIT)))
    else:
        values = values ** float(rng.uniform(*GAMMA_RANGE))
    return np.clip(np.rint(values * 255.0), 0, 255).astype(np.uint8)


def should_flip(flip_aug: bool, rng: np.random.Generator) -> bool:
    return bool(flip_aug) and bool(rng.random() < 0.5)
