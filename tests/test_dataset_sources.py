"""Sources: DreamBooth folders, regularization folders, fine-tuning JSON / JSONL metadata."""

from __future__ import annotations

import json
import logging
from collections import Counter

import pytest
from dataset_helpers import make_args, make_dreambooth, make_image, tokenizer_with

from library.errors import UserError
from library.training.dataset import build_train_dataset


def _build(*cli, **values):
    return build_train_dataset(make_args(*cli, **values), tokenizer_with(), None, seed=0)


def _keys_per_epoch(dataset, epoch=0):
    dataset.set_epoch(epoch)
    return Counter(key for i in range(len(dataset)) for key in dataset[i]["keys"])


def test_dreambooth_folder_name_gives_repeats_and_class_tokens(tmp_path):
    make_dreambooth(tmp_path / "train", {"3_sks dog": [(64, 64), (64, 64)], "not_numbered": [(64, 64)]})
    dataset = _build("--train_data_dir", str(tmp_path / "train"), "--resolution", "64")
    assert dataset.num_train_images == 6
    assert set(_keys_per_epoch(dataset).values()) == {3}
    assert {r.caption for r in dataset.records} == {"sks dog"}


def test_caption_file_wins_over_class_tokens_and_kohya_default_extension_is_caption(tmp_path):
    root = make_dreambooth(tmp_path, {"1_sks": [(64, 64), (64, 64)]})
    (root / "1_sks" / "img0.caption").write_text("sks on a beach\nsecond line", encoding="utf-8")
    (root / "1_sks" / "img1.txt").write_text("ignored: wrong extension", encoding="utf-8")
    dataset = _build("--train_data_dir", str(root), "--resolution", "64")
    captions = {r.path.name: r.caption for r in dataset.records}
    assert captions == {"img0.png": "sks on a beach", "img1.png": "sks"}


def test_wrong_caption_extension_gets_a_hint(tmp_path, caplog):
    root = make_dreambooth(tmp_path, {"1_sks": [(64, 64)]}, captions={"1_sks/img0": "sks"})
    with caplog.at_level(logging.WARNING):
        _build("--train_data_dir", str(root), "--resolution", "64")
    assert "--caption_extension .txt" in caplog.text


def test_reg_images_are_balanced_and_weighted(tmp_path):
    make_dreambooth(tmp_path / "train", {"2_sks dog": [(64, 64)] * 3})
    make_dreambooth(tmp_path / "reg", {"1_dog": [(64, 64)] * 2})
    dataset = _build(
        "--train_data_dir",
        str(tmp_path / "train"),
        "--reg_data_dir",
        str(tmp_path / "reg"),
        "--resolution",
        "64",
        "--prior_loss_weight",
        "0.25",
    )
    assert dataset.num_train_images == 6 and dataset.num_reg_images == 2
    counts = _keys_per_epoch(dataset)
    reg_items = sum(n for key, n in counts.items() if "/reg/" in key)
    assert reg_items == 6  # reg repeats raised until they match the 6 train items
    for index in range(len(dataset)):
        batch = dataset[index]
        for key, weight in zip(batch["keys"], batch["loss_weights"].tolist()):
            assert weight == (0.25 if "/reg/" in key else 1.0)


def test_more_reg_than_train_images_uses_only_some(tmp_path, caplog):
    make_dreambooth(tmp_path / "train", {"1_sks": [(64, 64)]})
    make_dreambooth(tmp_path / "reg", {"1_dog": [(64, 64)] * 3})
    with caplog.at_level(logging.WARNING):
        dataset = _build(
            "--train_data_dir",
            str(tmp_path / "train"),
            "--reg_data_dir",
            str(tmp_path / "reg"),
            "--resolution",
            "64",
        )
    assert sum(1 for r in dataset.records if r.is_reg) == 1
    assert "more regularization images" in caplog.text


@pytest.mark.parametrize(
    ("setup", "flag", "message"),
    [
        (lambda p: None, "--train_data_dir", "not found"),
        (lambda p: (p / "train").mkdir(), "--train_data_dir", "<repeats>_<class tokens>"),
        (lambda p: (p / "train" / "5_sks").mkdir(parents=True), "--train_data_dir", "no images"),
    ],
)
def test_folder_mistakes_are_user_errors(tmp_path, setup, flag, message):
    setup(tmp_path)
    with pytest.raises(UserError, match=message):
        _build(flag, str(tmp_path / "train"), "--resolution", "64")


def test_missing_reg_folder_and_no_source_are_user_errors(tmp_path):
    make_dreambooth(tmp_path / "train", {"1_sks": [(64, 64)]})
    with pytest.raises(UserError, match="--reg_data_dir"):
        _build(
            "--train_data_dir",
            str(tmp_path / "train"),
            "--reg_data_dir",
            str(tmp_path / "nope"),
            "--resolution",
            "64",
        )
    with pytest.raises(UserError, match="--train_data_dir, --in_json or --dataset_config"):
        _build("--resolution", "64")


def test_missing_resolution_is_a_user_error(tmp_path):
    make_dreambooth(tmp_path / "train", {"1_sks": [(64, 64)]})
    with pytest.raises(UserError, match="resolution is required"):
        _build("--train_data_dir", str(tmp_path / "train"))


def test_in_json_metadata_with_tags_and_repeats(tmp_path):
    make_image(tmp_path / "imgs" / "a.png")
    make_image(tmp_path / "imgs" / "b.jpg", seed=1)
    metadata = {"a.png": {"caption": "sks cat", "tags": "red, cute"}, "b": {"tags": "sks, blue"}}
    (tmp_path / "meta.json").write_text(json.dumps(metadata), encoding="utf-8")
    dataset = _build(
        "--in_json",
        str(tmp_path / "meta.json"),
        "--train_data_dir",
        str(tmp_path / "imgs"),
        "--resolution",
        "64",
        "--dataset_repeats",
        "2",
    )
    assert dataset.num_train_images == 4
    assert sorted(r.caption for r in dataset.records) == ["sks cat,red, cute", "sks, blue"]


def test_in_json_jsonl_lines(tmp_path):
    make_image(tmp_path / "a.png")
    make_image(tmp_path / "b.webp", seed=1)
    lines = [
        {"file_name": "a.png", "text": "sks one"},
        {"image_path": str(tmp_path / "b.webp"), "caption": "sks two"},
    ]
    (tmp_path / "meta.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n", encoding="utf-8")
    dataset = _build("--in_json", str(tmp_path / "meta.jsonl"), "--resolution", "64")
    assert sorted(r.caption for r in dataset.records) == ["sks one", "sks two"]


def test_in_json_train_resolution_gives_fixed_buckets(tmp_path):
    make_image(tmp_path / "a.png", (100, 60))
    (tmp_path / "m.json").write_text(json.dumps({"a.png": {"caption": "x", "train_resolution": [128, 64]}}))
    dataset = _build("--in_json", str(tmp_path / "m.json"), "--train_data_dir", str(tmp_path))
    assert dataset[0]["images"].shape == (1, 3, 64, 128)


def test_in_json_missing_images_and_bad_json_are_user_errors(tmp_path):
    make_image(tmp_path / "a.png")
    (tmp_path / "m.json").write_text(json.dumps({"a.png": {"caption": "x"}, "gone.png": {"caption": "y"}}))
    with pytest.raises(UserError, match=r"1 images of .*m.json not found.*first: gone.png.*1 were found"):
        _build("--in_json", str(tmp_path / "m.json"), "--train_data_dir", str(tmp_path), "--resolution", "64")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        _build("--in_json", str(tmp_path / "bad.json"), "--resolution", "64")
    (tmp_path / "bad.jsonl").write_text('{"caption": "no image key"}\n')
    with pytest.raises(UserError, match=r"line 1: name the image"):
        _build("--in_json", str(tmp_path / "bad.jsonl"), "--resolution", "64")
    with pytest.raises(UserError, match="not found"):
        _build("--in_json", str(tmp_path / "nope.json"), "--resolution", "64")


def test_cache_info_writes_and_reuses_metadata_cache(tmp_path):
    root = make_dreambooth(tmp_path, {"1_sks": [(64, 64), (64, 96)]})
    _build("--train_data_dir", str(root), "--resolution", "64", "--cache_info")
    cache = json.loads((root / "1_sks" / "metadata_cache.json").read_text())
    assert sorted(entry["resolution"] for entry in cache.values()) == [[64, 64], [64, 96]]
    for entry in cache.values():
        entry["caption"] = "from the cache"
    (root / "1_sks" / "metadata_cache.json").write_text(json.dumps(cache))
    dataset = _build("--train_data_dir", str(root), "--resolution", "64", "--cache_info")
    assert {r.caption for r in dataset.records} == {"from the cache"}


def test_skip_image_resolution_and_duplicate_subsets(tmp_path, caplog):
    root = make_dreambooth(tmp_path, {"imgs": [(64, 64), (128, 128)]})
    config = tmp_path / "c.toml"
    config.write_text(
        f"[general]\nresolution = 64\n[[datasets]]\nskip_image_resolution = 64\n"
        f"[[datasets.subsets]]\nimage_dir = '{root / 'imgs'}'\n[[datasets.subsets]]\nimage_dir = '{root / 'imgs'}'\n"
    )
    with caplog.at_level(logging.WARNING):
        dataset = _build(dataset_config=config)
    assert [r.size for r in dataset.records] == [(128, 128)]
    assert "listed twice" in caplog.text
