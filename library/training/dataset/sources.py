"""Where images and captions come from: DreamBooth folders, regularization folders, fine-tuning metadata.

Each source becomes a list of ``ImageRecord``: one image with its raw caption, repeats and subset
settings. Image sizes are read here (header only, EXIF-aware), so broken files are found before
training starts and reported together with how many other images are fine.

Fine-tuning metadata (``--in_json`` / ``metadata_file``) is kohya's JSON
``{"<image key>": {"caption": ..., "tags": ..., "train_resolution": [w, h]}}`` or JSON Lines with
one object per line naming the image in ``image_key`` (or ``image_path`` / ``file_name`` /
``image``) and the caption in ``caption`` (or ``text``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from library.errors import UserError
from library.training.dataset.captions import caption_candidates, read_caption_file
from library.training.dataset.config import DatasetParams, SubsetParams
from library.training.dataset.images import (
    IMAGE_EXTENSIONS,
    FaceBox,
    ImageReadError,
    face_box_from_name,
    list_images,
    read_image_size,
    unreadable_images_error,
)

logger = logging.getLogger(__name__)

INFO_CACHE_FILE = "metadata_cache.json"  # kohya's cache_info file name
JSONL_IMAGE_KEYS = ("image_key", "image_path", "file_name", "image")


@dataclass
class ImageRecord:
    """One training image and everything decided about it before training."""

    path: Path
    caption: str  # raw caption: file text, class tokens or metadata (may hold several lines)
    is_reg: bool
    num_repeats: int
    subset: SubsetParams
    size: tuple[int, int] = (0, 0)  # (width, height) after EXIF rotation
    face: FaceBox | None = None
    mask_path: Path | None = None  # conditioning_data_dir image used as loss mask
    fixed_bucket: tuple[int, int] | None = None  # train_resolution from fine-tuning metadata
    # set when buckets are made
    bucket: tuple[int, int] = (0, 0)
    resized: tuple[int, int] = (0, 0)
    # set by latent caching
    latents: Any = None
    latents_flipped: Any = None
    cached_mask: Any = None
    npz_path: Path | None = None
    extra: dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        return str(self.path)


@dataclass
class SourceReport:
    """What loading found, for the log and for the errors that name counts."""

    bad_images: list[ImageReadError] = field(default_factory=list)
    good_images: int = 0
    missing_captions: int = 0


def load_dataset_records(dataset: DatasetParams) -> tuple[list[ImageRecord], int]:
    """All records of one dataset, reg images balanced against train images as in kohya.

    Also returns kohya's ``num_reg_images``: reg images times repeats *before* balancing.
    """
    report = SourceReport()
    train: list[ImageRecord] = []
    reg: list[ImageRecord] = []
    seen: set[str] = set()
    for subset in dataset.subsets:
        identity = subset.metadata_file or subset.image_dir or ""
        if identity in seen:
            logger.warning(
                "%s: the same folder/metadata is listed twice in one dataset; using the first", subset.source
            )
            continue
        seen.add(identity)
        if subset.num_repeats < 1:
            logger.warning(
                "%s: num_repeats is %d, so the subset is ignored", subset.source, subset.num_repeats
            )
            continue
        records = (
            load_finetune_subset(subset, report)
            if subset.metadata_file
            else load_dreambooth_subset(subset, report)
        )
        (reg if subset.is_reg else train).extend(records)
    if report.bad_images:
        raise unreadable_images_error(report.bad_images, report.good_images)
    if report.missing_captions:
        logger.warning(
            "%d images have no caption file; their class tokens (folder name) are used as caption",
            report.missing_captions,
        )
    train, reg = _skip_small_images(dataset, train), _skip_small_images(dataset, reg)
    reg_count = sum(r.num_repeats for r in reg)
    return train + balance_reg_images(train, reg), reg_count


def _skip_small_images(dataset: DatasetParams, records: list[ImageRecord]) -> list[ImageRecord]:
    if dataset.skip_image_resolution is None:
        return records
    limit = dataset.skip_image_resolution[0] * dataset.skip_image_resolution[1]
    kept = [r for r in records if r.size[0] * r.size[1] > limit]
    if len(kept) < len(records):
        logger.info(
            "%s: skipped %d images not larger than skip_image_resolution",
            dataset.source,
            len(records) - len(kept),
        )
    return kept


def balance_reg_images(train: list[ImageRecord], reg: list[ImageRecord]) -> list[ImageRecord]:
    """kohya's rule: regularization images are repeated until they match the train images.

    Each reg image first counts with its folder's repeats; then, going round the reg images, one
    repeat is added at a time until the reg count reaches the train count (repeats included).
    When there are more reg images than needed, the later ones are not used at all.
    """
    if not reg:
        return []
    target = sum(r.num_repeats for r in train)
    if target == 0:
        return []
    if sum(r.num_repeats for r in reg) > target:
        logger.warning("there are more regularization images than train images; some are not used")
    used: list[ImageRecord] = []
    count = 0
    for record in reg:
        used.append(record)
        count += record.num_repeats
        if count >= target:
            return used
    while count < target:
        for record in used:
            record.num_repeats += 1
            count += 1
            if count >= target:
                break
    return used


# ----------------------------------------------------------------------------------------------
# DreamBooth folders


def load_dreambooth_subset(subset: SubsetParams, report: SourceReport) -> list[ImageRecord]:
    folder = Path(subset.image_dir)
    if not folder.is_dir():
        raise UserError(f"{subset.source}: image folder {folder} not found")
    cached = _read_info_cache(folder) if subset.cache_info else None
    paths = [Path(p) for p in cached] if cached else list_images(folder)
    if not paths:
        raise UserError(
            f"{subset.source}: no images in {folder} (looked for {', '.join(IMAGE_EXTENSIONS)}); "
            "images must be directly in the folder, not in sub-folders"
        )
    records = []
    missing = 0
    for path in paths:
        size = _size_or_none(path, report, cached.get(str(path), {}).get("resolution") if cached else None)
        if size is None:
            continue
        if cached:
            caption = cached[str(path)].get("caption") or None
        else:
            caption = _caption_for(path, subset)
        if caption is None:
            missing += 1
            caption = subset.class_tokens or ""
        records.append(_record(path, caption, subset, size))
    _warn_about_caption_extension(folder, subset, missing, len(paths))
    report.missing_captions += missing
    if subset.cache_info and not cached:
        _write_info_cache(folder, records)
    return records


def _caption_for(path: Path, subset: SubsetParams) -> str | None:
    for candidate in caption_candidates(path, subset.caption_extension):
        if candidate.is_file():
            return read_caption_file(candidate, subset.enable_wildcard)
    return None


def _warn_about_caption_extension(folder: Path, subset: SubsetParams, missing: int, total: int) -> None:
    """kohya's default extension is .caption; most taggers write .txt. Say so when it looks wrong."""
    if missing < total:
        return
    for other in (".txt", ".caption"):
        if other != subset.caption_extension and any(folder.glob("*" + other)):
            logger.warning(
                "%s: no %s caption files in %s, but there are %s files; did you mean --caption_extension %s?",
                subset.source,
                subset.caption_extension,
                folder,
                other,
                other,
            )
            return


def _record(path: Path, caption: str, subset: SubsetParams, size: tuple[int, int]) -> ImageRecord:
    record = ImageRecord(
        path=path.resolve(),
        caption=caption,
        is_reg=subset.is_reg,
        num_repeats=subset.num_repeats,
        subset=subset,
        size=size,
        face=face_box_from_name(path) if subset.face_crop_aug_range else None,
    )
    if subset.conditioning_data_dir:
        record.mask_path = _mask_for(path, subset)
    return record


def _mask_for(path: Path, subset: SubsetParams) -> Path:
    folder = Path(subset.conditioning_data_dir)
    if not folder.is_dir():
        raise UserError(f"{subset.source}: conditioning_data_dir {folder} not found")
    for candidate in sorted(folder.iterdir()):
        if candidate.stem == path.stem and candidate.suffix.lower() in IMAGE_EXTENSIONS:
            return candidate.resolve()
    raise UserError(f"{subset.source}: no mask image named {path.stem}.* in {folder} for {path.name}")


def _size_or_none(path: Path, report: SourceReport, known: list | None = None) -> tuple[int, int] | None:
    if known is not None and len(known) == 2 and path.is_file():
        report.good_images += 1
        return int(known[0]), int(known[1])
    try:
        size = read_image_size(path)
    except ImageReadError as exc:
        report.bad_images.append(exc)
        return None
    report.good_images += 1
    return size


def _read_info_cache(folder: Path) -> dict | None:
    """kohya's ``metadata_cache.json``: {image path: {"caption": ..., "resolution": [w, h]}}."""
    path = folder / INFO_CACHE_FILE
    if not path.is_file():
        logger.info("cache_info: %s does not exist yet; it will be written", path)
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"cache_info file {path} is damaged ({exc}); delete it to rebuild it") from None
    if not all(Path(p).is_file() for p in data):
        logger.warning("cache_info file %s lists missing images; rebuilding it", path)
        return None
    return data


def _write_info_cache(folder: Path, records: list[ImageRecord]) -> None:
    data = {str(r.path): {"caption": r.caption, "resolution": list(r.size)} for r in records}
    (folder / INFO_CACHE_FILE).write_text(json.dumps(data, ensure_ascii=False, indent=2), encoding="utf-8")
    logger.info("cache_info: wrote %s", folder / INFO_CACHE_FILE)


# ----------------------------------------------------------------------------------------------
# fine-tuning metadata


def read_metadata(path: Path) -> list[tuple[str, dict]]:
    """(image key, entry) pairs from kohya's JSON object or from JSON Lines."""
    if not path.is_file():
        raise UserError(f"metadata file {path} not found")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read metadata file {path} ({exc})") from None
    if path.suffix.lower() == ".jsonl":
        return _read_jsonl(path, text)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"metadata file {path} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise UserError(f"metadata file {path} must be a JSON object {{image: {{caption: ...}}}}")
    return [(str(key), value if isinstance(value, dict) else {}) for key, value in data.items()]


def _read_jsonl(path: Path, text: str) -> list[tuple[str, dict]]:
    entries = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path} line {number}: not valid JSON ({exc})") from None
        if not isinstance(entry, dict):
            raise UserError(f"{path} line {number}: each line must be a JSON object")
        key = next((entry[name] for name in JSONL_IMAGE_KEYS if entry.get(name)), None)
        if key is None:
            raise UserError(f"{path} line {number}: name the image in one of {', '.join(JSONL_IMAGE_KEYS)}")
        if "caption" not in entry and "text" in entry:
            entry = {**entry, "caption": entry["text"]}
        entries.append((str(key), entry))
    return entries


def _find_metadata_image(key: str, image_dir: Path | None, metadata_dir: Path) -> Path | None:
    """The image of a metadata key: the key as a path, then image_dir/key(.ext), then beside the file."""
    candidate = Path(key)
    if candidate.is_file():
        return candidate
    for folder in (image_dir, metadata_dir):
        if folder is None:
            continue
        direct = folder / key
        if direct.is_file():
            return direct
        for extension in IMAGE_EXTENSIONS:
            for variant in (extension, extension.upper()):
                with_extension = folder / (key + variant)
                if with_extension.is_file():
                    return with_extension
    return None


def _metadata_caption(entry: dict, subset: SubsetParams) -> str:
    caption = entry.get("caption")
    tags = entry.get("tags")
    if caption is None:
        caption, tags = tags, None
    separator = subset.caption_separator
    if subset.enable_wildcard:
        if tags:
            tags = tags.replace("\n", separator)
        if caption is not None and tags:
            caption = "\n".join(f"{line}{separator}{tags}" for line in caption.split("\n") if line.strip())
    elif tags:
        caption = (caption or "") + separator + tags
    return caption or ""


def load_finetune_subset(subset: SubsetParams, report: SourceReport) -> list[ImageRecord]:
    metadata_path = Path(subset.metadata_file)
    image_dir = Path(subset.image_dir) if subset.image_dir else None
    if image_dir is not None and not image_dir.is_dir():
        raise UserError(f"{subset.source}: image folder {image_dir} not found")
    entries = read_metadata(metadata_path)
    if not entries:
        raise UserError(f"{subset.source}: metadata file {metadata_path} lists no images")
    records = []
    missing = []
    for key, entry in entries:
        path = _find_metadata_image(key, image_dir, metadata_path.parent)
        if path is None:
            missing.append(key)
            continue
        size = _size_or_none(path, report)
        if size is None:
            continue
        record = _record(path, _metadata_caption(entry, subset), subset, size)
        resolution = entry.get("train_resolution")
        if isinstance(resolution, (list, tuple)) and len(resolution) == 2:
            record.fixed_bucket = (int(resolution[0]), int(resolution[1]))
        records.append(record)
    if missing:
        where = f" in {image_dir}" if image_dir else ""
        raise UserError(
            f"{subset.source}: {len(missing)} images of {metadata_path} not found{where} "
            f"(first: {missing[0]}); {len(entries) - len(missing)} were found. "
            "Pass the image folder with --train_data_dir or image_dir"
        )
    return records
