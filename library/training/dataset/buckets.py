"""Aspect-ratio buckets, each image's bucket, and the per-epoch batch order.

The bucket set and the choice of bucket per image are kohya's (``make_bucket_resolutions`` and
``BucketManager.select_bucket``), so an image lands in the same bucket and crop as in kohya and
latent caches can be shared. Without ``enable_bucket`` there is one bucket, the resolution, and
an image is resized to cover it and then cropped — the same rule with a single candidate.

The batch order is a pure function of (seed, epoch): each bucket is permuted, cut into batches of
``batch_size`` (one bucket per batch, so all images of a batch have one size), and all batches of
all datasets are permuted again.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from library.errors import UserError
from library.training.dataset.augment import cover_size

if TYPE_CHECKING:
    from library.training.dataset.config import DatasetParams
    from library.training.dataset.sources import ImageRecord

logger = logging.getLogger(__name__)

ORDER_STREAM = 1  # separates the batch-order random stream from the per-item streams


def make_bucket_resolutions(
    max_reso: tuple[int, int], min_size: int = 256, max_size: int = 1024, divisible: int = 64
) -> list[tuple[int, int]]:
    """kohya's bucket set: about the area of ``max_reso``, sides multiples of ``divisible``.

    One square bucket, then for each width from ``min_size`` to ``max_size`` the tallest height
    that keeps the area (capped at ``max_size``), in both orientations.
    """
    max_area = max_reso[0] * max_reso[1]
    side = int(math.sqrt(max_area) // divisible) * divisible
    resolutions = {(side, side)}
    width = min_size
    while width <= max_size:
        height = min(max_size, int((max_area // width) // divisible) * divisible)
        if height >= min_size:
            resolutions.add((width, height))
            resolutions.add((height, width))
        width += divisible
    return sorted(resolutions)


@dataclass(frozen=True)
class BucketChoice:
    bucket: tuple[int, int]  # (width, height) of the training crop
    resized: tuple[int, int]  # (width, height) the image is resized to before cropping
    ar_error: float


class BucketSelector:
    """Chooses a bucket and resize size per image, as kohya's BucketManager does."""

    def __init__(
        self,
        resolution: tuple[int, int],
        enable_bucket: bool,
        min_bucket_reso: int,
        max_bucket_reso: int,
        bucket_reso_steps: int,
        bucket_no_upscale: bool,
    ):
        self.no_upscale = enable_bucket and bucket_no_upscale
        self.steps = bucket_reso_steps
        self.max_area = resolution[0] * resolution[1]
        if not enable_bucket:
            self.predefined = [tuple(resolution)]
        elif self.no_upscale:
            self.predefined = []
        else:
            self.predefined = make_bucket_resolutions(
                resolution, min_bucket_reso, max_bucket_reso, bucket_reso_steps
            )
        self._predefined_set = set(self.predefined)
        self._aspects = np.array([w / h for w, h in self.predefined]) if self.predefined else None

    def select(self, width: int, height: int) -> BucketChoice:
        aspect = width / height
        if not self.no_upscale:
            bucket = (width, height)
            if bucket not in self._predefined_set:
                bucket = self.predefined[int(np.abs(self._aspects - aspect).argmin())]
            if aspect > bucket[0] / bucket[1]:  # image wider than the bucket: match heights
                scale = bucket[1] / height
            else:
                scale = bucket[0] / width
            resized = (int(width * scale + 0.5), int(height * scale + 0.5))
        else:
            resized = self._shrunk_size(width, height, aspect)
            bucket = (resized[0] - resized[0] % self.steps, resized[1] - resized[1] % self.steps)
            if bucket[0] <= 0 or bucket[1] <= 0:
                raise ValueError("image smaller than one bucket step")
        return BucketChoice(tuple(bucket), resized, bucket[0] / bucket[1] - aspect)

    def _round(self, x: float) -> int:
        x = int(x + 0.5)
        return x - x % self.steps

    def _shrunk_size(self, width: int, height: int, aspect: float) -> tuple[int, int]:
        """bucket_no_upscale: shrink only images larger than the area, keeping the aspect ratio."""
        if width * height <= self.max_area:
            return width, height
        resized_width = math.sqrt(self.max_area * aspect)
        resized_height = self.max_area / resized_width
        width_rounded = self._round(resized_width)
        height_for_width = self._round(width_rounded / aspect)
        height_rounded = self._round(resized_height)
        width_for_height = self._round(height_rounded * aspect)
        error_by_width = abs(width_rounded / max(height_for_width, 1) - aspect)
        error_by_height = abs(width_for_height / max(height_rounded, 1) - aspect)
        if error_by_width < error_by_height:
            return width_rounded, int(width_rounded / aspect + 0.5)
        return int(height_rounded * aspect + 0.5), height_rounded


def kohya_crop_ltrb(bucket: tuple[int, int], original_size: tuple[int, int]) -> tuple[float, ...]:
    """The crop box kohya stores in latent caches (SDXL-style, in bucket coordinates).

    It describes the image fitted *inside* the bucket; we only store and compare it so that cache
    files stay interchangeable with kohya's.
    """
    bucket_aspect = bucket[0] / bucket[1]
    image_aspect = original_size[0] / original_size[1]
    if bucket_aspect > image_aspect:
        fitted_width, fitted_height = bucket[1] * image_aspect, bucket[1]
    else:
        fitted_width, fitted_height = bucket[0], bucket[0] / image_aspect
    left = (bucket[0] - fitted_width) // 2
    top = (bucket[1] - fitted_height) // 2
    return (left, top, left + fitted_width, top + fitted_height)


def size_conditioning(
    bucket: tuple[int, int], original: tuple[int, int], bucketed: bool, flipped: bool
) -> tuple[int, int, int, int, int, int]:
    """SDXL's six size numbers of one picture, as kohya's SDXL trainers give them to the UNet:
    original height and width, crop top and left, target (bucket) height and width.

    With buckets the original is the file's size and the crop is ``kohya_crop_ltrb``'s box; a
    flipped picture's crop left is measured from the right (``target width - box right``). Without
    buckets the original is the cropped picture itself and the box is empty, so a flipped one gets
    crop left = target width: kohya's numbers, kept so that the same data conditions alike.
    """
    target_w, target_h = bucket
    if bucketed:
        original_w, original_h = original
        left, top, right, _ = kohya_crop_ltrb(bucket, original)
    else:
        original_w, original_h, left, top, right = target_w, target_h, 0, 0, 0
    if flipped:
        left = target_w - right
    return (int(original_h), int(original_w), int(top), int(left), int(target_h), int(target_w))


def check_bucket_settings(
    source: str,
    resolution: tuple[int, int],
    enable_bucket: bool,
    min_bucket_reso: int,
    max_bucket_reso: int,
    bucket_reso_steps: int,
    reso_multiple: int = 64,
) -> None:
    """kohya's checks on resolution and bucket options, as one-line errors; bucket sides are
    multiples of ``reso_multiple`` (64, SDXL's trainers: 32)."""
    if resolution[0] % 8 or resolution[1] % 8:
        raise UserError(
            f"{source}: resolution {resolution[0]}x{resolution[1]} must be a multiple of 8 (VAE stride)"
        )
    if not enable_bucket:
        return
    if bucket_reso_steps <= 0 or bucket_reso_steps % reso_multiple:
        raise UserError(
            f"{source}: bucket_reso_steps is {bucket_reso_steps}; this model family needs a multiple of "
            f"{reso_multiple}"
        )
    if min(resolution) < min_bucket_reso:
        raise UserError(
            f"{source}: min_bucket_reso {min_bucket_reso} is larger than the resolution "
            f"{resolution[0]}x{resolution[1]}; lower --min_bucket_reso"
        )
    if max(resolution) > max_bucket_reso:
        raise UserError(
            f"{source}: max_bucket_reso {max_bucket_reso} is smaller than the resolution "
            f"{resolution[0]}x{resolution[1]}; raise --max_bucket_reso"
        )


@dataclass(frozen=True)
class PlannedBatch:
    """One batch of an epoch: indices into the dataset's image records, all of one bucket."""

    dataset_index: int
    bucket: tuple[int, int]
    records: tuple[int, ...]


def order_rng(seed: int, epoch: int, *extra: int) -> np.random.Generator:
    entropy = [seed & 0xFFFFFFFFFFFFFFFF, ORDER_STREAM, epoch & 0xFFFFFFFF, *(e & 0xFFFFFFFF for e in extra)]
    return np.random.default_rng(np.random.SeedSequence(entropy))


def plan_epoch(
    buckets_per_dataset: list[dict[tuple[int, int], list[int]]],
    batch_sizes: list[int],
    seed: int,
    epoch: int,
) -> list[PlannedBatch]:
    """All batches of one epoch in training order; a pure function of its arguments.

    ``buckets_per_dataset[d][bucket]`` lists record indices, each repeated ``num_repeats`` times.
    """
    batches: list[PlannedBatch] = []
    for dataset_index, (buckets, batch_size) in enumerate(zip(buckets_per_dataset, batch_sizes)):
        for bucket_number, bucket in enumerate(sorted(buckets)):
            members = buckets[bucket]
            permuted = [
                members[i]
                for i in order_rng(seed, epoch, dataset_index, bucket_number).permutation(len(members))
            ]
            for start in range(0, len(permuted), batch_size):
                batches.append(
                    PlannedBatch(dataset_index, bucket, tuple(permuted[start : start + batch_size]))
                )
    order = order_rng(seed, epoch).permutation(len(batches))
    return [batches[i] for i in order]


# ---------------------------------------------------------------------------------------------
# each image's bucket


def assign_buckets(
    params: DatasetParams, records: list[ImageRecord], reso_multiple: int = 64
) -> DatasetParams:
    """Each record's bucket and resized size (kohya's rules); returns the dataset's parameters, with
    bucketing switched on when the metadata fixes the buckets (``train_resolution``).
    ``reso_multiple``: what ``bucket_reso_steps`` must be a multiple of (SDXL: 32)."""
    if params.is_finetune and all(r.fixed_bucket is not None for r in records):
        if params.bucket_no_upscale:
            raise UserError(
                f"{params.source}: the metadata has train_resolution (precomputed buckets), "
                "so bucket_no_upscale cannot be used"
            )
        logger.info("%s: using the buckets (train_resolution) from the metadata", params.source)
        for record in records:
            if record.fixed_bucket[0] % 8 or record.fixed_bucket[1] % 8:
                raise UserError(
                    f"{record.path}: train_resolution {record.fixed_bucket} must be multiples of 8"
                )
            record.bucket = record.fixed_bucket
            record.resized = cover_size(*record.size, record.bucket)
        return replace(params, enable_bucket=True)
    if params.resolution is None:
        raise UserError(f"{params.source}: the resolution is required (--resolution 512 or resolution = 512)")
    check_bucket_settings(
        params.source,
        params.resolution,
        params.enable_bucket,
        params.min_bucket_reso,
        params.max_bucket_reso,
        params.bucket_reso_steps,
        reso_multiple,
    )
    if params.enable_bucket and params.bucket_no_upscale:
        logger.info(
            "%s: bucket_no_upscale makes buckets from image sizes; min/max_bucket_reso are not used",
            params.source,
        )
    face_subsets = {r.subset.source for r in records if r.subset.face_crop_aug_range}
    if face_subsets and params.enable_bucket:
        logger.warning(
            "%s: face_crop_aug_range has no effect with enable_bucket (as in kohya); disable buckets to use it",
            params.source,
        )
    selector = BucketSelector(
        params.resolution,
        params.enable_bucket,
        params.min_bucket_reso,
        params.max_bucket_reso,
        params.bucket_reso_steps,
        params.bucket_no_upscale,
    )
    for record in records:
        try:
            choice = selector.select(*record.size)
        except ValueError:
            raise UserError(
                f"{record.path} ({record.size[0]}x{record.size[1]}) is smaller than one bucket step "
                f"({params.bucket_reso_steps}px) and bucket_no_upscale forbids enlarging it; remove the image"
            ) from None
        record.bucket, record.resized = choice.bucket, choice.resized
    _warn_about_enlarged_images(records)
    return params


MAX_QUIET_UPSCALE = 4  # an image enlarged more than this carries little of what it is trained to show


def _warn_about_enlarged_images(records) -> None:
    enlarged = [r for r in records if r.resized[0] > MAX_QUIET_UPSCALE * r.size[0]]
    if enlarged:
        first = max(enlarged, key=lambda r: r.resized[0] / r.size[0])
        logger.warning(
            "%d image(s) are enlarged more than %dx to reach the training resolution, e.g. %s: %dx%d to %dx%d; "
            "they add blur, not detail: use larger pictures or a lower --resolution",
            len(enlarged),
            MAX_QUIET_UPSCALE,
            first.path,
            *first.size,
            *first.resized,
        )
