"""Images: formats in any case, EXIF orientation, transparency, masks, unreadable files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from dataset_helpers import make_args, make_dreambooth, make_image, tokenizer_with
from PIL import Image

from library.errors import UserError
from library.training.dataset import build_train_dataset
from library.training.dataset.images import IMAGE_EXTENSIONS, list_images, load_image, read_image_size


def _build(*cli, **values):
    return build_train_dataset(make_args(*cli, **values), tokenizer_with(), None, seed=0)


def test_all_kohya_formats_in_any_letter_case_are_found(tmp_path):
    names = ["a.png", "b.JPG", "c.Jpeg", "d.webp", "e.BMP", "f.txt", "g.gif"]
    for name in names[:5]:
        fmt = {"jpg": "JPEG", "jpeg": "JPEG"}.get(name.split(".")[1].lower())
        make_image(tmp_path / name, format=fmt) if fmt else make_image(tmp_path / name)
    (tmp_path / "f.txt").write_text("caption")
    make_image(tmp_path / "g.gif")
    assert [p.name for p in list_images(tmp_path)] == names[:5]


@pytest.mark.skipif(".avif" not in IMAGE_EXTENSIONS, reason="no AVIF support in this Pillow")
def test_avif_is_read_when_pillow_supports_it(tmp_path):
    path = make_image(tmp_path / "a.avif", (32, 16))
    assert read_image_size(path) == (32, 16) and load_image(path, keep_alpha=False).shape == (16, 32, 3)


def _rotated_jpeg(path, orientation):
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)  # stored 40 wide, 20 high
    pixels[:, :20] = (255, 0, 0)  # stored left half red
    pixels[:, 20:] = (0, 0, 255)
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = orientation
    image.save(path, format="JPEG", quality=100, exif=exif.tobytes())
    return path


def test_exif_orientation_turns_size_and_pixels(tmp_path):
    path = _rotated_jpeg(tmp_path / "phone.jpg", orientation=6)  # displayed turned 90 degrees clockwise
    assert read_image_size(path) == (20, 40)
    pixels = load_image(path, keep_alpha=False)
    assert pixels.shape == (40, 20, 3)
    assert pixels[5, 10, 0] > 200 and pixels[35, 10, 2] > 200  # stored left (red) is now on top


def test_exif_orientation_picks_the_portrait_bucket(tmp_path):
    root = tmp_path / "train" / "1_sks"
    root.mkdir(parents=True)
    _rotated_jpeg(root / "phone.jpg", orientation=6)
    dataset = _build(
        "--train_data_dir",
        str(tmp_path / "train"),
        "--resolution",
        "128",
        "--enable_bucket",
        "--min_bucket_reso",
        "64",
        "--max_bucket_reso",
        "256",
    )
    assert dataset.records[0].bucket[0] < dataset.records[0].bucket[1]


def test_transparent_image_is_composited_on_white(tmp_path):
    path = make_image(tmp_path / "t.png", (16, 8), mode="RGBA")
    rgb = load_image(path, keep_alpha=False)
    assert rgb.shape == (8, 16, 3)
    assert (rgb[:, :8] == 255).all()  # fully transparent half becomes white
    raw = np.asarray(Image.open(path))
    assert (rgb[:, 8:] == raw[:, 8:, :3]).all()  # opaque half unchanged


def test_alpha_mask_is_returned_at_latent_size(tmp_path):
    make_image(tmp_path / "train" / "1_sks" / "t.png", (64, 64), mode="RGBA")
    dataset = _build("--train_data_dir", str(tmp_path / "train"), "--resolution", "64", "--alpha_mask")
    batch = dataset[0]
    masks = batch["alpha_masks"]
    assert masks.shape == (1, 1, 8, 8)
    assert torch.all(masks[0, 0, :, :4] == 0) and torch.all(masks[0, 0, :, 4:] == 1)


def test_alpha_mask_follows_the_flip(tmp_path):
    make_image(tmp_path / "train" / "1_sks" / "t.png", (64, 64), mode="RGBA")
    dataset = _build(
        "--train_data_dir", str(tmp_path / "train"), "--resolution", "64", "--alpha_mask", "--flip_aug"
    )
    seen = set()
    for epoch in range(8):
        dataset.set_epoch(epoch)
        batch = dataset[0]
        left_is_masked = bool(batch["alpha_masks"][0, 0, 0, 0] == 0)
        assert left_is_masked != batch["flipped"][0]
        seen.add(batch["flipped"][0])
    assert seen == {True, False}


def test_images_without_alpha_get_a_full_mask_next_to_masked_ones(tmp_path):
    make_image(tmp_path / "train" / "1_sks" / "opaque.png", (64, 64))
    dataset = _build("--train_data_dir", str(tmp_path / "train"), "--resolution", "64", "--alpha_mask")
    assert torch.all(dataset[0]["alpha_masks"] == 1)


def test_conditioning_masks_need_masked_loss_and_give_red_channel_masks(tmp_path):
    make_image(tmp_path / "imgs" / "a.png", (64, 64))
    mask = np.zeros((64, 64, 3), dtype=np.uint8)
    mask[:32, :, 0] = 255  # top half kept
    (tmp_path / "masks").mkdir()
    Image.fromarray(mask).save(tmp_path / "masks" / "a.png")
    config = tmp_path / "c.toml"
    config.write_text(
        f"[general]\nresolution = 64\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{tmp_path / 'imgs'}'\n"
        f"conditioning_data_dir = '{tmp_path / 'masks'}'\n"
    )
    with pytest.raises(UserError, match="--masked_loss"):
        _build(dataset_config=config)
    masks = _build("--masked_loss", dataset_config=config)[0]["alpha_masks"]
    assert torch.all(masks[0, 0, :4] == 1) and torch.all(masks[0, 0, 4:] == 0)


def test_cli_conditioning_dir_without_config_is_refused(tmp_path):
    make_dreambooth(tmp_path / "train", {"1_sks": [(64, 64)]})
    with pytest.raises(UserError, match="conditioning_data_dir"):
        _build(
            "--train_data_dir", str(tmp_path / "train"), "--resolution", "64", "--conditioning_data_dir", "m"
        )


def test_unreadable_images_are_named_with_the_count_of_good_ones(tmp_path):
    root = make_dreambooth(tmp_path / "train", {"1_sks": [(64, 64)] * 3})
    (root / "1_sks" / "empty.png").write_bytes(b"")
    (root / "1_sks" / "junk.jpg").write_bytes(b"this is not a jpeg")
    with pytest.raises(UserError) as error:
        _build("--train_data_dir", str(root), "--resolution", "64")
    message = str(error.value)
    assert "empty.png" in message and "0 bytes" in message
    assert "1 more unreadable (junk.jpg)" in message and "3 other images are fine" in message


def test_truncated_png_is_found_before_training(tmp_path):
    root = make_dreambooth(tmp_path / "train", {"1_sks": [(64, 64)] * 2})
    path = root / "1_sks" / "img0.png"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(UserError, match=r"img0.png.*truncated.*1 other images are fine"):
        _build("--train_data_dir", str(root), "--resolution", "64")


def test_image_broken_after_its_header_fails_when_decoded_with_its_name(tmp_path):
    path = make_image(tmp_path / "train" / "1_sks" / "a.jpg", (64, 64), format="JPEG", quality=95)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    dataset = _build("--train_data_dir", str(tmp_path / "train"), "--resolution", "64")  # the header is fine
    with pytest.raises(UserError, match=r"cannot read image .*a.jpg"):
        dataset[0]


def test_images_are_in_minus_one_to_one(tmp_path):
    path = tmp_path / "train" / "1_sks" / "a.png"
    path.parent.mkdir(parents=True)
    pixels = np.zeros((64, 64, 3), dtype=np.uint8)
    pixels[:, 32:] = 255
    Image.fromarray(pixels).save(path)
    image = _build("--train_data_dir", str(tmp_path / "train"), "--resolution", "64")[0]["images"]
    assert image.dtype == torch.float32 and image.shape == (1, 3, 64, 64)
    assert image.min() == -1.0 and image.max() == 1.0


def test_16_bit_grey_images_are_scaled_not_clipped_to_white(tmp_path):
    ramp = np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "grey16.png")
    assert Image.open(tmp_path / "grey16.png").mode.startswith("I")
    pixels = load_image(tmp_path / "grey16.png", keep_alpha=False)
    assert pixels.dtype == np.uint8 and pixels.shape == (32, 32, 3)
    assert pixels.min() == 0 and pixels.max() == 255 and abs(float(pixels.mean()) - 127.5) < 1


def test_float_images_are_refused_by_name(tmp_path):
    Image.fromarray(np.ones((8, 8), dtype=np.float32)).save(tmp_path / "float.tiff")
    with pytest.raises(UserError, match="float.tiff: 32-bit float pixels"):
        load_image(tmp_path / "float.tiff", keep_alpha=False)


def test_the_generator_reads_source_images_by_the_same_rule(tmp_path):
    """--image_path turns a phone photo upright, puts transparency on white and accepts any suffix
    case, exactly as the trainer reads its pictures (one reader, ``library.images``)."""
    from library.generation.run import load_images

    folder = tmp_path / "sources"
    folder.mkdir()
    _rotated_jpeg(folder / "phone.JPG", orientation=6)
    make_image(folder / "t.png", (16, 8), mode="RGBA")
    (folder / "notes.txt").write_text("not an image")
    images = load_images(str(folder), "--image_path")
    assert [Path(image.source_path).name for image in images] == ["phone.JPG", "t.png"]
    for image in images:
        assert np.array_equal(np.asarray(image), load_image(Path(image.source_path), keep_alpha=False))
    assert images[0].size == (20, 40)


def _png_claiming(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims ``width`` x ``height`` pixels (the pixels themselves are not there)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )
    return path


def test_an_image_over_pillows_size_limit_is_named_not_a_traceback(tmp_path):
    root = tmp_path / "train" / "1_sks"
    root.mkdir(parents=True)
    make_image(root / "fine.png")
    _png_claiming(root / "bomb.png", 15000, 15000)
    with pytest.raises(UserError, match=r"bomb.png: far too large to read safely .*1 other images are fine"):
        _build("--train_data_dir", str(tmp_path / "train"), "--resolution", "64")


def test_a_link_to_a_missing_image_is_named_not_dropped(tmp_path):
    root = tmp_path / "train" / "1_sks"
    root.mkdir(parents=True)
    make_image(root / "fine.png")
    (root / "gone.png").symlink_to(tmp_path / "deleted.png")
    with pytest.raises(UserError, match=r"gone.png: a link to .*deleted.png, which does not exist"):
        _build("--train_data_dir", str(tmp_path / "train"), "--resolution", "64")
