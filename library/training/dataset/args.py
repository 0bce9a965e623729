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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from library.errors import UserError
from library.images import MAX_RESOLUTION
from library.options import default_of

RESIZE_INTERPOLATIONS = ["lanczos", "nearest", "bilinear", "linear", "bicubic", "cubic", "area"]


@dataclass(frozen=True)
class DataOptions:
    """The dataset layer's command-line options, as given (kohya's names and defaults).

    They are the last fallback of the ``--dataset_config`` lookup (subset, dataset, [general],
    command line, these defaults) and say where the images are; ``library.training.dataset.config``
    resolves them into ``SubsetParams``/``DatasetParams``.
    """

    train_data_dir: str | None = None
    reg_data_dir: str | None = None
    in_json: str | None = None
    dataset_repeats: int = 1
    dataset_config: Path | None = None
    dataset_class: str | None = None
    resolution: str | None = None
    train_batch_size: int = 1
    cache_info: bool = False
    prior_loss_weight: float = 1.0
    debug_dataset: bool = False
    caption_extension: str = ".caption"
    caption_extention: str | None = None
    shuffle_caption: bool = False
    caption_separator: str = ","
    keep_tokens: int = 0
    keep_tokens_separator: str = ""
    secondary_separator: str | None = None
    enable_wildcard: bool = False
    caption_prefix: str | None = None
    caption_suffix: str | None = None
    token_warmup_min: int = 1
    token_warmup_step: float = 0
    max_token_length: int | None = None
    color_aug: bool = False
    flip_aug: bool = False
    face_crop_aug_range: str | None = None
    random_crop: bool = False
    resize_interpolation: str | None = None
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False
    cache_latents: bool = False
    cache_latents_to_disk: bool = False
    vae_batch_size: int = 1
    skip_cache_check: bool = False
    alpha_mask: bool = False
    masked_loss: bool = False
    conditioning_data_dir: str | None = None
    max_data_loader_n_workers: int = 8
    persistent_data_loader_workers: bool = False
    validation_split: float = 0.0
    validation_seed: int | None = None
    bucket_reso_multiple: int = 64  # not an option: set by the program (SDXL's trainer: 32, as kohya's)


def _default(name: str) -> Any:
    return default_of(DataOptions, name)


def add_dataset_arguments(parser: argparse.ArgumentParser) -> None:
    """Add every dataset, caption, augmentation, bucket, latent-cache and mask option."""
    _add_source_arguments(parser)
    _add_caption_arguments(parser)
    _add_augmentation_arguments(parser)
    _add_bucket_arguments(parser)
    _add_latent_cache_arguments(parser)
    _add_mask_arguments(parser)
    _add_loader_arguments(parser)
    _add_validation_arguments(parser)


def _add_source_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--train_data_dir",
        type=str,
        default=_default("train_data_dir"),
        help="folder of <repeats>_<class tokens>/ image folders",
    )
    parser.add_argument(
        "--reg_data_dir",
        type=str,
        default=_default("reg_data_dir"),
        help="folder of regularization image folders",
    )
    parser.add_argument(
        "--in_json", type=str, default=_default("in_json"), help="fine-tuning metadata file (.json or .jsonl)"
    )
    parser.add_argument(
        "--dataset_repeats",
        type=int,
        default=_default("dataset_repeats"),
        help="repeats of the --in_json images per epoch",
    )
    parser.add_argument(
        "--dataset_config",
        type=Path,
        default=_default("dataset_config"),
        help="dataset config file (.toml or .json)",
    )
    parser.add_argument(
        "--dataset_class",
        type=str,
        default=_default("dataset_class"),
        help="custom dataset class (not supported here)",
    )
    parser.add_argument(
        "--resolution",
        type=str,
        default=_default("resolution"),
        help="training resolution: 'size' or 'width,height'",
    )
    parser.add_argument(
        "--train_batch_size", type=int, default=_default("train_batch_size"), help="batch size for training"
    )
    parser.add_argument(
        "--cache_info",
        action="store_true",
        help="cache captions and image sizes in metadata_cache.json of each image folder",
    )
    parser.add_argument(
        "--prior_loss_weight",
        type=float,
        default=_default("prior_loss_weight"),
        help="loss weight for regularization images",
    )
    parser.add_argument(
        "--debug_dataset",
        action="store_true",
        help="print every training item and write a contact sheet of them instead of training",
    )


def _add_caption_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--caption_extension",
        type=str,
        default=_default("caption_extension"),
        help="extension of caption files",
    )
    parser.add_argument(
        "--caption_extention",
        type=str,
        default=_default("caption_extention"),
        help="old misspelling of --caption_extension",
    )
    parser.add_argument(
        "--shuffle_caption", action="store_true", help="shuffle the separated parts of each caption"
    )
    parser.add_argument(
        "--caption_separator",
        type=str,
        default=_default("caption_separator"),
        help="separator of caption parts",
    )
    parser.add_argument(
        "--keep_tokens",
        type=int,
        default=_default("keep_tokens"),
        help="keep the first N caption parts in place when shuffling",
    )
    parser.add_argument(
        "--keep_tokens_separator",
        type=str,
        default=_default("keep_tokens_separator"),
        help="parts before this separator (and after a second one) stay fixed; the separator is removed",
    )
    parser.add_argument(
        "--secondary_separator",
        type=str,
        default=_default("secondary_separator"),
        help="separator inside one caption part; replaced by caption_separator after shuffling",
    )
    parser.add_argument(
        "--enable_wildcard",
        action="store_true",
        help="enable {a|b} wildcards and multi-line captions",
    )
    parser.add_argument(
        "--caption_prefix", type=str, default=_default("caption_prefix"), help="text put before every caption"
    )
    parser.add_argument(
        "--caption_suffix", type=str, default=_default("caption_suffix"), help="text put after every caption"
    )
    parser.add_argument(
        "--token_warmup_min",
        type=int,
        default=_default("token_warmup_min"),
        help="caption parts used at step 0",
    )
    parser.add_argument(
        "--token_warmup_step",
        type=float,
        default=_default("token_warmup_step"),
        help="step at which all caption parts are used (N<1 means N*max_train_steps)",
    )
    parser.add_argument(
        "--max_token_length",
        type=int,
        default=_default("max_token_length"),
        choices=[None, 150, 225],
        help="max token length of the text encoder (default 75)",
    )


def _add_augmentation_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--color_aug", action="store_true", help="small random hue or gamma changes")
    parser.add_argument("--flip_aug", action="store_true", help="random horizontal flips")
    parser.add_argument(
        "--face_crop_aug_range",
        type=str,
        default=_default("face_crop_aug_range"),
        help="face-centred crops with the face this many times smaller than the image (e.g. 2.0,4.0)",
    )
    parser.add_argument("--random_crop", action="store_true", help="random instead of centred crops")
    parser.add_argument(
        "--resize_interpolation",
        type=str,
        default=_default("resize_interpolation"),
        choices=RESIZE_INTERPOLATIONS,
        help="resize filter (default: area to shrink, lanczos to enlarge)",
    )


def _add_bucket_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--enable_bucket", action="store_true", help="train on aspect-ratio buckets")
    parser.add_argument(
        "--min_bucket_reso", type=int, default=_default("min_bucket_reso"), help="smallest bucket side"
    )
    parser.add_argument(
        "--max_bucket_reso", type=int, default=_default("max_bucket_reso"), help="largest bucket side"
    )
    parser.add_argument(
        "--bucket_reso_steps",
        type=int,
        default=_default("bucket_reso_steps"),
        help="bucket sides are multiples of this",
    )
    parser.add_argument(
        "--bucket_no_upscale", action="store_true", help="never enlarge an image to fill a bucket"
    )


def _add_latent_cache_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cache_latents",
        action="store_true",
        help="encode images once and keep the latents in memory",
    )
    parser.add_argument(
        "--cache_latents_to_disk",
        action="store_true",
        help="encode images once and keep the latents in <image>_<W>x<H>_sd.npz files (kohya's format)",
    )
    parser.add_argument(
        "--vae_batch_size",
        type=int,
        default=_default("vae_batch_size"),
        help="images per VAE call while caching",
    )
    parser.add_argument(
        "--skip_cache_check",
        action="store_true",
        help="trust existing latent cache files without checks",
    )


def _add_mask_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--alpha_mask", action="store_true", help="use the images' alpha channel as loss mask"
    )
    parser.add_argument(
        "--masked_loss",
        action="store_true",
        help="weight the loss by masks (alpha channel or conditioning_data_dir images)",
    )
    parser.add_argument(
        "--conditioning_data_dir",
        type=str,
        default=_default("conditioning_data_dir"),
        help="mask images; use it per subset in --dataset_config",
    )


def _add_validation_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--validation_split",
        type=float,
        default=_default("validation_split"),
        help="share of each folder's images held out to compute a validation loss (e.g. 0.1)",
    )
    parser.add_argument(
        "--validation_seed",
        type=int,
        default=_default("validation_seed"),
        help="seed choosing the held-out images and the validation noise (default: --seed)",
    )


def _add_loader_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--max_data_loader_n_workers",
        type=int,
        default=_default("max_data_loader_n_workers"),
        help="DataLoader worker processes",
    )
    parser.add_argument(
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
    if max(parts) > MAX_RESOLUTION:
        raise UserError(
            f"{where}: {value!r} is more than {MAX_RESOLUTION} pixels a side; models are trained at 512 to "
            "2048, and a picture this large needs tens of GB before the model sees it"
        )
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
