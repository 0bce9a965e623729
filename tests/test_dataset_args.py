"""The dataset options match kohya's names, types, defaults and choices."""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

import pytest

from library.errors import UserError
from library.training.dataset import add_dataset_arguments
from library.training.dataset.args import parse_face_crop_range, parse_resolution

ROOT = Path(__file__).resolve().parent.parent
TSV = Path(__file__).resolve().parent / "data" / "kohya-ti-options.tsv"
AREAS = {"dataset", "captions", "augmentation", "buckets", "latent cache", "masks"}
TYPES = {"str": str, "int": int, "float": float, "Path": Path}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_dataset_arguments(parser)
    return parser


def _reference_rows() -> list[dict[str, str]]:
    lines = TSV.read_text(encoding="utf-8").splitlines()
    header = lines[0].split("\t")
    rows = [dict(zip(header, line.split("\t") + [""] * len(header))) for line in lines[1:] if line.strip()]
    return [row for row in rows if row["area"] in AREAS]


def test_every_reference_option_has_kohyas_type_default_and_choices():
    actions = {a.option_strings[0]: a for a in _parser()._actions if a.option_strings}
    rows = _reference_rows()
    assert len(rows) > 25
    for row in rows:
        action = actions.get(row["option"])
        assert action is not None, row["option"]
        if row["type"] == "store_true":
            assert isinstance(action, argparse._StoreTrueAction), row["option"]
        else:
            assert action.type is TYPES[row["type"]], row["option"]
        assert action.default == ast.literal_eval(row["default"]), row["option"]
        if row["choices"]:
            assert list(action.choices) == ast.literal_eval(row["choices"]), row["option"]


def test_kohya_dataset_options_outside_the_table_exist_with_kohya_defaults():
    args = _parser().parse_args([])
    assert args.caption_extension == ".caption"
    assert args.caption_separator == ","
    assert args.keep_tokens == 0 and args.keep_tokens_separator == ""
    assert args.prior_loss_weight == 1.0
    assert args.masked_loss is False and args.shuffle_caption is False
    assert args.train_data_dir is None and args.reg_data_dir is None and args.conditioning_data_dir is None


def test_a_kohya_command_line_parses_unchanged():
    args = _parser().parse_args(
        [
            "--train_data_dir=/data/train",
            "--reg_data_dir=/data/reg",
            "--resolution=448,640",
            "--caption_extention=.txt",
            "--keep_tokens=1",
            "--shuffle_caption",
            "--enable_bucket",
            "--bucket_no_upscale",
            "--cache_latents_to_disk",
            "--max_token_length=225",
            "--resize_interpolation=lanczos",
            "--face_crop_aug_range=2.0,4.0",
        ]
    )
    assert args.resolution == "448,640" and args.max_token_length == 225
    assert args.caption_extention == ".txt"


@pytest.mark.parametrize(
    ("value", "expected"),
    [("512", (512, 512)), ("448,640", (448, 640)), (768, (768, 768)), ([512, 768], (512, 768))],
)
def test_resolution_is_width_height(value, expected):
    assert parse_resolution(value) == expected


@pytest.mark.parametrize("value", ["abc", "1,2,3", "0", "-5", "100000", "512,10240"])
def test_bad_resolution_is_a_user_error_naming_the_flag(value):
    with pytest.raises(UserError, match="--resolution"):
        parse_resolution(value)


def test_face_crop_range_must_be_ordered_pairs():
    assert parse_face_crop_range("2.0,4.0") == (2.0, 4.0)
    with pytest.raises(UserError, match="--face_crop_aug_range"):
        parse_face_crop_range("4.0,2.0")
    with pytest.raises(UserError, match="--face_crop_aug_range"):
        parse_face_crop_range("x")
