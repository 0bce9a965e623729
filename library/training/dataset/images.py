"""Reading images: which files count, their size, pixels with EXIF orientation, alpha, resizing.

Differences from kohya, on purpose:
- EXIF orientation is applied, to the pixels and to the size used for bucketing (kohya reads the
  stored size and pixels, so phone photos train sideways).
- A transparent image is composited onto white unless its alpha is wanted as a mask (kohya drops
  the alpha, leaving whatever colour the transparent pixels happen to store).
- Extensions match in any letter case (kohya lists only lower and upper case).
- A file that cannot be read ends in a ``UserError`` naming it, never a PIL traceback.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from library.errors import UserError
from library.images import IMAGE_EXTENSIONS, open_image

logger = logging.getLogger(__name__)

EXIF_ORIENTATION = 0x0112
_TRANSPOSED_ORIENTATIONS = {5, 6, 7, 8}  # 90-degree turns swap width and height


def is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS


def list_images(folder: Path) -> list[Path]:
    """The image files directly in ``folder`` (not in sub-folders, as kohya), sorted by name; a link
    named like an image whose target is gone is listed too, so that reading it reports it."""
    return sorted(
        p
        for p in folder.iterdir()
        if is_image_file(p) or (p.is_symlink() and p.suffix.lower() in IMAGE_EXTENSIONS)
    )


class ImageReadError(Exception):
    """An image that cannot be opened; collected so that one message can list all of them."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


def read_image_size(path: Path) -> tuple[int, int]:
    """(width, height) as displayed, i.e. after EXIF rotation, read from the header only."""
    try:
        if path.is_symlink() and not path.exists():
            raise ImageReadError(path, f"a link to {path.readlink()}, which does not exist")
        if path.stat().st_size == 0:
            raise ImageReadError(path, "the file is empty (0 bytes)")
        with Image.open(path) as image:
            width, height = image.size
            orientation = image.getexif().get(EXIF_ORIENTATION, 1)
    except ImageReadError:
        raise
    except UnidentifiedImageError:
        raise ImageReadError(path, "not an image Pillow can read") from None
    except Image.DecompressionBombError as exc:
        raise ImageReadError(path, f"far too large to read safely ({exc})") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageReadError(path, f"cannot read the image ({exc})") from None
    if orientation in _TRANSPOSED_ORIENTATIONS:
        return height, width
    return width, height


def unreadable_images_error(bad: list[ImageReadError], good_count: int) -> UserError:
    """One message for all unreadable images: the first few, and how many others are fine."""
    first = bad[0]
    others = f"; {len(bad) - 1} more unreadable ({', '.join(e.path.name for e in bad[1:4])}{'...' if len(bad) > 4 else ''})"
    return UserError(
        f"cannot read image {first.path}: {first.reason}"
        f"{others if len(bad) > 1 else ''}; {good_count} other images are fine. "
        "Replace or remove the broken files."
    )


def load_image(path: Path, keep_alpha: bool) -> np.ndarray:
    """Pixels as uint8 HxWx3, or HxWx4 with ``keep_alpha``, read by the shared rule
    (``library.images.open_image``: EXIF orientation, 16-bit greys, transparency)."""
    return np.asarray(open_image(path, keep_alpha=keep_alpha), dtype=np.uint8).copy()


def load_mask_image(path: Path, expected_size: tuple[int, int]) -> np.ndarray:
    """A conditioning (mask) image as uint8 HxW from its red channel, like kohya's masked loss."""
    pixels = load_image(path, keep_alpha=False)
    height, width = pixels.shape[:2]
    if (width, height) != tuple(expected_size):
        raise UserError(
            f"mask image {path} is {width}x{height} but its training image is "
            f"{expected_size[0]}x{expected_size[1]}; masks must have the same size"
        )
    return pixels[:, :, 0].copy()


_PIL_FILTERS = {
    "lanczos": Image.Resampling.LANCZOS,
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "linear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "cubic": Image.Resampling.BICUBIC,
    "area": Image.Resampling.BOX,  # box filtering is area averaging when shrinking
    "box": Image.Resampling.BOX,
}


def resize_filter(src: tuple[int, int], dst: tuple[int, int], interpolation: str | None) -> Image.Resampling:
    """kohya's default: area averaging to shrink, Lanczos to enlarge; a named filter for both."""
    if interpolation is not None:
        return _PIL_FILTERS[interpolation]
    shrinking = src[0] > dst[0] and src[1] > dst[1]
    return Image.Resampling.BOX if shrinking else Image.Resampling.LANCZOS


def resize_array(pixels: np.ndarray, size: tuple[int, int], interpolation: str | None) -> np.ndarray:
    """Resize an HxWxC (or HxW) uint8 array to ``size`` = (width, height), channel by channel.

    Channels are resized separately so that an alpha channel is not premultiplied into the colours.
    """
    height, width = pixels.shape[:2]
    if (width, height) == tuple(size):
        return pixels
    chosen = resize_filter((width, height), size, interpolation)
    if pixels.ndim == 2:
        return np.asarray(Image.fromarray(pixels).resize(size, chosen))
    channels = [
        np.asarray(Image.fromarray(pixels[:, :, c]).resize(size, chosen)) for c in range(pixels.shape[2])
    ]
    return np.stack(channels, axis=2)


@dataclass(frozen=True)
class FaceBox:
    """A face position encoded in the file name: ``name_<cx>_<cy>_<w>_<h>.png`` (kohya's convention)."""

    cx: int
    cy: int
    width: int
    height: int


def face_box_from_name(path: Path) -> FaceBox | None:
    parts = path.stem.split("_")
    if len(parts) < 5:
        return None
    try:
        cx, cy, width, height = (int(p) for p in parts[-4:])
    except ValueError:
        return None
    if width <= 0 or height <= 0:
        return None
    return FaceBox(cx, cy, width, height)
