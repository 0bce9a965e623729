"""Reading images, one rule for the trainer's pictures and the generator's source images and masks.

Which files count as images, and how one is opened: EXIF orientation applied (phone photos are
stored sideways), 16-bit greys scaled rather than clipped, transparency composited onto white
unless the alpha is wanted (as a loss mask), and every failure a one-line ``UserError`` naming
the file instead of a PIL traceback.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError, features

from library.errors import UserError

BASE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

# The largest side a run trains or generates at. Models are trained at 512 to 2048; a typo's size
# (10240 for 1024) exhausts memory while the picture is read or the latents are made, and the kernel
# then ends the run without a word.
MAX_RESOLUTION = 8192


def _optional_extensions() -> tuple[str, ...]:
    """AVIF and JPEG XL only when a Pillow plugin can decode them."""
    extra = []
    try:
        if features.check("avif"):
            extra.append(".avif")
    except Exception:  # pragma: no cover - very old Pillow
        pass
    if ".avif" not in extra:
        try:
            import pillow_avif  # noqa: F401

            extra.append(".avif")
        except ImportError:
            pass
    for plugin in ("pillow_jxl", "jxlpy"):
        try:
            __import__(plugin)
            extra.append(".jxl")
            break
        except ImportError:
            continue
    return tuple(extra)


IMAGE_EXTENSIONS = BASE_EXTENSIONS + _optional_extensions()  # matched in any letter case


def has_image_extension(path) -> bool:
    return str(path).lower().endswith(IMAGE_EXTENSIONS)


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        image.mode == "P" and "transparency" in image.info
    )


HIGH_BIT_GREY_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def _as_8_bit(image: Image.Image, path) -> Image.Image:
    """16-bit (and 32-bit integer) grey images scaled to 8 bits; Pillow's own conversion clips them.

    ``convert("RGB")`` of a 16-bit PNG keeps values above 255 as 255, which turns almost every
    picture white. Pillow opens 16-bit greys as ``I;16`` or ``I``; both are scaled from the 16-bit
    range (a 32-bit ``I`` image whose values exceed it is scaled from its own maximum). Float images
    (``F``) have no agreed range and are refused by name.
    """
    if image.mode == "F":
        raise UserError(
            f"cannot read image {path}: 32-bit float pixels (mode F) have no agreed range; "
            "save it as an 8- or 16-bit PNG"
        )
    if image.mode not in HIGH_BIT_GREY_MODES:
        return image
    values = np.asarray(image, dtype=np.float64)
    top = max(65535.0, float(values.max()))
    return Image.fromarray(np.clip(np.round(values / top * 255), 0, 255).astype(np.uint8), mode="L")


def open_image(path, keep_alpha: bool = False, what: str = "image") -> Image.Image:
    """The picture as shown: RGB, or RGBA with ``keep_alpha`` (alpha 255 when the file has none).

    EXIF orientation is applied. Without ``keep_alpha`` a transparent image is composited onto
    white, so transparent areas do not turn into whatever colour their pixels happen to store.
    ``what`` names the image in the error (``image``, ``--image_path image``).
    """
    try:
        with Image.open(path) as opened:
            image = ImageOps.exif_transpose(opened)
            image.load()
    except UnidentifiedImageError:
        raise UserError(
            f"cannot read {what} {path}: not an image Pillow can read; replace or remove it"
        ) from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise UserError(f"cannot read {what} {path}: {exc}; replace or remove it") from None
    image = _as_8_bit(image, path)
    if _has_alpha(image):
        rgba = image.convert("RGBA")
        if keep_alpha:
            return rgba
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    rgb = image.convert("RGB")
    if keep_alpha:
        rgb.putalpha(255)
        return rgb
    return rgb


def png_text(path) -> dict[str, str]:
    """The text chunks of a PNG (the generator reads a source image's saved prompt from them)."""
    try:
        with Image.open(path) as opened:
            opened.load()
            return dict(getattr(opened, "text", None) or {})
    except (OSError, ValueError, SyntaxError):
        return {}
