"""--debug_dataset through the library entry point: printed items, new token ids, contact sheet."""

from __future__ import annotations

import re

import pytest
from dataset_helpers import SMALL_BUCKETS, make_args, make_dreambooth, make_image, tokenizer_with
from PIL import Image

from library.training.dataset import TokenCaptionRule, build_train_dataset


@pytest.fixture
def dataset(tmp_path):
    make_dreambooth(
        tmp_path / "train", {"2_sks dog": [(64, 64), (128, 64)]}, captions={"2_sks dog/img0": "a sks dog"}
    )
    make_image(tmp_path / "train" / "2_sks dog" / "clear.png", (64, 64), mode="RGBA")
    args = make_args(
        "--train_data_dir",
        str(tmp_path / "train"),
        "--resolution",
        "128,64",
        *SMALL_BUCKETS,
        "--caption_extension",
        ".txt",
        "--flip_aug",
        "--alpha_mask",
        "--train_batch_size",
        "2",
    )
    return build_train_dataset(args, tokenizer_with("sks", 3), TokenCaptionRule("sks", 3), seed=0)


def test_debug_prints_every_item_once_and_writes_a_contact_sheet(dataset, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("builtins.input", lambda *a: pytest.fail("debug_dataset must not wait for a key"))
    sheets = dataset.debug_dataset(tmp_path / "out")
    output = capsys.readouterr().out
    items = re.findall(r"^\[(\d+)/(\d+)\] batch \d+ item \d+: (.+)$", output, flags=re.M)
    assert len(items) == 6 and items[-1][0] == items[-1][1] == "6"  # 3 images x 2 repeats, one pass
    assert {path.rsplit("/", 1)[1] for _, _, path in items} == {"img0.png", "img1.png", "clear.png"}
    assert "bucket: 128x64" in output and "crop (l,t,r,b): (0, 0, 128, 64)" in output
    assert 'caption: "a sks sks1 sks2 dog"' in output and 'caption: "sks sks1 sks2 dog"' in output
    assert "input ids: tensor([[49406, 320, 49408, 49409, 49410, 1929, 49407, ...]])" in output
    assert re.search(r"flipped: (True|False)", output)
    assert sheets == [tmp_path / "out" / "debug_dataset_000.png"]
    with Image.open(sheets[0]) as sheet:
        assert sheet.size[0] >= 3 * 192 and sheet.size[1] >= 2 * 192
    assert f"contact sheet: {sheets[0]}" in output


def test_debug_stops_after_max_items_and_works_with_cached_latents(dataset, tmp_path, capsys):
    for record in dataset.records:  # pretend latents were cached: debug still shows the images
        record.latents = object()
    dataset.latents_cached = True
    dataset.debug_dataset(tmp_path / "out", max_items=2)
    output = capsys.readouterr().out
    assert output.count("input ids:") == 2 and "(showing 2)" in output
