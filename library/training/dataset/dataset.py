"""The training dataset: sources, buckets, captions, augmentation and latent cache put together.

Like kohya's, the dataset indexes *batches*: ``ds[i]`` is batch ``i`` of the current epoch and the
DataLoader runs with ``batch_size=1``, ``shuffle=False`` and ``collate_fn=collate_batch``.

Determinism (needed for exact resume): the batch order is a pure function of (seed, epoch) and
every random choice for an item is a pure function of (seed, epoch, batch index, item index), see
``augment.item_rng``. The epoch lives in a small shared-memory tensor that ``set_epoch`` writes,
so DataLoader workers — persistent ones included — read the value the trainer set. Call
``set_epoch`` before iterating the DataLoader for that epoch.

Token warm-up also needs a step. A step read from shared memory would depend on how far the
workers have prefetched, so the warm-up step is derived from the batch position instead: the
trainer gives the run's shape (``set_run_length``: steps per epoch, gradient accumulation,
processes), and batch ``i`` of epoch ``e`` belongs to step ``e * steps_per_epoch + (i // processes)
// accumulation``, the optimizer step that uses it (an epoch's last, partial group included).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from library.errors import UserError
from library.text.encoding import num_chunks
from library.text.tokenizer import CHUNK_TOKENS
from library.text.tokens import contains_word
from library.training.dataset import latent_cache
from library.training.dataset.args import DataOptions
from library.training.dataset.augment import (
    Purpose,
    color_aug,
    crop_offset,
    face_crop,
    item_rng,
    should_flip,
)
from library.training.dataset.buckets import PlannedBatch, plan_epoch, size_conditioning
from library.training.dataset.captions import CaptionSettings, TokenCaptionRule, process_caption
from library.training.dataset.config import DatasetParams
from library.training.dataset.images import load_image, load_mask_image, resize_array
from library.training.dataset.sources import ImageRecord

logger = logging.getLogger(__name__)

# indices into the shared state tensor
_EPOCH, _MAX_STEPS, _STEPS_PER_EPOCH, _ACCUMULATION, _PROCESSES = range(5)


@dataclass
class DatasetPart:
    """One ``[[datasets]]``: its settings and its buckets of record indices (repeats included)."""

    params: DatasetParams
    buckets: dict[tuple[int, int], list[int]] = field(default_factory=dict)


@dataclass
class Item:
    """One prepared image of a batch, with what debug output shows about it."""

    key: str
    caption: str
    loss_weight: float
    image: torch.Tensor | None
    latents: torch.Tensor | None
    mask: torch.Tensor | None  # 1 x H/8 x W/8
    bucket: tuple[int, int]
    resized: tuple[int, int]
    crop: tuple[int, int, int, int] | None  # (left, top, right, bottom) in the resized image
    flipped: bool
    pixels: np.ndarray | None = None  # uint8 HxWx3 after augmentation (debug only)
    sizes: tuple[int, ...] = ()  # SDXL's size conditioning (``buckets.size_conditioning``)


class TrainDataset(torch.utils.data.Dataset):
    """Batches of one epoch; see the module docstring for the contract with the trainer."""

    def __init__(
        self,
        parts: list[DatasetPart],
        records: list[ImageRecord],
        tokenizer,
        caption_rule: TokenCaptionRule | None,
        seed: int,
        max_token_length: int | None,
        prior_loss_weight: float,
        num_reg_images: int | None = None,
    ):
        self.parts = parts
        self.records = records
        self.tokenizer = tokenizer
        self.caption_rule = caption_rule
        self.seed = int(seed)
        self.max_token_length = max_token_length
        self.prior_loss_weight = float(prior_loss_weight)
        self.num_train_images = sum(r.num_repeats for r in records if not r.is_reg)
        # kohya counts regularization images before they are balanced against the train images
        balanced = sum(r.num_repeats for r in records if r.is_reg)
        self.num_reg_images = balanced if num_reg_images is None else num_reg_images
        self.latents_cached = False
        self.latent_stride = latent_cache.SD_LATENT_STRIDE  # set from the VAE when latents are cached
        self.validation: TrainDataset | None = None  # the held-out images (--validation_split)
        self._state = torch.zeros(5, dtype=torch.int64)
        self._state[_ACCUMULATION] = self._state[_PROCESSES] = 1
        self._state.share_memory_()
        self._plan: tuple[int, list[PlannedBatch]] | None = None
        self._caption_settings: dict = {}
        self._warned: set[str] = set()
        self._length = len(self.batches_for_epoch(0))

    @property
    def resolution(self) -> tuple[int, int]:
        """The training resolution (width, height) of the first dataset, for the embedding's metadata;
        512 x 512 when it trains on precomputed buckets (``--in_json`` with train_resolution)."""
        return self.parts[0].params.resolution or (512, 512)

    # ------------------------------------------------------------------ epoch, step, order

    def __len__(self) -> int:
        return self._length

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (0 for the first); its batch order depends only on (seed, epoch)."""
        self._state[_EPOCH] = int(epoch)

    @property
    def epoch(self) -> int:
        return int(self._state[_EPOCH])

    def set_run_length(
        self, max_train_steps: int, steps_per_epoch: int, accumulation: int = 1, processes: int = 1
    ) -> None:
        """Needed by token warm-up: the run length, and how batches map to optimizer steps."""
        self._state[_MAX_STEPS] = int(max_train_steps)
        self._state[_STEPS_PER_EPOCH] = int(steps_per_epoch)
        self._state[_ACCUMULATION] = max(1, int(accumulation))
        self._state[_PROCESSES] = max(1, int(processes))

    def warmup_step(self, epoch: int, index: int) -> int:
        """The optimizer step that uses batch ``index`` of ``epoch`` (see the module docstring)."""
        steps_per_epoch = int(self._state[_STEPS_PER_EPOCH]) or self._length
        return epoch * steps_per_epoch + (index // int(self._state[_PROCESSES])) // int(
            self._state[_ACCUMULATION]
        )

    def batches_for_epoch(self, epoch: int) -> list[PlannedBatch]:
        """The batch order of ``epoch``; cached per process, recomputed when the epoch changes."""
        if self._plan is None or self._plan[0] != epoch:
            buckets = [part.buckets for part in self.parts]
            sizes = [part.params.batch_size for part in self.parts]
            self._plan = (epoch, plan_epoch(buckets, sizes, self.seed, epoch))
        return self._plan[1]

    # ------------------------------------------------------------------ items

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self._length:
            raise IndexError(index)
        epoch = self.epoch
        batch = self.batches_for_epoch(epoch)[index]
        items = [
            self.build_item(self.records[r], epoch, index, position, use_cache=self.latents_cached)
            for position, r in enumerate(batch.records)
        ]
        return self._collate_items(items)

    def fixed_batches(self, count: int | None = None) -> list[dict[str, Any]]:
        """The first ``count`` batches (all by default) of epoch 0, built now and kept: the fixed
        inputs of a validation loss. The shared epoch the loader reads is not touched."""
        plan = self.batches_for_epoch(0)
        batches = []
        for index, batch in enumerate(plan[:count] if count else plan):
            items = [
                self.build_item(self.records[r], 0, index, position, use_cache=self.latents_cached)
                for position, r in enumerate(batch.records)
            ]
            batches.append(self._collate_items(items))
        return batches

    def _collate_items(self, items: list[Item]) -> dict[str, Any]:
        captions = [item.caption for item in items]
        masks = [item.mask for item in items]
        if all(mask is None for mask in masks):
            alpha_masks = None
        else:
            reference = next(mask for mask in masks if mask is not None)
            alpha_masks = torch.stack([torch.ones_like(reference) if m is None else m for m in masks])
        latents = [item.latents for item in items]
        images = [item.image for item in items]
        return {
            "images": None if images[0] is None else torch.stack(images).contiguous(),
            "latents": None if latents[0] is None else torch.stack(latents),
            "captions": captions,
            "loss_weights": torch.tensor([item.loss_weight for item in items], dtype=torch.float32),
            "alpha_masks": alpha_masks,
            "keys": [item.key for item in items],
            "bucket_reso": items[0].bucket,
            "flipped": [item.flipped for item in items],
            "sizes": torch.tensor([item.sizes for item in items], dtype=torch.float32),
        }

    def caption_for(self, record: ImageRecord, epoch: int, batch_index: int, position: int) -> str:
        """The final caption of one item: kohya's processing, then the Textual Inversion rule."""
        settings = self._caption_settings.get(record.subset)
        if settings is None:
            settings = self._caption_settings[record.subset] = CaptionSettings.from_subset(record.subset)
        if 0 < settings.token_warmup_step < 1 and int(self._state[_MAX_STEPS]) == 0:
            self._warn_once(
                "token_warmup_step < 1 is a fraction of max_train_steps, which the trainer has not given "
                "(TrainDataset.set_run_length); token warm-up is off"
            )
        caption = process_caption(
            record.caption,
            settings,
            item_rng(self.seed, epoch, batch_index, position, Purpose.CAPTION),
            epoch=epoch,
            step=self.warmup_step(epoch, batch_index),
            max_train_steps=int(self._state[_MAX_STEPS]),
        )
        rule = self.caption_rule
        if rule is None:
            return caption
        if rule.template is not None and record.is_reg:
            # regularization images keep their class captions: a template would teach the token
            # from images that are not the concept (kohya replaces these captions too)
            return caption
        return rule.apply(caption, item_rng(self.seed, epoch, batch_index, position, Purpose.TEMPLATE))

    def _warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            logger.warning(message)

    def build_item(
        self,
        record: ImageRecord,
        epoch: int,
        batch_index: int,
        position: int,
        use_cache: bool,
        keep_pixels=False,
    ) -> Item:
        subset = record.subset
        flipped = should_flip(
            subset.flip_aug, item_rng(self.seed, epoch, batch_index, position, Purpose.FLIP)
        )
        caption = self.caption_for(record, epoch, batch_index, position)
        weight = self.prior_loss_weight if record.is_reg else 1.0
        bucketed = self.parts[self._part_of(record)].params.enable_bucket
        sizes = size_conditioning(record.bucket, record.size, bucketed, flipped)
        if use_cache and (record.latents is not None or record.npz_path is not None):
            latents, mask = self._cached_latents(record, flipped)
            return Item(
                record.key,
                caption,
                weight,
                None,
                latents,
                mask,
                record.bucket,
                record.resized,
                None,
                flipped,
                sizes=sizes,
            )
        rgb, mask, resized, crop = self.prepare_pixels(record, epoch, batch_index, position, augment=True)
        if subset.color_aug:
            rgb = color_aug(rgb, item_rng(self.seed, epoch, batch_index, position, Purpose.COLOR))
        if flipped:
            rgb = rgb[:, ::-1]
            mask = None if mask is None else mask[:, ::-1]
        image = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).float() / 127.5 - 1.0
        latent_mask = (
            None
            if mask is None
            else mask_to_latent(torch.from_numpy(np.ascontiguousarray(mask)).float() / 255.0)
        )
        bucket = (rgb.shape[1], rgb.shape[0])
        return Item(
            record.key,
            caption,
            weight,
            image,
            None,
            latent_mask,
            bucket,
            resized,
            crop,
            flipped,
            pixels=np.ascontiguousarray(rgb) if keep_pixels else None,
            sizes=sizes,
        )

    def prepare_pixels(
        self, record: ImageRecord, epoch: int, batch_index: int, position: int, augment: bool
    ) -> tuple[np.ndarray, np.ndarray | None, tuple[int, int], tuple[int, int, int, int]]:
        """Load, resize and crop one image (and its mask) to its bucket.

        Returns RGB uint8 HxWx3, mask uint8 HxW or None, the resized size and the crop box in it.
        With ``augment`` False (latent caching) crops are centred and faces are ignored.
        """
        subset = record.subset
        pixels = load_image(record.path, keep_alpha=subset.alpha_mask)
        mask = None
        if subset.alpha_mask:
            mask, pixels = pixels[:, :, 3], pixels[:, :, :3]
        if record.mask_path is not None:
            mask = load_mask_image(record.mask_path, (pixels.shape[1], pixels.shape[0]))
        stack = pixels if mask is None else np.concatenate([pixels, mask[:, :, None]], axis=2)
        target = record.bucket
        crop_rng = item_rng(self.seed, epoch, batch_index, position, Purpose.CROP)
        random_crop = subset.random_crop and augment
        height, width = stack.shape[:2]
        dataset = self.parts[self._part_of(record)].params
        if augment and not dataset.enable_bucket and record.face is not None and subset.face_crop_aug_range:
            face_rng = item_rng(self.seed, epoch, batch_index, position, Purpose.FACE)
            stack, resized, crop = face_crop(
                stack,
                record.face,
                target,
                subset.face_crop_aug_range,
                random_crop,
                face_rng,
                subset.resize_interpolation,
            )
        else:
            if random_crop and not dataset.enable_bucket and width >= target[0] and height >= target[1]:
                resized = (width, height)  # kohya: random crops at the image's own scale
            else:
                resized = record.resized
                stack = resize_array(stack, resized, subset.resize_interpolation)
            left = crop_offset(resized[0], target[0], random_crop, crop_rng)
            top = crop_offset(resized[1], target[1], random_crop, crop_rng)
            stack = stack[top : top + target[1], left : left + target[0]]
            crop = (left, top, left + target[0], top + target[1])
        rgb = np.ascontiguousarray(stack[:, :, :3])
        mask = np.ascontiguousarray(stack[:, :, 3]) if stack.shape[2] == 4 else None
        return rgb, mask, resized, crop

    def _part_of(self, record: ImageRecord) -> int:
        return record.extra["part"]

    def _cached_latents(self, record: ImageRecord, flipped: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        if record.latents is not None:
            latents, latents_flipped, mask = record.latents, record.latents_flipped, record.cached_mask
        else:
            cached = latent_cache.load_cache(record.npz_path)
            if (
                tuple(cached.latents.shape[1:3])
                != latent_cache.expected_for(record, self.latent_stride).latent_hw
            ):
                raise UserError(
                    f"latent cache file {record.npz_path} does not match the current resolution; "
                    "delete it (or let caching run again on all processes) and restart"
                )
            latents, latents_flipped, mask = cached.latents, cached.latents_flipped, cached.alpha_mask
        if flipped:
            if latents_flipped is None:
                raise UserError(
                    f"latent cache for {record.path} has no flipped latents; delete {record.npz_path}"
                )
            latents = latents_flipped
            mask = None if mask is None else torch.flip(mask, dims=[1])
        return latents, None if mask is None else mask_to_latent(mask)

    # ------------------------------------------------------------------ checks

    def verify_token_in_captions(self) -> None:
        """Textual Inversion learns only from captions that contain the token string.

        No train caption with the token: nothing can be learned, so stop. Some without: warn.
        """
        rule = self.caption_rule
        if rule is None or rule.template is not None:
            return
        train = [r for r in self.records if not r.is_reg]
        lacking = [r for r in train if not contains_word(self._text_for_token_check(r), rule.token_string)]
        if train and len(lacking) == len(train):
            raise UserError(
                f"no caption contains the token string '{rule.token_string}', so the embedding would learn "
                f"nothing. Add '{rule.token_string}' to the captions (or to the image folder name, e.g. "
                f"'10_{rule.token_string} dog', when there are no caption files), or use "
                "--use_object_template / --use_style_template"
            )
        if lacking:
            logger.warning(
                "%d of %d training images have no '%s' in their caption and teach the embedding nothing "
                "(first: %s)",
                len(lacking),
                len(train),
                rule.token_string,
                lacking[0].path,
            )
        self._warn_about_cut_captions([r for r in train if r not in lacking])

    def _warn_about_cut_captions(self, records: list[ImageRecord]) -> None:
        """Captions longer than the prompt window lose their end (as in kohya, silently there); when
        the word's vectors themselves fall past it, the image teaches nothing."""
        limit = CHUNK_TOKENS * num_chunks(self.max_token_length)
        rule = self.caption_rule
        word_ids = set(self.tokenizer.convert_tokens_to_ids(rule.expanded.split()))
        too_long, word_cut = [], []
        for record in {r.caption: r for r in records}.values():  # each distinct caption once
            text = rule.apply(self._text_for_token_check(record), np.random.default_rng(0))
            ids = self.tokenizer(text, add_special_tokens=False).input_ids
            if len(ids) > limit:
                too_long.append((record, len(ids)))
                if not word_ids <= set(ids[:limit]):
                    word_cut.append(record)
        if word_cut:
            logger.warning(
                "%d caption(s) put the word '%s' (%d tokens) past the %d-token window, where it is cut off and "
                "learns nothing, e.g. %s: move the word to the front, shorten the caption, or use fewer "
                "--num_vectors_per_token",
                len(word_cut),
                rule.token_string,
                rule.num_vectors,
                limit,
                word_cut[0].path,
            )
        elif too_long:
            record, count = too_long[0]
            logger.warning(
                "%d caption(s) are longer than the %d-token window (with the word's %d tokens) and lose their "
                "end, e.g. %s: %d tokens; --max_token_length 150 or 225 gives longer windows",
                len(too_long),
                limit,
                rule.num_vectors,
                record.path,
                count,
            )

    @staticmethod
    def _text_for_token_check(record: ImageRecord) -> str:
        subset = record.subset
        parts = [subset.caption_prefix or "", record.caption, subset.caption_suffix or ""]
        return " ".join(parts)

    @property
    def latents_in_memory(self) -> bool:
        """Every batch is read from latents held in memory: no file to read, no image to decode."""
        return self.latents_cached and all(record.latents is not None for record in self.records)

    def check_cacheable(self) -> None:
        """Latents cannot be cached for images that change every epoch (color_aug, random_crop)."""
        uncacheable = []
        for record in self.records:
            subset = record.subset
            if (subset.color_aug or subset.random_crop) and subset.source not in uncacheable:
                uncacheable.append(subset.source)
        if uncacheable:
            raise UserError(
                "--cache_latents/--cache_latents_to_disk cannot be used with color_aug or random_crop, which "
                f"change the image every epoch (set in: {', '.join(uncacheable)}); remove the caching or "
                "those augmentations"
            )

    # ------------------------------------------------------------------ latent cache

    def cache_latents(self, vae, caching: latent_cache.LatentCaching) -> None:
        """Encode the images once with ``vae`` (see ``latent_cache``); batches then carry latents, not images.

        On disk each process encodes its share of the stale files; the trainer must wait for all
        processes before training. In memory every process encodes all images, since any process
        may get any batch.
        """
        self.check_cacheable()
        if any(
            r.face is not None and not self.parts[self._part_of(r)].params.enable_bucket for r in self.records
        ):
            logger.warning(
                "face_crop_aug_range is not used with cached latents: centred crops are cached (as in kohya)"
            )
        latent_cache.run_latent_caching(self, vae, caching)
        self.latents_cached = True

    # ------------------------------------------------------------------ debug

    def debug_dataset(self, output_dir: str | Path | None, max_items: int | None = None) -> list[Path]:
        """Print every item of one epoch and write contact sheets; see ``library.training.dataset.debug``.

        Without an output folder the sheets go to ``./debug_dataset``.
        """
        from library.training.dataset.debug import run_debug_dataset

        folder = Path(output_dir) if output_dir is not None else Path.cwd() / "debug_dataset"
        return run_debug_dataset(self, folder, max_items)

    def summary(self) -> str:
        lines = [
            f"{len(self.records)} images, {self.num_train_images} train / {self.num_reg_images} reg with repeats"
        ]
        for number, part in enumerate(self.parts, start=1):
            lines.append(f"dataset {number} ({part.params.source}), batch size {part.params.batch_size}:")
            for bucket in sorted(part.buckets):
                lines.append(
                    f"  bucket {bucket[0]}x{bucket[1]}: {len(part.buckets[bucket])} images with repeats"
                )
        lines.append(f"{self._length} batches per epoch")
        return "\n".join(lines)


def mask_to_latent(mask: torch.Tensor) -> torch.Tensor:
    """An HxW 0-1 mask averaged down to the latent grid: 1 x H/8 x W/8 (kohya's area resize)."""
    height, width = mask.shape[-2:]
    return F.interpolate(mask.reshape(1, 1, height, width), size=(height // 8, width // 8), mode="area")[0]


def collate_batch(examples: list[dict[str, Any]]) -> dict[str, Any]:
    """The DataLoader's ``collate_fn``: the dataset already returns whole batches."""
    if len(examples) != 1:
        raise ValueError("use DataLoader(dataset, batch_size=1, ...): the dataset returns whole batches")
    return examples[0]


def make_train_dataloader(dataset: TrainDataset, options: DataOptions) -> torch.utils.data.DataLoader:
    """The DataLoader for ``dataset``: whole batches, dataset-defined order, kohya's worker options.

    ``--max_data_loader_n_workers`` is capped at the CPU count as in kohya; with workers, images
    are decoded ahead of the training step (two batches per worker). With latents cached in
    memory a batch is a few tensor lookups and a caption, which takes well under a millisecond;
    handing it over from a worker process costs more (30 ms per step in the benchmark), and on a
    CPU run the workers take cores from the step. Such batches are built in the training process.
    """
    workers = max(0, min(options.max_data_loader_n_workers or 0, os.cpu_count() or 1))
    if workers and dataset.latents_in_memory:
        logger.info(
            "latents are cached in memory: batches are built in the training process, without the %d "
            "loader workers --max_data_loader_n_workers allows (they would only add a hand-over)",
            workers,
        )
        workers = 0
    persistent = options.persistent_data_loader_workers and workers > 0
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=1,
        shuffle=False,  # the dataset orders batches from (seed, epoch)
        collate_fn=collate_batch,
        num_workers=workers,
        persistent_workers=persistent,
    )
