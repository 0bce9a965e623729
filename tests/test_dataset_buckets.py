"""Buckets: kohya's bucket set and choice, one bucket per batch, seeded order, settings checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from dataset_helpers import SMALL_BUCKETS, make_args, make_dreambooth, tokenizer_with
from PIL import Image

from library.errors import UserError
from library.training.dataset import build_train_dataset
from library.training.dataset.buckets import BucketSelector, kohya_crop_ltrb, make_bucket_resolutions


def _build(*cli, seed=0, **values):
    return build_train_dataset(make_args(*cli, **values), tokenizer_with(), None, seed=seed)


def test_bucket_set_for_512_matches_kohya():
    wide = [
        (512, 512),
        (576, 448),
        (640, 384),
        (704, 320),
        (768, 320),
        (832, 256),
        (896, 256),
        (960, 256),
        (1024, 256),
    ]
    expected = sorted({*wide, *((h, w) for w, h in wide)})
    assert make_bucket_resolutions((512, 512), 256, 1024, 64) == expected


def test_bucket_choice_is_nearest_aspect_and_resize_covers_it():
    selector = BucketSelector((512, 512), True, 256, 1024, 64, False)
    choice = selector.select(1000, 500)
    assert choice.bucket == (704, 320) and choice.resized == (704, 352)
    assert selector.select(512, 512).bucket == (512, 512)
    tall = selector.select(300, 900)  # aspect 0.333: nearest bucket 256x832 (0.308), match heights
    assert tall.bucket == (256, 832) and tall.resized == (277, 832)


def test_no_upscale_buckets_come_from_the_image_size():
    selector = BucketSelector((512, 512), True, 256, 1024, 64, True)
    small = selector.select(300, 200)
    assert small.resized == (300, 200) and small.bucket == (256, 192)
    large = selector.select(2000, 1000)
    assert large.resized == (640, 320) and large.bucket == (640, 320)


def test_without_buckets_the_image_covers_the_resolution():
    selector = BucketSelector((64, 96), False, 256, 1024, 64, False)
    choice = selector.select(200, 100)
    assert choice.bucket == (64, 96) and choice.resized == (192, 96)


def test_kohya_crop_box_is_the_image_fitted_inside_the_bucket():
    assert kohya_crop_ltrb((512, 512), (1024, 512)) == (0, 128.0, 512, 384.0)


def _mixed_dataset(tmp_path, *extra, seed=0):
    sizes = [(64, 64)] * 3 + [(128, 64)] * 3 + [(64, 128)] * 2
    make_dreambooth(tmp_path / "train", {"2_sks": sizes})
    return _build(
        "--train_data_dir",
        str(tmp_path / "train"),
        "--resolution",
        "64",
        *SMALL_BUCKETS,
        "--train_batch_size",
        "2",
        *extra,
        seed=seed,
    )


def test_every_batch_comes_from_one_bucket(tmp_path):
    dataset = _mixed_dataset(tmp_path)
    assert len(dataset) == 3 + 3 + 2  # ceil(6/2) + ceil(6/2) + ceil(4/2)
    buckets = {r.key: r.bucket for r in dataset.records}
    for index in range(len(dataset)):
        batch = dataset[index]
        assert len({buckets[key] for key in batch["keys"]}) == 1
        width, height = buckets[batch["keys"][0]]
        assert batch["images"].shape[2:] == (height, width)


def test_order_depends_only_on_seed_and_epoch(tmp_path):
    first = _mixed_dataset(tmp_path / "a")
    second = _mixed_dataset(tmp_path / "a")
    other_seed = _mixed_dataset(tmp_path / "a", seed=1)

    def order(dataset, epoch):
        dataset.set_epoch(epoch)
        return [tuple(Path(key).name for key in dataset[i]["keys"]) for i in range(len(dataset))]

    assert order(first, 0) == order(second, 0)
    assert order(first, 3) == order(second, 3)
    assert order(first, 0) != order(first, 1)
    assert order(first, 0) != order(other_seed, 0)
    assert order(first, 2) == order(first, 2)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--bucket_reso_steps", "32"), "multiple of 64"),
        (("--min_bucket_reso", "128"), "min_bucket_reso 128 is larger"),
        (("--max_bucket_reso", "32"), "max_bucket_reso 32 is smaller"),
    ],
)
def test_bucket_setting_mistakes_are_user_errors(tmp_path, extra, message):
    make_dreambooth(tmp_path / "train", {"1_sks": [(64, 64)]})
    with pytest.raises(UserError, match=message):
        _build("--train_data_dir", str(tmp_path / "train"), "--resolution", "64", *SMALL_BUCKETS, *extra)


def test_resolution_must_suit_the_vae(tmp_path):
    make_dreambooth(tmp_path / "train", {"1_sks": [(64, 64)]})
    with pytest.raises(UserError, match="multiple of 8"):
        _build("--train_data_dir", str(tmp_path / "train"), "--resolution", "60")


def test_zero_images_after_repeats_is_a_user_error(tmp_path):
    make_dreambooth(tmp_path, {"imgs": [(64, 64)]})
    config = tmp_path / "c.toml"
    config.write_text(
        f"[general]\nresolution = 64\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{tmp_path / 'imgs'}'\nnum_repeats = 0\n"
    )
    with pytest.raises(UserError, match="no training images"):
        _build(dataset_config=config)


def test_no_upscale_refuses_images_smaller_than_a_step(tmp_path):
    make_dreambooth(tmp_path / "train", {"1_sks": [(40, 40)]})
    with pytest.raises(UserError, match="smaller than one bucket step"):
        _build(
            "--train_data_dir",
            str(tmp_path / "train"),
            "--resolution",
            "64",
            *SMALL_BUCKETS,
            "--bucket_no_upscale",
        )


def test_resize_interpolation_is_used(tmp_path):
    path = tmp_path / "train" / "1_sks" / "a.png"
    path.parent.mkdir(parents=True)
    pixels = np.zeros((128, 128, 3), dtype=np.uint8)
    pixels[::2, ::2] = 255  # a fine checkerboard: area averaging gives grey, nearest keeps black/white
    Image.fromarray(pixels).save(path)
    common = ("--train_data_dir", str(tmp_path / "train"), "--resolution", "64")
    default = _build(*common)[0]["images"]
    nearest = _build(*common, "--resize_interpolation", "nearest")[0]["images"]
    assert set(np.unique(nearest.numpy()).tolist()) <= {-1.0, 1.0}
    assert abs(float(default.mean()) - (0.25 * 2 - 1)) < 0.05 and default.std() < 0.1
