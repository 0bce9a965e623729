"""Augmentation, determinism (resume, DataLoader workers) and token warm-up through the dataset."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from dataset_helpers import SMALL_BUCKETS, make_args, make_dreambooth, make_image, tokenizer_with
from PIL import Image

from library.training.dataset import (
    TokenCaptionRule,
    build_train_dataset,
    collate_batch,
    make_train_dataloader,
)
from library.training.dataset.augment import color_aug, shift_hue


def _build(*cli, seed=0, rule=None, **values):
    return build_train_dataset(make_args(*cli, **values), tokenizer_with(), rule, seed=seed)


def _folder(tmp_path, sizes, caption=None):
    make_dreambooth(tmp_path / "train", {"1_sks": sizes})
    if caption is not None:
        for index in range(len(sizes)):
            (tmp_path / "train" / "1_sks" / f"img{index}.txt").write_text(caption)
    return str(tmp_path / "train")


def test_flip_mirrors_the_image_about_half_the_time(tmp_path):
    dataset = _build("--train_data_dir", _folder(tmp_path, [(64, 64)]), "--resolution", "64", "--flip_aug")
    by_flip = {}
    for epoch in range(12):
        dataset.set_epoch(epoch)
        batch = dataset[0]
        by_flip.setdefault(batch["flipped"][0], batch["images"][0])
    assert set(by_flip) == {True, False}
    assert torch.equal(by_flip[True], torch.flip(by_flip[False], dims=[2]))


def test_centre_crop_is_fixed_and_random_crop_moves(tmp_path):
    folder = _folder(tmp_path, [(192, 64)])
    common = ("--train_data_dir", folder, "--resolution", "64", *SMALL_BUCKETS, "--max_bucket_reso", "64")
    centred = _build(*common)
    assert centred.records[0].bucket == (64, 64)
    item = centred.build_item(centred.records[0], 0, 0, 0, use_cache=False)
    assert item.crop == (64, 0, 128, 64)
    moving = _build(*common, "--random_crop")
    lefts = {
        moving.build_item(moving.records[0], epoch, 0, 0, use_cache=False).crop[0] for epoch in range(10)
    }
    assert len(lefts) > 3 and all(0 <= left <= 128 for left in lefts)


def test_random_crop_without_buckets_crops_at_the_images_own_scale(tmp_path):
    folder = _folder(tmp_path, [(128, 96)])
    dataset = _build("--train_data_dir", folder, "--resolution", "64", "--random_crop")
    original = np.asarray(Image.open(tmp_path / "train" / "1_sks" / "img0.png"))
    item = dataset.build_item(dataset.records[0], 0, 0, 0, use_cache=False, keep_pixels=True)
    left, top, right, bottom = item.crop
    assert item.resized == (128, 96)
    assert np.array_equal(item.pixels, original[top:bottom, left:right])


def test_face_crop_centres_the_face_at_the_requested_size(tmp_path):
    make_image(tmp_path / "train" / "1_sks" / "portrait_200_200_40_40.png", (256, 256))
    dataset = _build(
        "--train_data_dir", str(tmp_path / "train"), "--resolution", "64", "--face_crop_aug_range", "2.0,2.0"
    )
    item = dataset.build_item(dataset.records[0], 0, 0, 0, use_cache=False)
    assert item.resized == (205, 205)  # face 40px * 0.8 = 32px = half of the 64px crop
    assert item.crop == (128, 128, 192, 192)  # centred on the face at (160, 160)


def test_gamma_is_a_small_change_on_0_1_values():
    grey = np.full((4, 4, 3), 128, dtype=np.uint8)
    white = np.full((4, 4, 3), 255, dtype=np.uint8)
    colour = np.full((4, 4, 3), (200, 100, 50), dtype=np.uint8)
    changed = 0
    for seed in range(300):
        out = color_aug(grey, np.random.default_rng(seed))
        assert np.abs(out.astype(int) - 128).max() <= 5  # kohya's 0-255 gamma moves grey by ~30
        assert np.array_equal(color_aug(white, np.random.default_rng(seed)), white)
        changed += int(not np.array_equal(color_aug(colour, np.random.default_rng(seed)), colour))
    assert 70 < changed < 130  # applied about a third of the time


def test_hue_shift_works_on_rgb_not_bgr():
    red = np.array([[[1.0, 0.0, 0.0]]])
    towards_yellow = shift_hue(red, 8 / 180)
    towards_magenta = shift_hue(red, -8 / 180)
    assert towards_yellow[0, 0, 1] > 0.2 and towards_yellow[0, 0, 2] == 0
    assert towards_magenta[0, 0, 2] > 0.2 and towards_magenta[0, 0, 1] == 0
    assert np.allclose(shift_hue(np.array([[[0.2, 0.5, 0.9]]]), 0.0), [[[0.2, 0.5, 0.9]]])


def test_color_aug_changes_some_epochs(tmp_path):
    dataset = _build("--train_data_dir", _folder(tmp_path, [(64, 64)]), "--resolution", "64", "--color_aug")
    plain = _build("--train_data_dir", str(tmp_path / "train"), "--resolution", "64")[0]["images"]
    changed = 0
    for epoch in range(12):
        dataset.set_epoch(epoch)
        changed += int(not torch.equal(dataset[0]["images"], plain))
    assert 0 < changed < 12


def _everything_random(tmp_path, seed=0):
    folder = _folder(tmp_path, [(64, 64), (96, 64), (64, 64)], caption="sks, {red|blue}, a, b, c")
    return _build(
        "--train_data_dir",
        folder,
        "--resolution",
        "64",
        *SMALL_BUCKETS,
        "--train_batch_size",
        "2",
        "--flip_aug",
        "--color_aug",
        "--random_crop",
        "--shuffle_caption",
        "--keep_tokens",
        "1",
        "--enable_wildcard",
        "--caption_extension",
        ".txt",
        seed=seed,
        rule=TokenCaptionRule("sks", 2),
    )


def _same(a, b):
    assert a["keys"] == b["keys"] and a["captions"] == b["captions"] and a["flipped"] == b["flipped"]
    assert torch.equal(a["images"], b["images"])


def test_a_resumed_run_gets_the_same_batches_mid_epoch(tmp_path):
    uninterrupted = _everything_random(tmp_path)
    uninterrupted.set_epoch(2)
    expected = [uninterrupted[i] for i in range(len(uninterrupted))]
    resumed = _everything_random(tmp_path)  # a new process after a restart
    resumed.set_epoch(2)
    for index in range(1, len(resumed)):  # starts in the middle of the epoch
        _same(resumed[index], expected[index])


def test_dataloader_workers_give_the_same_batches_and_follow_set_epoch(tmp_path):
    dataset = _everything_random(tmp_path)
    direct = {}
    for epoch in (0, 1):
        dataset.set_epoch(epoch)
        direct[epoch] = [dataset[i] for i in range(len(dataset))]
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=1, shuffle=False, collate_fn=collate_batch, num_workers=2, persistent_workers=True
    )
    for epoch in (0, 1):
        dataset.set_epoch(epoch)  # persistent workers must see it
        for index, batch in enumerate(loader):
            _same(batch, direct[epoch][index])
    assert [b["keys"] for b in direct[0]] != [b["keys"] for b in direct[1]]


def test_token_warmup_follows_the_batch_position(tmp_path):
    folder = _folder(tmp_path, [(64, 64)], caption="a, b, c, d, e")
    dataset = _build(
        "--train_data_dir",
        folder,
        "--resolution",
        "64",
        "--caption_extension",
        ".txt",
        "--token_warmup_min",
        "1",
        "--token_warmup_step",
        "4",
    )
    assert len(dataset) == 1
    dataset.set_run_length(8, steps_per_epoch=1)
    captions = []
    for epoch in range(5):
        dataset.set_epoch(epoch)
        captions.append(dataset[0]["captions"][0])
    assert captions == ["a", "a, b", "a, b, c", "a, b, c, d", "a, b, c, d, e"]
    # 1 batch per epoch with gradient accumulation 2: the epoch's partial group is its step, one per epoch
    dataset.set_run_length(8, steps_per_epoch=1, accumulation=2)
    dataset.set_epoch(2)
    assert dataset[0]["captions"][0] == "a, b, c"


def test_collate_batch_passes_the_dataset_batch_through():
    batch = {"keys": ["a"]}
    assert collate_batch([batch]) is batch
    with pytest.raises(ValueError, match="batch_size=1"):
        collate_batch([batch, batch])


def test_make_train_dataloader_honours_kohyas_worker_options(tmp_path):
    dataset = _build("--train_data_dir", _folder(tmp_path, [(64, 64)]), "--resolution", "64")
    args = make_args("--max_data_loader_n_workers", "1", "--persistent_data_loader_workers")
    loader = make_train_dataloader(dataset, args)
    assert loader.num_workers == 1 and loader.persistent_workers and loader.batch_size == 1
    assert isinstance(loader.sampler, torch.utils.data.SequentialSampler)
    assert [batch["keys"] for batch in loader] == [dataset[0]["keys"]]
    no_workers = make_train_dataloader(
        dataset, make_args("--max_data_loader_n_workers", "0", "--persistent_data_loader_workers")
    )
    assert no_workers.num_workers == 0 and not no_workers.persistent_workers


def test_fractional_warmup_without_max_train_steps_warns(tmp_path, caplog):
    folder = _folder(tmp_path, [(64, 64)], caption="a, b, c")
    dataset = _build(
        "--train_data_dir",
        folder,
        "--resolution",
        "64",
        "--caption_extension",
        ".txt",
        "--token_warmup_step",
        "0.5",
    )
    with caplog.at_level("WARNING"):
        assert dataset[0]["captions"] == ["a, b, c"]
    assert "set_run_length" in caplog.text
