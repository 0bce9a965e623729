"""Latent cache: kohya's file name and keys, reuse, invalidation, memory cache, process shares."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from dataset_helpers import make_args, make_dreambooth, make_image, tiny_vae, tokenizer_with

from library.errors import UserError
from library.training.dataset import build_train_dataset, latent_cache, make_train_dataloader
from library.training.dataset.buckets import kohya_crop_ltrb


@pytest.fixture(scope="module")
def vae():
    return tiny_vae()


@pytest.fixture
def encode_calls(monkeypatch):
    """Counts images sent through the VAE."""
    calls = []
    real = latent_cache.encode_images

    def counting(vae, images, seeds):
        calls.append(images.shape[0])
        return real(vae, images, seeds)

    monkeypatch.setattr(latent_cache, "encode_images", counting)
    return calls


def _dataset(root, resolution="64", *extra):
    args = make_args(
        "--train_data_dir", str(root), "--resolution", resolution, "--cache_latents_to_disk", *extra
    )
    return build_train_dataset(args, tokenizer_with(), None, seed=0)


def _cache(dataset, vae, to_disk=True, batch=2, skip_cache_check=False, **kwargs):
    dataset.cache_latents(vae, latent_cache.LatentCaching(batch, to_disk, skip_cache_check, **kwargs))


def test_disk_cache_uses_kohyas_name_and_keys(tmp_path, vae):
    root = make_dreambooth(tmp_path / "train", {"1_sks": [(64, 64), (80, 64)]})
    dataset = _dataset(root, "64", "--flip_aug")
    _cache(dataset, vae)
    folder = root / "1_sks"
    assert sorted(p.name for p in folder.glob("*.npz")) == ["img0_0064x0064_sd.npz", "img1_0080x0064_sd.npz"]
    with np.load(folder / "img1_0080x0064_sd.npz") as npz:
        assert set(npz.files) == {"latents", "original_size", "crop_ltrb", "latents_flipped"}
        assert npz["latents"].shape == (4, 8, 8) and npz["latents"].dtype == np.float32
        assert npz["original_size"].tolist() == [80, 64]
        assert np.allclose(npz["crop_ltrb"], kohya_crop_ltrb((64, 64), (80, 64)))
    batch = dataset[0]
    assert batch["images"] is None and batch["latents"].shape == (1, 4, 8, 8)


def test_cache_is_reused_then_recomputed_when_the_resolution_changes(tmp_path, vae, encode_calls):
    root = make_dreambooth(tmp_path / "train", {"1_sks": [(64, 64), (64, 64)]})
    _cache(_dataset(root, "64"), vae)
    assert sum(encode_calls) == 2
    files = sorted((root / "1_sks").glob("*.npz"))
    stamps = [f.stat().st_mtime_ns for f in files]

    again = _dataset(root, "64")
    _cache(again, vae)
    assert sum(encode_calls) == 2  # nothing encoded: both files reused
    assert [f.stat().st_mtime_ns for f in files] == stamps

    larger = _dataset(root, "128")
    _cache(larger, vae)
    assert sum(encode_calls) == 4  # stale shape: recomputed
    with np.load(files[0]) as npz:
        assert npz["latents"].shape == (4, 16, 16)
    assert larger[0]["latents"].shape == (1, 4, 16, 16)


def test_a_kohya_written_file_is_read(tmp_path, vae, encode_calls):
    root = make_dreambooth(tmp_path / "train", {"1_sks": [(64, 64)]})
    fake = np.full((4, 8, 8), 0.5, dtype=np.float32)
    path = root / "1_sks" / "img0_0064x0064_sd.npz"
    np.savez(
        path,
        latents=fake,
        original_size=np.array([64, 64]),
        crop_ltrb=np.array(kohya_crop_ltrb((64, 64), (64, 64))),
    )
    dataset = _dataset(root, "64")
    _cache(dataset, vae)
    assert encode_calls == []
    assert torch.equal(dataset[0]["latents"][0], torch.from_numpy(fake))


def test_missing_flip_or_mask_entries_make_a_file_stale(tmp_path, vae, encode_calls):
    make_image(tmp_path / "train" / "1_sks" / "a.png", (64, 64), mode="RGBA")
    _cache(_dataset(tmp_path / "train", "64"), vae)
    flipping = _dataset(tmp_path / "train", "64", "--flip_aug", "--alpha_mask")
    _cache(flipping, vae)
    assert sum(encode_calls) == 1 + 2  # recomputed, with the flipped latents
    with np.load(tmp_path / "train" / "1_sks" / "a_0064x0064_sd.npz") as npz:
        assert npz["alpha_mask"].shape == (64, 64) and "latents_flipped" in npz.files
    batch = flipping[0]
    assert batch["alpha_masks"].shape == (1, 1, 8, 8)
    assert torch.all(batch["alpha_masks"][0, 0, :, :4] == (1.0 if batch["flipped"][0] else 0.0))


def test_skip_cache_check_trusts_existing_files(tmp_path):
    image = make_image(tmp_path / "a.png")
    path = tmp_path / "a_0064x0064_sd.npz"
    np.savez(
        path, latents=np.zeros((4, 2, 2), np.float32), original_size=np.array([64, 64]), crop_ltrb=np.zeros(4)
    )
    expected = latent_cache.ExpectedCache((64, 64), (64, 64), (0, 0, 64, 64), False, False)
    assert "expected (8, 8)" in latent_cache.stale_reason(path, expected, image)
    assert latent_cache.stale_reason(path, expected, image, skip_check=True) is None


def test_memory_cache_is_the_same_for_any_vae_batch_size(tmp_path, vae):
    root = make_dreambooth(tmp_path / "train", {"1_sks": [(64, 64)] * 3})
    args = make_args("--train_data_dir", str(root), "--resolution", "64", "--cache_latents", "--flip_aug")
    one = build_train_dataset(args, tokenizer_with(), None, seed=0)
    three = build_train_dataset(args, tokenizer_with(), None, seed=0)
    _cache(one, vae, to_disk=False, batch=1)
    _cache(three, vae, to_disk=False, batch=3)
    assert not list((root / "1_sks").glob("*.npz"))
    for a, b in zip(one.records, three.records):
        assert torch.allclose(a.latents, b.latents, atol=1e-5)
        assert torch.allclose(a.latents_flipped, b.latents_flipped, atol=1e-5)
    batch = one[0]
    record = next(r for r in one.records if r.key == batch["keys"][0])
    expected = record.latents_flipped if batch["flipped"][0] else record.latents
    assert torch.equal(batch["latents"][0], expected)


def test_the_cache_is_the_same_wherever_the_dataset_lives(tmp_path, vae):
    """The latent sample's seed comes from folder and file name, not the whole path: a dataset
    copied elsewhere (another checkout, another disk) trains to the same vectors."""
    here = make_dreambooth(tmp_path / "here", {"1_sks": [(64, 64)] * 2})
    there = tmp_path / "somewhere" / "else"
    shutil.copytree(here, there)
    cached = []
    for root in (here, there):
        args = make_args("--train_data_dir", str(root), "--resolution", "64", "--cache_latents")
        dataset = build_train_dataset(args, tokenizer_with(), None, seed=0)
        _cache(dataset, vae, to_disk=False)
        cached.append([r.latents for r in dataset.records])
    assert all(torch.equal(a, b) for a, b in zip(*cached))
    first, second = cached[0]
    assert not torch.equal(first, second)  # but each image has its own draw


@pytest.mark.parametrize("to_disk", [False, True])
def test_latents_in_memory_are_loaded_without_worker_processes(tmp_path, vae, caplog, to_disk):
    root = make_dreambooth(tmp_path / "train", {"2_sks": [(64, 64)] * 2})
    cache = "--cache_latents_to_disk" if to_disk else "--cache_latents"
    args = make_args(
        "--train_data_dir", str(root), "--resolution", "64", cache, "--max_data_loader_n_workers", "2"
    )
    dataset = build_train_dataset(args, tokenizer_with(), None, seed=0)
    assert make_train_dataloader(dataset, args).num_workers == 2  # images to decode: workers help
    _cache(dataset, vae, to_disk=to_disk)
    with caplog.at_level("INFO"):
        loader = make_train_dataloader(dataset, args)
    # in memory a batch is a tensor lookup; a cache on disk still has files to read ahead
    assert dataset.latents_in_memory is not to_disk
    assert loader.num_workers == (2 if to_disk else 0)
    assert ("built in the training process" in caplog.text) is not to_disk
    assert [b["keys"] for b in loader] == [dataset[i]["keys"] for i in range(len(dataset))]


def test_each_process_caches_its_share(tmp_path, vae, encode_calls):
    root = make_dreambooth(tmp_path / "train", {"1_sks": [(64, 64)] * 4})
    _cache(_dataset(root, "64"), vae, batch=4, process_index=1, num_processes=2)
    assert sum(encode_calls) == 2 and len(list((root / "1_sks").glob("*.npz"))) == 2
    _cache(_dataset(root, "64"), vae, batch=4, process_index=0, num_processes=2)
    assert sum(encode_calls) == 4 and len(list((root / "1_sks").glob("*.npz"))) == 4


def test_caching_is_refused_with_color_aug_or_random_crop(tmp_path, vae):
    root = make_dreambooth(tmp_path / "train", {"1_sks": [(64, 64)]})
    with pytest.raises(UserError, match="color_aug or random_crop"):
        _dataset(root, "64", "--color_aug")
    args = make_args("--train_data_dir", str(root), "--resolution", "64", "--random_crop")
    dataset = build_train_dataset(args, tokenizer_with(), None, seed=0)
    with pytest.raises(UserError, match="cannot be used with color_aug or random_crop"):
        _cache(dataset, vae)


def test_same_image_at_two_resolutions_cannot_share_a_disk_cache(tmp_path, vae):
    make_dreambooth(tmp_path, {"imgs": [(64, 64)]})
    config = tmp_path / "c.toml"
    config.write_text(
        f"[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = '{tmp_path / 'imgs'}'\n"
        f"[[datasets]]\nresolution = 128\n[[datasets.subsets]]\nimage_dir = '{tmp_path / 'imgs'}'\n"
    )
    dataset = build_train_dataset(make_args(dataset_config=config), tokenizer_with(), None, seed=0)
    with pytest.raises(UserError, match="two resolutions"):
        _cache(dataset, vae)
    _cache(dataset, vae, to_disk=False)  # memory is fine
    assert {tuple(r.latents.shape) for r in dataset.records} == {(4, 8, 8), (4, 16, 16)}


def test_skip_cache_check_from_the_command_line_keeps_stale_files(tmp_path, vae, encode_calls):
    root = make_dreambooth(tmp_path / "train", {"1_sks": [(64, 64)]})
    _cache(_dataset(root, "64"), vae)
    options = make_args(
        "--train_data_dir", str(root), "--resolution", "128", "--cache_latents_to_disk", "--skip_cache_check"
    )
    trusting = build_train_dataset(options, tokenizer_with(), None, seed=0)
    trusting.cache_latents(vae, latent_cache.LatentCaching.for_run(options))
    assert sum(encode_calls) == 1  # the 64px file was trusted, not recomputed
    with pytest.raises(UserError, match="does not match the current resolution"):
        trusting[0]
