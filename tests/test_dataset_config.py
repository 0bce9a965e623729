"""--dataset_config: kohya's schema, strict keys with helpful errors, and the value lookup order."""

from __future__ import annotations

import json
import logging

import pytest
from dataset_helpers import make_args, make_dreambooth, tokenizer_with

from library.errors import UserError
from library.training.dataset import build_train_dataset
from library.training.dataset.config import datasets_from_args, datasets_from_config, load_user_config

# the first example of kohya's docs/config_README-en.md, as-is
KOHYA_DOC_EXAMPLE = r"""
[general]
shuffle_caption = true
caption_extension = '.txt'
keep_tokens = 1

# This is a DreamBooth-style dataset
[[datasets]]
resolution = 512
batch_size = 4
keep_tokens = 2

  [[datasets.subsets]]
  image_dir = 'C:\hoge'
  class_tokens = 'hoge girl'
  # This subset uses keep_tokens = 2 (the value of the parent datasets)

  [[datasets.subsets]]
  image_dir = 'C:\fuga'
  class_tokens = 'fuga boy'
  keep_tokens = 3

  [[datasets.subsets]]
  is_reg = true
  image_dir = 'C:\reg'
  class_tokens = 'human'
  keep_tokens = 1

# This is a fine-tuning dataset
[[datasets]]
resolution = [768, 768]
batch_size = 2

  [[datasets.subsets]]
  image_dir = 'C:\piyo'
  metadata_file = 'C:\piyo\piyo_md.json'
  # This subset uses keep_tokens = 1 (the value of [general])
"""

# the secondary_separator / wildcard / keep_tokens_separator example of the same document
KOHYA_DOC_EXAMPLE_2 = """
[general]
flip_aug = true
color_aug = false
resolution = [1024, 1024]

[[datasets]]
batch_size = 6
enable_bucket = true
bucket_no_upscale = true
caption_extension = ".txt"
keep_tokens_separator= "|||"
shuffle_caption = true
caption_tag_dropout_rate = 0.1
secondary_separator = ";;;" # subset 側に書くこともできます / can be written in the subset side
enable_wildcard = true # 同上 / same as above

  [[datasets.subsets]]
  image_dir = "/path/to/image_dir"
  num_repeats = 1

  # ||| の前後はカンマは不要です（自動的に追加されます） / No comma is required before and after ||| (it is added automatically)
  caption_prefix = "1girl, hatsune miku, vocaloid |||"

  # ||| の後はシャッフル、drop されず残ります / After |||, it is not shuffled or dropped and remains
  # 単純に文字列として連結されるので、カンマなどは自分で入れる必要があります / It is simply concatenated as a string, so you need to put commas yourself
  caption_suffix = ", anime screencap ||| masterpiece, rating: general"
"""


def _write(tmp_path, text, name="config.toml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_kohya_doc_example_parses_as_is_with_kohyas_precedence(tmp_path):
    path = _write(tmp_path, KOHYA_DOC_EXAMPLE)
    datasets = datasets_from_config(load_user_config(path), path, cli={})
    dreambooth, finetune = datasets
    assert dreambooth.resolution == (512, 512) and dreambooth.batch_size == 4
    assert [s.keep_tokens for s in dreambooth.subsets] == [2, 3, 1]
    assert [s.is_reg for s in dreambooth.subsets] == [False, False, True]
    assert dreambooth.subsets[0].class_tokens == "hoge girl"
    assert dreambooth.subsets[0].caption_extension == ".txt" and dreambooth.subsets[0].shuffle_caption
    assert finetune.resolution == (768, 768) and finetune.batch_size == 2 and finetune.is_finetune
    assert finetune.subsets[0].keep_tokens == 1
    assert finetune.subsets[0].metadata_file == "C:\\piyo\\piyo_md.json"


def test_second_kohya_doc_example_parses_as_is(tmp_path):
    path = _write(tmp_path, KOHYA_DOC_EXAMPLE_2)
    (dataset,) = datasets_from_config(load_user_config(path), path, cli={})
    subset = dataset.subsets[0]
    assert dataset.resolution == (1024, 1024) and dataset.bucket_no_upscale
    assert subset.keep_tokens_separator == "|||" and subset.secondary_separator == ";;;"
    assert subset.flip_aug and subset.enable_wildcard and subset.caption_tag_dropout_rate == 0.1


def test_cli_values_are_the_fallback_after_general(tmp_path):
    path = _write(tmp_path, "[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'x'\nflip_aug = false\n")
    args = make_args(
        "--resolution",
        "448,640",
        "--flip_aug",
        "--caption_extension",
        "txt",
        "--train_batch_size",
        "3",
        dataset_config=path,
    )
    (dataset,) = datasets_from_args(args)
    assert dataset.resolution == (448, 640) and dataset.batch_size == 3
    assert dataset.subsets[0].caption_extension == ".txt"  # the dot is added, as in kohya
    assert dataset.subsets[0].flip_aug is False  # the subset's own value wins over the CLI


def test_caption_extention_old_spelling_still_works(tmp_path):
    config = _write(tmp_path, "[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'x'\n")
    args = make_args("--caption_extention", ".txt", "--resolution", "64", dataset_config=config)
    assert datasets_from_args(args)[0].subsets[0].caption_extension == ".txt"


def test_misspelled_key_names_key_level_and_file_with_a_suggestion(tmp_path):
    path = _write(tmp_path, "[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'x'\nnum_repeat = 3\n")
    with pytest.raises(UserError) as error:
        load_user_config(path)
    message = str(error.value)
    assert "num_repeat" in message and str(path) in message
    assert "[[datasets.subsets]] #1 of [[datasets]] #1" in message and "did you mean 'num_repeats'" in message


def test_dataset_key_in_a_subset_says_where_it_belongs(tmp_path):
    path = _write(tmp_path, "[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'x'\nresolution = 512\n")
    with pytest.raises(UserError, match=r"'resolution' can only be set in \[general\] or \[\[datasets\]\]"):
        load_user_config(path)


def test_unknown_section_is_named(tmp_path):
    with pytest.raises(UserError, match=r"unknown key 'generl'.*did you mean \[general\]"):
        load_user_config(_write(tmp_path, "[generl]\nflip_aug = true\n"))


def test_wrong_value_type_is_named(tmp_path):
    path = _write(tmp_path, "[general]\nnum_repeats = '10'\n")
    with pytest.raises(UserError, match=r"'num_repeats' in \[general\]"):
        load_user_config(path)


def test_invalid_toml_names_the_file(tmp_path):
    path = _write(tmp_path, "[general\nflip_aug = true\n")
    with pytest.raises(UserError, match="not valid TOML"):
        load_user_config(path)


def test_a_config_in_another_encoding_names_the_file_and_a_bom_is_dropped(tmp_path):
    latin = tmp_path / "latin.toml"
    latin.write_bytes("[general]\nclass_tokens = 'caf\u00e9'\n".encode("latin-1"))
    with pytest.raises(UserError, match=r"--dataset_config .*latin.toml: not UTF-8 text"):
        load_user_config(latin)
    marked = tmp_path / "marked.toml"
    marked.write_bytes("\ufeff[general]\nflip_aug = true\n".encode())
    assert load_user_config(marked).general.flip_aug is True


def test_windows_path_in_double_quotes_gets_a_hint(tmp_path):
    path = _write(tmp_path, '[[datasets]]\n[[datasets.subsets]]\nimage_dir = "C:\\hoge"\n')
    with pytest.raises(UserError, match="single quotes"):
        load_user_config(path)


def test_missing_config_and_unknown_format(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_user_config(tmp_path / "nope.toml")
    with pytest.raises(UserError, match=r"\.toml or \.json"):
        load_user_config(_write(tmp_path, "x", name="config.yaml"))


def test_json_config_is_accepted(tmp_path):
    config = {
        "general": {"resolution": [64, 128]},
        "datasets": [{"subsets": [{"image_dir": "x", "num_repeats": 2}]}],
    }
    path = _write(tmp_path, json.dumps(config), name="config.json")
    (dataset,) = datasets_from_config(load_user_config(path), path, cli={})
    assert dataset.resolution == (64, 128) and dataset.subsets[0].num_repeats == 2


def test_mixing_dreambooth_and_finetune_subsets_in_one_dataset_is_refused(tmp_path):
    text = "[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'a'\n[[datasets.subsets]]\nmetadata_file = 'm.json'\n"
    with pytest.raises(UserError, match="mixes subsets"):
        load_user_config(_write(tmp_path, text))


def test_subset_without_image_dir_or_metadata_is_refused(tmp_path):
    with pytest.raises(UserError, match="needs image_dir"):
        load_user_config(_write(tmp_path, "[[datasets]]\n[[datasets.subsets]]\nnum_repeats = 2\n"))


def test_validation_split_is_read_per_dataset_and_network_multiplier_warns(tmp_path, caplog):
    path = _write(tmp_path, "[general]\nvalidation_split = 0.25\nvalidation_seed = 3\n[[datasets]]\n")
    (dataset,) = datasets_from_config(load_user_config(path), path, cli={})
    assert (dataset.validation_split, dataset.validation_seed) == (0.25, 3)
    with pytest.raises(UserError, match="validation_split 1.5"):
        path = _write(tmp_path, "[general]\nvalidation_split = 1.5\n[[datasets]]\n")
        datasets_from_config(load_user_config(path), path, cli={})
    path = _write(tmp_path, "[general]\nnetwork_multiplier = 0.5\n[[datasets]]\n")
    with caplog.at_level(logging.WARNING):
        datasets_from_config(load_user_config(path), path, cli={})
    assert "network_multiplier" in caplog.text


def test_relative_image_dir_falls_back_to_the_config_folder(tmp_path, monkeypatch):
    make_dreambooth(tmp_path / "data", {"imgs": [(64, 64)]})
    path = _write(
        tmp_path / "data",
        "[general]\nresolution = 64\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'imgs'\n",
    )
    monkeypatch.chdir(tmp_path)
    args = make_args(dataset_config=path)
    dataset = build_train_dataset(args, tokenizer_with(), None, seed=0)
    assert dataset.num_train_images == 1


def test_config_options_reach_the_dataset(tmp_path):
    root = make_dreambooth(tmp_path, {"a": [(64, 64)] * 2, "r": [(64, 64)]}, captions={"a/img0": "sks one"})
    text = f"""
[general]
resolution = 64
caption_extension = ".txt"
[[datasets]]
batch_size = 2
  [[datasets.subsets]]
  image_dir = '{root / "a"}'
  num_repeats = 3
  class_tokens = 'sks dog'
  [[datasets.subsets]]
  image_dir = '{root / "r"}'
  is_reg = true
  class_tokens = 'dog'
"""
    args = make_args(dataset_config=_write(tmp_path, text), prior_loss_weight=0.5)
    dataset = build_train_dataset(args, tokenizer_with(), None, seed=0)
    assert dataset.num_train_images == 6 and dataset.num_reg_images == 1
    assert len(dataset) == 6  # 6 train + 6 balanced reg items in batches of 2
    weights = {w for i in range(len(dataset)) for w in dataset[i]["loss_weights"].tolist()}
    assert weights == {1.0, 0.5}


@pytest.mark.parametrize(
    "line, message",
    [
        (
            "num_repeats = -3",
            "'num_repeats' in [[datasets.subsets]] #1 of [[datasets]] #1: must be 0 or more",
        ),
        (
            "caption_dropout_rate = 1.5",
            "'caption_dropout_rate' in [[datasets.subsets]] #1 of [[datasets]] #1: must be a rate",
        ),
        (
            "keep_tokens = -1",
            "'keep_tokens' in [[datasets.subsets]] #1 of [[datasets]] #1: must be 0 or more",
        ),
    ],
)
def test_impossible_counts_name_the_key(tmp_path, line, message):
    config = tmp_path / "d.toml"
    config.write_text(f'[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = "x"\n{line}\n')
    with pytest.raises(UserError) as info:
        load_user_config(config)
    assert message in str(info.value)


def test_held_out_images_form_their_own_dataset(tmp_path):
    make_dreambooth(tmp_path, {"2_sks dog": [(64, 64)] * 8})
    args = make_args(
        "--train_data_dir",
        str(tmp_path),
        "--resolution",
        "64",
        "--validation_split",
        "0.25",
        "--validation_seed",
        "1",
    )
    dataset = build_train_dataset(args, tokenizer_with(), None, seed=0)
    held = {r.key for r in dataset.validation.records}
    assert len(held) == 2 and not held & {r.key for r in dataset.records} and len(dataset.records) == 6
    again = build_train_dataset(args, tokenizer_with(), None, seed=5)  # the validation seed decides
    assert {r.key for r in again.validation.records} == held
    assert len(dataset.validation.fixed_batches()) == 2  # held-out images count once, not per repeat
