"""Building the training dataset of a run from a kohya-style command line or dataset config:
sources found, images held out for validation, buckets assigned, every fixable problem one
``UserError`` before any model work starts."""

from __future__ import annotations

import logging
import random
import secrets

from library.errors import UserError
from library.training.dataset.args import DataOptions
from library.training.dataset.buckets import assign_buckets
from library.training.dataset.captions import TokenCaptionRule
from library.training.dataset.config import DatasetParams, datasets_from_args
from library.training.dataset.dataset import DatasetPart, TrainDataset
from library.training.dataset.sources import ImageRecord, load_dataset_records

logger = logging.getLogger(__name__)


def build_train_dataset(
    options: DataOptions, tokenizer, caption_rule: TokenCaptionRule | None, seed: int | None
) -> TrainDataset:
    """The training dataset of a run, from a kohya-style command line / dataset config.

    Every problem a user can fix raises ``UserError`` before any model work starts.
    """
    _check_run_options(options)
    if seed is None:
        seed = secrets.randbelow(2**31)
        logger.info("no --seed: the dataset uses seed %d", seed)
    datasets = datasets_from_args(options)
    train_parts, held_out_parts = [], []
    reg_images = 0
    for params in datasets:
        found, reg_count = load_dataset_records(params)
        reg_images += reg_count
        if not found:
            logger.warning("%s: no images", params.source)
            continue
        train, held_out = split_for_validation(found, params.validation_split, params.validation_seed, seed)
        if params.validation_split and not held_out:
            logger.warning(
                "%s: validation_split %g holds out no image (a folder needs at least 2 training images); no "
                "held-out validation set",
                params.source,
                params.validation_split,
            )
        train_parts.append((params, train))
        if held_out:
            held_out_parts.append((params, held_out))
    parts, records = _bucketed(train_parts, options.bucket_reso_multiple)
    if not records:
        raise UserError(
            "no training images were found; check --train_data_dir / --in_json / --dataset_config"
        )
    _check_masks(options, records)
    dataset = TrainDataset(
        parts,
        records,
        tokenizer,
        caption_rule,
        seed,
        options.max_token_length,
        options.prior_loss_weight,
        reg_images,
    )
    if len(dataset) == 0:
        raise UserError("the dataset has zero batches; check num_repeats and the image folders")
    if options.cache_latents or options.cache_latents_to_disk:
        dataset.check_cacheable()  # before the model loads
    if held_out_parts:
        val_parts, val_records = _bucketed(held_out_parts, options.bucket_reso_multiple, repeats=False)
        dataset.validation = TrainDataset(
            val_parts,
            val_records,
            tokenizer,
            caption_rule,
            seed,
            options.max_token_length,
            options.prior_loss_weight,
            0,
        )
        logger.info("%d images held out for validation", len(val_records))
    logger.info("dataset:\n%s", dataset.summary())
    return dataset


def split_for_validation(
    records: list[ImageRecord], share: float, validation_seed: int | None, seed: int
) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """``share`` of each subset's training images held out (chosen by ``validation_seed``, else the
    run's seed), at least one when the share asks for any and the subset has two or more;
    regularization images are never held out."""
    if not share:
        return records, []
    rng = random.Random(seed if validation_seed is None else validation_seed)
    held: set[int] = set()
    by_subset: dict[str, list[int]] = {}
    for index, record in enumerate(records):
        if not record.is_reg:
            by_subset.setdefault(record.subset.source, []).append(index)
    for indices in by_subset.values():
        count = min(len(indices) - 1, max(1, round(len(indices) * share)))
        shuffled = sorted(indices, key=lambda i: records[i].key)
        rng.shuffle(shuffled)
        held.update(shuffled[:count])
    return [r for i, r in enumerate(records) if i not in held], [
        r for i, r in enumerate(records) if i in held
    ]


def _bucketed(
    parts_records: list[tuple[DatasetParams, list[ImageRecord]]], reso_multiple: int, repeats: bool = True
) -> tuple[list[DatasetPart], list[ImageRecord]]:
    """Parts with their buckets of record indices (each record ``num_repeats`` times, or once)."""
    parts: list[DatasetPart] = []
    records: list[ImageRecord] = []
    for params, found in parts_records:
        part = DatasetPart(assign_buckets(params, found, reso_multiple))
        for record in found:
            record.extra["part"] = len(parts)
            index = len(records)
            records.append(record)
            part.buckets.setdefault(record.bucket, []).extend(
                [index] * (record.num_repeats if repeats else 1)
            )
        parts.append(part)
    return parts, records


def _check_run_options(options: DataOptions) -> None:
    if options.dataset_class:
        raise UserError(
            "--dataset_class (a custom dataset class) is not supported; use --dataset_config instead"
        )
    if options.conditioning_data_dir and options.dataset_config is None:
        raise UserError(
            "--conditioning_data_dir is used per subset: set conditioning_data_dir in a --dataset_config "
            "[[datasets.subsets]] table (with --masked_loss)"
        )


def _check_masks(options: DataOptions, records: list[ImageRecord]) -> None:
    has_conditioning = any(r.mask_path is not None for r in records)
    if has_conditioning and not options.masked_loss:
        raise UserError("conditioning_data_dir holds loss masks: add --masked_loss to use them")
    if options.masked_loss and not has_conditioning and not any(r.subset.alpha_mask for r in records):
        logger.warning(
            "--masked_loss has no mask to use: add --alpha_mask (transparency as mask) or "
            "conditioning_data_dir in the dataset config; training without masks"
        )
