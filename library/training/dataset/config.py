"""``--dataset_config`` files (TOML or JSON) and the value lookup subset -> dataset -> general -> CLI -> default.

The schema is kohya's (docs/config_README-en.md): a ``[general]`` table, ``[[datasets]]`` and
``[[datasets.subsets]]``. It is checked with pydantic models that forbid unknown keys, so a
misspelled key stops the run with a message naming the key, where it was, and the file — kohya
reports ``extra keys not allowed @ data['datasets'][0]...`` instead.

The key set is the union of what kohya's trainers accept, so a TOML written for kohya's
``train_network.py`` also works here (caption dropout keys included). Without a config file the
same structures are made from ``--train_data_dir`` / ``--reg_data_dir`` / ``--in_json``.
"""

from __future__ import annotations

import difflib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from library.errors import UserError
from library.files import read_text_file, tomllib
from library.options import default_of
from library.training.dataset.args import (
    RESIZE_INTERPOLATIONS,
    DataOptions,
    parse_face_crop_range,
    parse_resolution,
)

logger = logging.getLogger(__name__)

CONFIG_RESIZE_INTERPOLATIONS = [*RESIZE_INTERPOLATIONS, "box"]


# ----------------------------------------------------------------------------------------------
# schema


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class _SubsetOptions(_Strict):
    """Keys allowed at every level: [general], [[datasets]] and [[datasets.subsets]]."""

    num_repeats: int | None = None
    shuffle_caption: bool | None = None
    caption_separator: str | None = None
    keep_tokens: int | None = None
    keep_tokens_separator: str | None = None
    secondary_separator: str | None = None
    enable_wildcard: bool | None = None
    caption_prefix: str | None = None
    caption_suffix: str | None = None
    caption_extension: str | None = None
    class_tokens: str | None = None
    cache_info: bool | None = None
    token_warmup_min: int | None = None
    token_warmup_step: float | None = None
    caption_dropout_rate: float | None = None
    caption_dropout_every_n_epochs: int | None = None
    caption_tag_dropout_rate: float | None = None
    color_aug: bool | None = None
    flip_aug: bool | None = None
    face_crop_aug_range: list[float] | None = None
    random_crop: bool | None = None
    alpha_mask: bool | None = None
    resize_interpolation: str | None = None
    custom_attributes: dict | None = None

    @field_validator("num_repeats", "keep_tokens", "caption_dropout_every_n_epochs", "token_warmup_min")
    @classmethod
    def _not_negative(cls, value: int | None) -> int | None:
        if value is not None and value < 0:
            raise ValueError("must be 0 or more (num_repeats 0 leaves the subset out)")
        return value

    @field_validator("caption_dropout_rate", "caption_tag_dropout_rate")
    @classmethod
    def _a_rate(cls, value: float | None) -> float | None:
        if value is not None and not 0 <= value <= 1:
            raise ValueError("must be a rate between 0 and 1")
        return value

    @field_validator("face_crop_aug_range")
    @classmethod
    def _two_numbers(cls, value: list[float] | None) -> list[float] | None:
        if value is not None and len(value) != 2:
            raise ValueError("must be two numbers like [2.0, 4.0]")
        return value

    @field_validator("resize_interpolation")
    @classmethod
    def _known_filter(cls, value: str | None) -> str | None:
        if value is not None and value not in CONFIG_RESIZE_INTERPOLATIONS:
            raise ValueError(f"must be one of {', '.join(CONFIG_RESIZE_INTERPOLATIONS)}")
        return value


class _DatasetOptions(_SubsetOptions):
    """Keys allowed in [general] and [[datasets]] (fixed for all subsets of one dataset)."""

    batch_size: int | None = None
    resolution: int | list[int] | None = None
    enable_bucket: bool | None = None
    min_bucket_reso: int | None = None
    max_bucket_reso: int | None = None
    bucket_reso_steps: int | None = None
    bucket_no_upscale: bool | None = None
    skip_image_resolution: int | list[int] | None = None
    network_multiplier: float | None = None
    validation_split: float | None = None
    validation_seed: int | None = None

    @field_validator("batch_size")
    @classmethod
    def _a_batch(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise ValueError("must be 1 or more")
        return value

    @field_validator("resolution", "skip_image_resolution")
    @classmethod
    def _size_or_pair(cls, value: int | list[int] | None) -> int | list[int] | None:
        if isinstance(value, list) and len(value) != 2:
            raise ValueError("must be a number or [width, height]")
        return value


class SubsetSection(_SubsetOptions):
    """One ``[[datasets.subsets]]`` table: one image folder or one metadata file."""

    image_dir: str | None = None
    is_reg: bool | None = None
    metadata_file: str | None = None
    conditioning_data_dir: str | None = None


class GeneralSection(_DatasetOptions):
    """The ``[general]`` table."""


class DatasetSection(_DatasetOptions):
    """One ``[[datasets]]`` table."""

    subsets: list[SubsetSection] = []


class UserConfig(_Strict):
    """A whole ``--dataset_config`` file."""

    general: GeneralSection = GeneralSection()
    datasets: list[DatasetSection] = []


_LEVEL_FIELDS = {
    "[general]": set(GeneralSection.model_fields),
    "[[datasets]]": set(DatasetSection.model_fields),
    "[[datasets.subsets]]": set(SubsetSection.model_fields),
}


# ----------------------------------------------------------------------------------------------
# loading


def load_user_config(path: str | Path) -> UserConfig:
    """Read and validate a ``.toml`` or ``.json`` dataset config; every mistake is a ``UserError``."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--dataset_config: file {path} not found")
    suffix = path.suffix.lower()
    text = read_text_file(path, "--dataset_config")
    if suffix == ".toml":
        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            hint = "check quotes, brackets and '=' signs"
            if "escape" in str(exc).lower():
                hint = "write Windows paths in single quotes ('C:\\data') or with forward slashes"
            raise UserError(f"{path}: not valid TOML ({exc}); {hint}") from None
    elif suffix == ".json":
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(raw, dict):
            raise UserError(f"{path}: the JSON must be an object with 'general' and 'datasets'")
    else:
        raise UserError(f"--dataset_config {path}: use a .toml or .json file")
    return validate_user_config(raw, path)


def validate_user_config(raw: dict, path: str | Path) -> UserConfig:
    """Validate an already parsed config; ``path`` only names the file in messages."""
    try:
        config = UserConfig.model_validate(raw)
    except ValidationError as exc:
        problems = [_describe_error(err) for err in exc.errors()]
        shown = "; ".join(problems[:3])
        more = f" (and {len(problems) - 3} more problems)" if len(problems) > 3 else ""
        raise UserError(f"{path}: {shown}{more}") from None
    for number, dataset in enumerate(config.datasets, start=1):
        kinds = {subset.metadata_file is not None for subset in dataset.subsets}
        if len(kinds) > 1:
            raise UserError(
                f"{path}: [[datasets]] #{number} mixes subsets with and without metadata_file; "
                "put DreamBooth folders and fine-tuning metadata in separate [[datasets]]"
            )
        for sub_number, subset in enumerate(dataset.subsets, start=1):
            if subset.metadata_file is None and subset.image_dir is None:
                raise UserError(
                    f"{path}: [[datasets.subsets]] #{sub_number} of [[datasets]] #{number} needs "
                    "image_dir (a folder of images) or metadata_file (a fine-tuning .json/.jsonl)"
                )
    return config


def _describe_error(err: dict) -> str:
    loc = [part for part in err["loc"]]
    where, key = _location(loc)
    kind = err["type"]
    if kind == "extra_forbidden":
        return f"unknown key '{key}' in {where}{_hint(key, where)}"
    if kind == "missing":
        return f"key '{key}' is required in {where}"
    return f"'{key}' in {where}: {err['msg'].removeprefix('Value error, ')} (got {err.get('input')!r})"


def _location(loc: list) -> tuple[str, str]:
    """Turn pydantic's ('datasets', 0, 'subsets', 1, 'key') into readable text."""
    # union members add their type names (int, list[int] ...) to the location; drop them
    parts = [
        p
        for p in loc
        if isinstance(p, int) or not re.fullmatch(r"(int|float|str|bool|list\[.*\]|dict\[.*\])", p)
    ]
    where = "the top level"
    key = ""
    index = 0
    while index < len(parts):
        part = parts[index]
        if part == "general" and index + 1 < len(parts):
            where = "[general]"
        elif part == "datasets" and index + 1 < len(parts) and isinstance(parts[index + 1], int):
            where = f"[[datasets]] #{parts[index + 1] + 1}"
            index += 1
        elif part == "subsets" and index + 1 < len(parts) and isinstance(parts[index + 1], int):
            where = f"[[datasets.subsets]] #{parts[index + 1] + 1} of {where}"
            index += 1
        elif isinstance(part, str):
            key = part
        index += 1
    return where, key


def _hint(key: str, where: str) -> str:
    level = (
        "[[datasets.subsets]]"
        if "subsets" in where
        else "[[datasets]]"
        if "datasets" in where
        else "[general]"
    )
    if where == "the top level":
        close = difflib.get_close_matches(key, ["general", "datasets"], n=1)
        return f"; did you mean [{close[0]}]?" if close else "; only [general] and [[datasets]] are allowed"
    allowed_here = _LEVEL_FIELDS[level]
    elsewhere = [name for name, fields in _LEVEL_FIELDS.items() if key in fields and name != level]
    if elsewhere:
        return f"; '{key}' can only be set in {' or '.join(elsewhere)}"
    close = difflib.get_close_matches(key, sorted(allowed_here), n=1)
    return f"; did you mean '{close[0]}'?" if close else ""


# ----------------------------------------------------------------------------------------------
# resolved parameters


@dataclass(frozen=True)
class SubsetParams:
    """Everything one image folder (or metadata file) needs, after the value lookup."""

    source: str  # where it was defined, for messages
    image_dir: str | None
    metadata_file: str | None
    conditioning_data_dir: str | None
    is_reg: bool
    class_tokens: str | None
    caption_extension: str
    cache_info: bool
    num_repeats: int
    shuffle_caption: bool
    caption_separator: str
    keep_tokens: int
    keep_tokens_separator: str | None
    secondary_separator: str | None
    enable_wildcard: bool
    caption_prefix: str | None
    caption_suffix: str | None
    caption_dropout_rate: float
    caption_dropout_every_n_epochs: int
    caption_tag_dropout_rate: float
    token_warmup_min: int
    token_warmup_step: float
    color_aug: bool
    flip_aug: bool
    face_crop_aug_range: tuple[float, float] | None
    random_crop: bool
    alpha_mask: bool
    resize_interpolation: str | None


@dataclass(frozen=True)
class DatasetParams:
    """Settings shared by all subsets of one ``[[datasets]]``."""

    source: str
    batch_size: int
    resolution: tuple[int, int] | None
    enable_bucket: bool
    min_bucket_reso: int
    max_bucket_reso: int
    bucket_reso_steps: int
    bucket_no_upscale: bool
    skip_image_resolution: tuple[int, int] | None
    subsets: tuple[SubsetParams, ...]
    validation_split: float = 0.0  # the share of each subset's images held out for validation
    validation_seed: int | None = None  # which ones (default: the run's seed)

    @property
    def is_finetune(self) -> bool:
        return any(subset.metadata_file is not None for subset in self.subsets)


# kohya's command-line names where they differ from the config keys
_CLI_NAME = {"batch_size": "train_batch_size", "num_repeats": "dataset_repeats"}
SUBSET_KEYS = (
    "num_repeats",
    "shuffle_caption",
    "caption_separator",
    "keep_tokens",
    "keep_tokens_separator",
    "secondary_separator",
    "enable_wildcard",
    "caption_prefix",
    "caption_suffix",
    "caption_extension",
    "class_tokens",
    "cache_info",
    "token_warmup_min",
    "token_warmup_step",
    "caption_dropout_rate",
    "caption_dropout_every_n_epochs",
    "caption_tag_dropout_rate",
    "color_aug",
    "flip_aug",
    "face_crop_aug_range",
    "random_crop",
    "alpha_mask",
    "resize_interpolation",
    "is_reg",
)
DATASET_KEYS = (
    "batch_size",
    "resolution",
    "enable_bucket",
    "min_bucket_reso",
    "max_bucket_reso",
    "bucket_reso_steps",
    "bucket_no_upscale",
    "skip_image_resolution",
    "validation_split",
    "validation_seed",
)
# keys that are no command-line option (kohya's TI parser has none for them), with kohya's defaults
_CONFIG_ONLY_DEFAULTS = {
    "class_tokens": None,
    "is_reg": False,
    "caption_dropout_rate": 0.0,
    "caption_dropout_every_n_epochs": 0,
    "caption_tag_dropout_rate": 0.0,
    "skip_image_resolution": None,
}


def key_default(key: str) -> Any:
    """The value a key takes when neither the config nor the command line sets it: the option's default."""
    if key in _CONFIG_ONLY_DEFAULTS:
        return _CONFIG_ONLY_DEFAULTS[key]
    return default_of(DataOptions, _CLI_NAME.get(key, key))


def cli_values(options: DataOptions) -> dict[str, Any]:
    """The command-line values as config keys: the fallback after [general]."""
    values: dict[str, Any] = {}
    for key in (*SUBSET_KEYS, *DATASET_KEYS):
        name = _CLI_NAME.get(key, key)
        values[key] = getattr(options, name) if hasattr(options, name) else None
    if options.caption_extention is not None:  # kohya's old spelling wins, as in kohya
        values["caption_extension"] = options.caption_extention
    values["resolution"] = parse_resolution(options.resolution)
    values["face_crop_aug_range"] = parse_face_crop_range(options.face_crop_aug_range)
    if values.get("keep_tokens_separator") == "":
        values["keep_tokens_separator"] = None
    return values


def lookup(key: str, levels: list[dict[str, Any]], default: Any) -> Any:
    """The first value that is set (not None): subset, dataset, general, CLI; else the default."""
    for level in levels:
        value = level.get(key)
        if value is not None:
            return value
    return default


def _section_values(section: BaseModel | dict | None) -> dict[str, Any]:
    if section is None:
        return {}
    if isinstance(section, dict):
        return section
    return {key: value for key, value in section.model_dump().items() if key != "subsets"}


def resolve_subset(source: str, levels: list[dict[str, Any]]) -> SubsetParams:
    """Apply the lookup to every subset key."""
    value = {key: lookup(key, levels, key_default(key)) for key in SUBSET_KEYS}
    extension = value["caption_extension"]
    if extension and not extension.startswith("."):
        extension = "." + extension  # kohya adds the dot too
    face = parse_face_crop_range(value["face_crop_aug_range"], f"{source}: face_crop_aug_range")
    subset_level = levels[0]
    return SubsetParams(
        source=source,
        image_dir=subset_level.get("image_dir"),
        metadata_file=subset_level.get("metadata_file"),
        conditioning_data_dir=subset_level.get("conditioning_data_dir"),
        is_reg=bool(value["is_reg"]),
        class_tokens=value["class_tokens"],
        caption_extension=extension,
        cache_info=bool(value["cache_info"]),
        num_repeats=int(value["num_repeats"]),
        shuffle_caption=bool(value["shuffle_caption"]),
        caption_separator=value["caption_separator"] or ",",
        keep_tokens=int(value["keep_tokens"]),
        keep_tokens_separator=value["keep_tokens_separator"] or None,
        secondary_separator=value["secondary_separator"] or None,
        enable_wildcard=bool(value["enable_wildcard"]),
        caption_prefix=value["caption_prefix"],
        caption_suffix=value["caption_suffix"],
        caption_dropout_rate=float(value["caption_dropout_rate"]),
        caption_dropout_every_n_epochs=int(value["caption_dropout_every_n_epochs"]),
        caption_tag_dropout_rate=float(value["caption_tag_dropout_rate"]),
        token_warmup_min=int(value["token_warmup_min"]),
        token_warmup_step=float(value["token_warmup_step"]),
        color_aug=bool(value["color_aug"]),
        flip_aug=bool(value["flip_aug"]),
        face_crop_aug_range=face,
        random_crop=bool(value["random_crop"]),
        alpha_mask=bool(value["alpha_mask"]),
        resize_interpolation=value["resize_interpolation"],
    )


def resolve_dataset(
    source: str, levels: list[dict[str, Any]], subsets: tuple[SubsetParams, ...]
) -> DatasetParams:
    """Apply the lookup to every dataset key (a subset cannot set these)."""
    value = {key: lookup(key, levels, key_default(key)) for key in DATASET_KEYS}
    return DatasetParams(
        source=source,
        batch_size=int(value["batch_size"]),
        resolution=parse_resolution(value["resolution"], f"{source}: resolution"),
        enable_bucket=bool(value["enable_bucket"]),
        min_bucket_reso=int(value["min_bucket_reso"]),
        max_bucket_reso=int(value["max_bucket_reso"]),
        bucket_reso_steps=int(value["bucket_reso_steps"]),
        bucket_no_upscale=bool(value["bucket_no_upscale"]),
        skip_image_resolution=parse_resolution(
            value["skip_image_resolution"], f"{source}: skip_image_resolution"
        ),
        subsets=subsets,
        validation_split=_validation_share(value["validation_split"], source),
        validation_seed=value["validation_seed"],
    )


def _validation_share(value: Any, source: str) -> float:
    share = float(value or 0.0)
    if not 0.0 <= share < 1.0:
        raise UserError(f"{source}: validation_split {share}: use a share of the images, 0 to below 1")
    return share


def datasets_from_config(
    config: UserConfig, config_path: str | Path, cli: dict[str, Any]
) -> list[DatasetParams]:
    """Resolve a validated config file into datasets and subsets."""
    general = _section_values(config.general)
    _reject_unsupported(general, f"{config_path} [general]")
    datasets = []
    for number, section in enumerate(config.datasets, start=1):
        dataset_values = _section_values(section)
        where = f"{config_path} [[datasets]] #{number}"
        _reject_unsupported(dataset_values, where)
        subsets = []
        for sub_number, subset_section in enumerate(section.subsets, start=1):
            subset_values = _section_values(subset_section)
            _reject_unsupported(subset_values, f"{where} subset #{sub_number}")
            subset_values = _resolve_paths(subset_values, Path(config_path))
            levels = [subset_values, dataset_values, general, cli]
            subsets.append(resolve_subset(f"{where} subset #{sub_number}", levels))
        datasets.append(resolve_dataset(where, [dataset_values, general, cli], tuple(subsets)))
    return datasets


def _reject_unsupported(values: dict[str, Any], where: str) -> None:
    """Keys kohya has for other trainers: refuse what would change training, warn about the rest."""
    multiplier = values.get("network_multiplier")
    if multiplier not in (None, 1, 1.0):
        logger.warning(
            "%s: network_multiplier is a LoRA setting and has no effect on Textual Inversion", where
        )
    if values.get("custom_attributes"):
        logger.warning("%s: custom_attributes are not used by this trainer", where)


def _resolve_paths(values: dict[str, Any], config_path: Path) -> dict[str, Any]:
    """Relative paths are relative to the current folder (as in kohya), else to the config's folder."""
    resolved = dict(values)
    for key in ("image_dir", "metadata_file", "conditioning_data_dir"):
        value = resolved.get(key)
        if value is None or Path(value).is_absolute() or Path(value).exists():
            continue
        beside_config = config_path.parent / value
        if beside_config.exists():
            resolved[key] = str(beside_config)
    return resolved


def dreambooth_subsets_from_dirs(
    train_data_dir: str | None, reg_data_dir: str | None
) -> list[dict[str, Any]]:
    """Subset tables for kohya's folder layout ``<dir>/<repeats>_<class tokens>/``."""
    subsets = []
    for base, is_reg, flag in (
        (train_data_dir, False, "--train_data_dir"),
        (reg_data_dir, True, "--reg_data_dir"),
    ):
        if base is None:
            continue
        base_path = Path(base)
        if not base_path.is_dir():
            raise UserError(f"{flag}: folder {base} not found")
        found = []
        ignored = []
        for folder in sorted(p for p in base_path.iterdir() if p.is_dir()):
            repeats, _, class_tokens = folder.name.partition("_")
            if not repeats.isdigit():
                ignored.append(folder.name)
                continue
            if int(repeats) < 1:
                logger.warning("%s: ignoring %s (repeats must be at least 1)", flag, folder)
                continue
            found.append(
                {
                    "image_dir": str(folder),
                    "num_repeats": int(repeats),
                    "is_reg": is_reg,
                    "class_tokens": class_tokens,
                }
            )
        for name in ignored:
            logger.warning("%s: ignoring folder '%s' (its name does not start with <repeats>_)", flag, name)
        if not found:
            raise UserError(
                f"{flag} {base}: no image folder named <repeats>_<class tokens> (e.g. {base}/10_sks dog/); "
                "put the images in such a sub-folder"
            )
        subsets.extend(found)
    return subsets


def datasets_from_args(options: DataOptions) -> list[DatasetParams]:
    """The datasets of a run: from --dataset_config, else from the folder / metadata options."""
    cli = cli_values(options)
    if options.dataset_config is not None:
        given = {
            "train_data_dir": options.train_data_dir,
            "reg_data_dir": options.reg_data_dir,
            "in_json": options.in_json,
        }
        ignored = [flag for flag, value in given.items() if value]
        if ignored:
            logger.warning(
                "--dataset_config is used, so these options are ignored (as in kohya): %s",
                ", ".join("--" + flag for flag in ignored),
            )
        path = Path(options.dataset_config)
        return datasets_from_config(load_user_config(path), path, cli)
    if options.in_json is not None:
        subset = {"image_dir": options.train_data_dir, "metadata_file": options.in_json}
        where = f"--in_json {options.in_json}"
        return [resolve_dataset("command line", [cli], (resolve_subset(where, [subset, cli]),))]
    if options.train_data_dir is None:
        raise UserError("no training images: pass --train_data_dir, --in_json or --dataset_config")
    subsets = tuple(
        resolve_subset(f"folder {Path(table['image_dir']).name}", [table, cli])
        for table in dreambooth_subsets_from_dirs(options.train_data_dir, options.reg_data_dir)
    )
    return [resolve_dataset("command line", [cli], subsets)]
