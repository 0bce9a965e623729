"""Command-line options of the dataset layer, with kohya's exact names, types, defaults and choices.

The options are those of kohya's ``train_textual_inversion.py`` that describe data: the areas
``dataset``, ``captions``, ``augmentation``, ``buckets``, ``latent cache`` and ``masks`` of
``kohya-ti-options.tsv``, plus the dataset options kohya's TI parser also has
(``--train_data_dir``, ``--caption_extension``, ``--keep_tokens``, ``--prior_loss_weight``,
``--masked_loss`` ...). A kohya command line must parse unchanged, so nothing here is renamed.

Values stay as kohya parses them (``--resolution`` is the string ``"512"`` or ``"448,640"``);
``parse_resolution`` and ``parse_face_crop_range`` turn them into numbers with a clear error.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from library.errors import UserError

RESIZE_INTERPOLATIONS = ["lanczos", "nearest", "bilinear", "linear", "bicubic", "cubic", "area"]


def _add(parser: argparse.ArgumentParser, flag: str, **kwargs: Any) -> None:
    """Add ``flag`` unless another area module of the trainer already added it.

    Several kohya options (``--max_token_length``, ``--prior_loss_weight`` ...) sit on the border
    between areas; composing parsers must not crash on a duplicate.
    """
    if flag in parser._option_string_actions:  # noqa: SLF001 - argparse has no public lookup
        return
    parser.add_argument(flag, **kwargs)


def add_dataset_arguments(parser: argparse.ArgumentParser) -> None:
    """Add every dataset, caption, augmentation, bucket, latent-cache and mask option."""
    _add_source_arguments(parser)
    _add_caption_arguments(parser)
    _add_augmentation_arguments(parser)
    _add_bucket_arguments(parser)
    _add_latent_cache_arguments(parser)
    _add_mask_arguments(parser)
    _add_loader_arguments(parser)


def _add_source_arguments(parser: argparse.ArgumentParser) -> None:
    _add(
        parser,
        "--train_data_dir",
        type=str,
        default=None,
        help="folder of <repeats>_<class tokens>/ image folders",
    )
    _add(parser, "--reg_data_dir", type=str, default=None, help="folder of regularization image folders")
    _add(parser, "--in_json", type=str, default=None, help="fine-tuning metadata file (.json or .jsonl)")
    _add(parser, "--dataset_repeats", type=int, default=1, help="repeats of the --in_json images per epoch")
    _add(parser, "--dataset_config", type=Path, default=None, help="dataset config file (.toml or .json)")
    _add(parser, "--dataset_class", type=str, default=None, help="custom dataset class (not supported here)")
    _add(parser, "--resolution", type=str, default=None, help="training resolution: 'size' or 'width,height'")
    _add(parser, "--train_batch_size", type=int, default=1, help="batch size for training")
    _add(
        parser,
        "--cache_info",
        action="store_true",
        help="cache captions and image sizes in metadata_cache.json of each image folder",
    )
    _add(
        parser,
        "--prior_loss_weight",
        type=float,
        default=1.0,
        help="loss weight for regularization images",
    )
    _add(
        parser,
        "--debug_dataset",
        action="store_true",
        help="print every training item and write a contact sheet of them instead of training",
    )


def _add_caption_arguments(parser: argparse.ArgumentParser) -> None:
    _add(parser, "--caption_extension", type=str, default=".caption", help="extension of caption files")
    _add(parser, "--caption_extention", type=str, default=None, help="old misspelling of --caption_extension")
    _add(parser, "--shuffle_caption", action="store_true", help="shuffle the separated parts of each caption")
    _add(parser, "--caption_separator", type=str, default=",", help="separator of caption parts")
    _add(
        parser,
        "--keep_tokens",
        type=int,
        default=0,
        help="keep the first N caption parts in place when shuffling",
    )
    _add(
        parser,
        "--keep_tokens_separator",
        type=str,
        default="",
        help="parts before this separator (and after a second one) stay fixed; the separator is removed",
    )
    _add(
        parser,
        "--secondary_separator",
        type=str,
        default=None,
        help="separator inside one caption part; replaced by caption_separator after shuffling",
    )
    _add(
        parser,
        "--enable_wildcard",
        action="store_true",
        help="enable {a|b} wildcards and multi-line captions",
    )
    _add(parser, "--caption_prefix", type=str, default=None, help="text put before every caption")
    _add(parser, "--caption_suffix", type=str, default=None, help="text put after every caption")
    _add(parser, "--token_warmup_min", type=int, default=1, help="caption parts used at step 0")
    _add(
        parser,
        "--token_warmup_step",
        type=float,
        default=0,
        help="step at which all caption parts are used (N<1 means N*max_train_steps)",
    )
    _add(
        parser,
        "--max_token_length",
        type=int,
        default=None,
        choices=[None, 150, 225],
        help="max token length of the text encoder (default 75)",
    )


def _add_augmentation_arguments(parser: argparse.ArgumentParser) -> None:
    _add(parser, "--color_aug", action="store_true", help="small random hue or gamma changes")
    _add(parser, "--flip_aug", action="store_true", help="random horizontal flips")
    _add(
        parser,
        "--face_crop_aug_range",
        type=str,
        default=None,
        help="face-centred crops with the face this many times smaller than the image (e.g. 2.0,4.0)",
    )
    _add(parser, "--random_crop", action="store_true", help="random instead of centred crops")
    _add(
        parser,
        "--resize_interpolation",
        type=str,
        default=None,
        choices=RESIZE_INTERPOLATIONS,
        help="resize filter (default: area to shrink, lanczos to enlarge)",
    )


def _add_bucket_arguments(parser: argparse.ArgumentParser) -> None:
    _add(parser, "--enable_bucket", action="store_true", help="train on aspect-ratio buckets")
    _add(parser, "--min_bucket_reso", type=int, default=256, help="smallest bucket side")
    _add(parser, "--max_bucket_reso", type=int, default=1024, help="largest bucket side")
    _add(parser, "--bucket_reso_steps", type=int, default=64, help="bucket sides are multiples of this")
    _add(parser, "--bucket_no_upscale", action="store_true", help="never enlarge an image to fill a bucket")


def _add_latent_cache_arguments(parser: argparse.ArgumentParser) -> None:
    _add(
        parser,
        "--cache_latents",
        action="store_true",
        help="encode images once and keep the latents in memory",
    )
    _add(
        parser,
        "--cache_latents_to_disk",
        action="store_true",
        help="encode images once and keep the latents in <image>_<W>x<H>_sd.npz files (kohya's format)",
    )
    _add(parser, "--vae_batch_size", type=int, default=1, help="images per VAE call while caching")
    _add(
        parser,
        "--skip_cache_check",
        action="store_true",
        help="trust existing latent cache files without checks",
    )


def _add_mask_arguments(parser: argparse.ArgumentParser) -> None:
    _add(parser, "--alpha_mask", action="store_true", help="use the images' alpha channel as loss mask")
    _add(
        parser,
        "--masked_loss",
        action="store_true",
        help="weight the loss by masks (alpha channel or conditioning_data_dir images)",
    )
    _add(
        parser,
        "--conditioning_data_dir",
        type=str,
        default=None,
        help="mask images; use it per subset in --dataset_config",
    )


def _add_loader_arguments(parser: argparse.ArgumentParser) -> None:
    _add(parser, "--max_data_loader_n_workers", type=int, default=8, help="DataLoader worker processes")
    _add(
        parser,
        "--persistent_data_loader_workers",
        action="store_true",
        help="keep DataLoader workers alive between epochs",
    )


def parse_resolution(value: Any, where: str = "--resolution") -> tuple[int, int] | None:
    """``"512"`` -> (512, 512); ``"448,640"`` -> (448, 640) as (width, height); None stays None."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        parts = [value]
    elif isinstance(value, (tuple, list)):
        parts = list(value)
    else:
        try:
            parts = [int(p) for p in str(value).replace("x", ",").split(",") if p.strip()]
        except ValueError:
            raise UserError(
                f"{where}: {value!r} is not 'size' or 'width,height' (e.g. 512 or 448,640)"
            ) from None
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or not all(isinstance(p, int) and p > 0 for p in parts):
        raise UserError(f"{where}: {value!r} is not 'size' or 'width,height' with positive whole numbers")
    return int(parts[0]), int(parts[1])


def parse_face_crop_range(value: Any, where: str = "--face_crop_aug_range") -> tuple[float, float] | None:
    """``"2.0,4.0"`` -> (2.0, 4.0); the first number must not exceed the second."""
    if value is None:
        return None
    try:
        if isinstance(value, (tuple, list)):
            parts = [float(p) for p in value]
        else:
            parts = [float(p) for p in str(value).split(",")]
    except (TypeError, ValueError):
        raise UserError(f"{where}: {value!r} is not two numbers like 2.0,4.0") from None
    if len(parts) != 2 or parts[0] > parts[1] or parts[0] <= 0:
        raise UserError(f"{where}: {value!r} must be two positive numbers, the smaller first (e.g. 2.0,4.0)")
    return parts[0], parts[1]
