"""Captions: kohya's processing rules, the fixes, and the Textual Inversion caption rules."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from dataset_helpers import make_args, make_dreambooth, tokenizer_with

from library.errors import UserError
from library.training.dataset import OBJECT_TEMPLATES, STYLE_TEMPLATES, TokenCaptionRule, build_train_dataset
from library.training.dataset.captions import CaptionSettings, process_caption, read_caption_file


def _process(caption, seed=0, **settings):
    step = settings.pop("step", 0)
    max_train_steps = settings.pop("max_train_steps", 0)
    epoch = settings.pop("epoch", 0)
    return process_caption(
        caption,
        CaptionSettings(**settings),
        np.random.default_rng(seed),
        epoch=epoch,
        step=step,
        max_train_steps=max_train_steps,
    )


def test_prefix_and_suffix_are_joined_with_a_space():
    assert _process("a dog", caption_prefix="best,", caption_suffix=", outdoors") == "best, a dog , outdoors"


def test_without_wildcards_only_the_first_line_is_used():
    assert _process("first line\nsecond line") == "first line"


def test_shuffle_keeps_the_first_keep_tokens_parts():
    caption = "sks, a, b, c, d, e, f"
    results = {_process(caption, seed=s, shuffle_caption=True, keep_tokens=1) for s in range(20)}
    assert len(results) > 5
    for result in results:
        parts = result.split(", ")
        assert parts[0] == "sks" and sorted(parts[1:]) == ["a", "b", "c", "d", "e", "f"]


def test_custom_caption_separator_splits_and_rejoins():
    caption = "sks; a, b; c"
    for seed in range(10):
        parts = _process(
            caption, seed=seed, shuffle_caption=True, keep_tokens=1, caption_separator=";"
        ).split("; ")
        assert parts[0] == "sks" and sorted(parts[1:]) == ["a, b", "c"]


def test_keep_tokens_separator_fixes_both_ends_and_is_removed_even_without_shuffle():
    caption = "sks, girl ||| red, blue, green ||| best quality"
    assert _process(caption, keep_tokens_separator="|||") == "sks, girl, red, blue, green, best quality"
    for seed in range(10):
        parts = _process(caption, seed=seed, keep_tokens_separator="|||", shuffle_caption=True).split(", ")
        assert parts[:2] == ["sks", "girl"] and parts[-1] == "best quality"
        assert sorted(parts[2:-1]) == ["blue", "green", "red"]


def test_secondary_separator_keeps_groups_together_then_becomes_the_separator():
    caption = "sks, sky;;;cloud;;;day, outdoors"
    for seed in range(10):
        result = _process(caption, seed=seed, shuffle_caption=True, secondary_separator=";;;")
        assert "sky,cloud,day" in result


def test_wildcards_pick_options_and_lines_and_keep_escaped_braces():
    caption = "sks, {red|blue} background, {{retro}}\nsks alone"
    results = {_process(caption, seed=s, enable_wildcard=True) for s in range(40)}
    assert results == {"sks, red background, {retro}", "sks, blue background, {retro}", "sks alone"}


def test_token_warmup_grows_the_caption():
    caption = "a, b, c, d, e"
    settings = {"token_warmup_min": 1, "token_warmup_step": 10}
    assert _process(caption, step=0, **settings) == "a"
    assert _process(caption, step=5, **settings) == "a, b, c"
    assert _process(caption, step=10, **settings) == caption


def test_fractional_token_warmup_uses_max_train_steps():
    caption = "a, b, c, d, e"
    assert _process(caption, step=0, token_warmup_step=0.5, max_train_steps=100) == "a"
    assert _process(caption, step=50, token_warmup_step=0.5, max_train_steps=100) == caption


def test_caption_dropout_and_tag_dropout():
    assert _process("sks, dog", caption_dropout_rate=1.0) == ""
    assert (
        _process("sks, dog", caption_dropout_every_n_epochs=2, epoch=1) == ""
    )  # the 2nd epoch, counted from 1
    assert _process("sks, dog", caption_dropout_every_n_epochs=2, epoch=0) == "sks, dog"
    assert _process("sks, a, b", caption_tag_dropout_rate=1.0, keep_tokens=1) == "sks"


def test_caption_files_are_utf8_and_empty_files_fall_back(tmp_path):
    (tmp_path / "a.txt").write_text("\ufeffsks café\nmore", encoding="utf-8")
    assert read_caption_file(tmp_path / "a.txt", enable_wildcard=False) == "sks café"
    assert read_caption_file(tmp_path / "a.txt", enable_wildcard=True) == "sks café\nmore"
    (tmp_path / "empty.txt").write_text("")
    assert read_caption_file(tmp_path / "empty.txt", enable_wildcard=False) is None
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(UserError, match="not UTF-8"):
        read_caption_file(tmp_path / "latin1.txt", enable_wildcard=False)


def test_token_is_expanded_as_a_whole_word_only():
    rule = TokenCaptionRule("sks", 3)
    rng = np.random.default_rng(0)
    assert rule.apply("a sks dog, sksy, sks1", rng) == "a sks sks1 sks2 dog, sksy, sks1"
    assert TokenCaptionRule("sks", 1).apply("a sks dog", rng) == "a sks dog"


def test_templates_replace_the_caption():
    rng = np.random.default_rng(0)
    produced = {TokenCaptionRule("sks", 2, "object").apply("ignored", rng) for _ in range(200)}
    assert produced == {t.format("sks sks1") for t in OBJECT_TEMPLATES}
    style = TokenCaptionRule("sks", 1, "style").apply("ignored", rng)
    assert style in {t.format("sks") for t in STYLE_TEMPLATES}
    assert len(OBJECT_TEMPLATES) == 27 and len(STYLE_TEMPLATES) == 19
    with pytest.raises(UserError):
        TokenCaptionRule("sks", 1, "portrait")


def _dataset(tmp_path, rule, captions, *extra):
    make_dreambooth(tmp_path / "train", {"1_dog": [(64, 64)] * len(captions)})
    for index, caption in enumerate(captions):
        (tmp_path / "train" / "1_dog" / f"img{index}.txt").write_text(caption)
    args = make_args(
        "--train_data_dir",
        str(tmp_path / "train"),
        "--resolution",
        "64",
        "--caption_extension",
        ".txt",
        *extra,
    )
    return build_train_dataset(args, tokenizer_with(), rule, seed=0)


def test_dataset_captions_carry_the_expanded_token(tmp_path):
    dataset = _dataset(tmp_path, TokenCaptionRule("sks", 3), ["a sks dog"], "--caption_prefix", "photo,")
    assert dataset[0]["captions"] == ["photo, a sks sks1 sks2 dog"]


def test_dataset_templates_do_not_touch_reg_captions(tmp_path):
    make_dreambooth(tmp_path / "reg", {"1_dog": [(64, 64)]})
    dataset = _dataset(
        tmp_path, TokenCaptionRule("sks", 2, "object"), ["a dog"], "--reg_data_dir", str(tmp_path / "reg")
    )
    captions = {
        key: caption
        for i in range(len(dataset))
        for key, caption in zip(dataset[i]["keys"], dataset[i]["captions"])
    }
    assert {c for k, c in captions.items() if "/reg/" in k} == {"dog"}
    assert all("sks sks1" in c for k, c in captions.items() if "/train/" in k)


def test_no_caption_with_the_token_stops_with_an_explanation(tmp_path):
    dataset = _dataset(tmp_path, TokenCaptionRule("sks", 1), ["a dog", "a sksy dog"])
    with pytest.raises(UserError, match=r"no caption contains the token string 'sks'.*--use_object_template"):
        dataset.verify_token_in_captions()


def test_some_captions_without_the_token_give_a_counted_warning(tmp_path, caplog):
    dataset = _dataset(tmp_path, TokenCaptionRule("sks", 1), ["a dog", "a sks dog", "sks"])
    with caplog.at_level(logging.WARNING):
        dataset.verify_token_in_captions()
    assert "1 of 3 training images have no 'sks'" in caplog.text


def test_templates_and_folder_class_tokens_satisfy_the_token_check(tmp_path):
    _dataset(tmp_path / "t", TokenCaptionRule("sks", 1, "style"), ["a dog"]).verify_token_in_captions()
    make_dreambooth(tmp_path / "f" / "train", {"2_sks dog": [(64, 64)]})
    args = make_args("--train_data_dir", str(tmp_path / "f" / "train"), "--resolution", "64")
    build_train_dataset(args, tokenizer_with(), TokenCaptionRule("sks", 1), seed=0).verify_token_in_captions()
