"""Latent cache: encode each image once with the VAE, in memory or in kohya's ``.npz`` files.

Disk files use kohya's name and keys so kohya and this trainer can share them:
``<image stem>_<W:04d>x<H:04d>_sd.npz`` (W, H = the image's own size) holding ``latents``
(C x H/8 x W/8, float32, not multiplied by the VAE scaling factor), ``original_size`` (W, H),
``crop_ltrb``, and optionally ``latents_flipped`` and ``alpha_mask`` (H x W of the bucket).

Unlike kohya, a file is only reused when it still matches the current settings: latent shape
(resolution / bucket), original size, crop box, the flip and mask entries, and an image not newer
than the file. Anything else is recomputed (kohya reuses any file that has the right keys).
``--skip_cache_check`` trusts existing files, as in kohya.

The VAE's latent distribution is sampled with one generator per image seeded from the image's
folder and file name, so a cache is the same whatever ``vae_batch_size`` or process split
produced it, and wherever the dataset lives (a seed from the whole path made a run's result
depend on the folder the data was copied to).
"""

from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from library.errors import UserError
from library.files import write_atomically
from library.training.dataset.buckets import kohya_crop_ltrb

logger = logging.getLogger(__name__)

SD_LATENT_STRIDE = 8  # pixels per latent cell of SD's VAE; a VAE with fewer levels has fewer


def latent_stride(vae) -> int:
    """Pixels per latent cell of ``vae``: 2 to the number of its downsampling levels (8 for SD)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


NPZ_SUFFIX = "_sd.npz"


def cache_file_path(image_path: Path, image_size: tuple[int, int]) -> Path:
    """kohya's file name: ``<stem>_<W:04d>x<H:04d>_sd.npz`` beside the image."""
    return image_path.with_name(f"{image_path.stem}_{image_size[0]:04d}x{image_size[1]:04d}{NPZ_SUFFIX}")


@dataclass(frozen=True)
class ExpectedCache:
    """What a valid cache file for one image must contain under the current settings."""

    bucket: tuple[int, int]  # (W, H)
    original_size: tuple[int, int]
    crop_ltrb: tuple[float, ...]
    flip: bool
    alpha_mask: bool
    stride: int = SD_LATENT_STRIDE

    @property
    def latent_hw(self) -> tuple[int, int]:
        return self.bucket[1] // self.stride, self.bucket[0] // self.stride


@dataclass
class CachedLatents:
    latents: torch.Tensor
    latents_flipped: torch.Tensor | None
    alpha_mask: torch.Tensor | None  # H x W at bucket resolution
    original_size: tuple[int, ...]
    crop_ltrb: tuple[float, ...]


def stale_reason(
    path: Path, expected: ExpectedCache, image_path: Path, skip_check: bool = False
) -> str | None:
    """None when ``path`` can be reused; otherwise why it must be recomputed."""
    if not path.is_file():
        return "missing"
    if skip_check:
        return None
    try:
        if image_path.stat().st_mtime > path.stat().st_mtime:
            return "image changed after caching"
        with np.load(path) as npz:
            keys = set(npz.files)
            if not {"latents", "original_size", "crop_ltrb"} <= keys:
                return "old format"
            if tuple(npz["latents"].shape[1:3]) != expected.latent_hw:
                return f"latents are {tuple(npz['latents'].shape[1:3])}, expected {expected.latent_hw}"
            if tuple(int(v) for v in npz["original_size"].tolist()) != tuple(expected.original_size):
                return "original size differs"
            crop = np.asarray(npz["crop_ltrb"], dtype=np.float64)
            if crop.shape != (4,) or not np.allclose(crop, expected.crop_ltrb, atol=0.5):
                return "crop differs"
            if expected.flip and (
                "latents_flipped" not in keys or npz["latents_flipped"].shape != npz["latents"].shape
            ):
                return "no flipped latents"
            if expected.alpha_mask:
                if "alpha_mask" not in keys or tuple(npz["alpha_mask"].shape) != (
                    expected.bucket[1],
                    expected.bucket[0],
                ):
                    return "no alpha mask of the bucket size"
            elif "alpha_mask" in keys:
                return "has an alpha mask that is not wanted"
    except (OSError, ValueError, zlib.error, EOFError) as exc:
        return f"unreadable ({exc})"
    return None


def save_cache(
    path: Path,
    latents: torch.Tensor,
    original_size: tuple[int, int],
    crop_ltrb: tuple[float, ...],
    latents_flipped: torch.Tensor | None = None,
    alpha_mask: torch.Tensor | None = None,
) -> None:
    """Write one cache file atomically (another process may be reading the folder)."""
    arrays = {
        "latents": latents.float().cpu().numpy(),
        "original_size": np.array(original_size),
        "crop_ltrb": np.array(crop_ltrb),
    }
    if latents_flipped is not None:
        arrays["latents_flipped"] = latents_flipped.float().cpu().numpy()
    if alpha_mask is not None:
        arrays["alpha_mask"] = alpha_mask.float().cpu().numpy()
    write_atomically(path, lambda stream: np.savez(stream, **arrays))


def load_cache(path: Path) -> CachedLatents:
    try:
        with np.load(path) as npz:
            latents = torch.from_numpy(npz["latents"].astype(np.float32))
            flipped = npz["latents_flipped"] if "latents_flipped" in npz.files else None
            mask = npz["alpha_mask"] if "alpha_mask" in npz.files else None
            return CachedLatents(
                latents=latents,
                latents_flipped=None if flipped is None else torch.from_numpy(flipped.astype(np.float32)),
                alpha_mask=None if mask is None else torch.from_numpy(mask.astype(np.float32)),
                original_size=tuple(npz["original_size"].tolist()),
                crop_ltrb=tuple(npz["crop_ltrb"].tolist()),
            )
    except (OSError, ValueError, KeyError, zlib.error, EOFError) as exc:
        raise UserError(f"latent cache file {path} cannot be read ({exc}); delete it and run again") from None


def image_seed(image_path: Path) -> int:
    """A stable per-image seed for sampling the VAE's latent distribution: its folder and file
    name (``1_mychar/00.png``), not the whole path, so moving a dataset changes nothing."""
    return zlib.crc32(f"{image_path.parent.name}/{image_path.name}".encode())


@torch.no_grad()
def encode_images(vae, images: torch.Tensor, seeds: list[int]) -> torch.Tensor:
    """Sample latents for a batch of [-1, 1] images, each with its own seeded noise."""
    distribution = vae.encode(images).latent_dist
    mean = distribution.mean.float().cpu()
    std = distribution.std.float().cpu()
    noise = torch.stack(
        [torch.randn(mean.shape[1:], generator=torch.Generator().manual_seed(seed)) for seed in seeds]
    )
    return mean + std * noise


def expected_for(record, stride: int = SD_LATENT_STRIDE) -> ExpectedCache:
    """What the cache file of an image record must hold under the current settings."""
    return ExpectedCache(
        bucket=record.bucket,
        original_size=record.size,
        crop_ltrb=kohya_crop_ltrb(record.bucket, record.size),
        flip=record.subset.flip_aug,
        alpha_mask=record.subset.alpha_mask or record.mask_path is not None,
        stride=stride,
    )


def _check_shared_files(records) -> None:
    """One cache file per image: the same image at two bucket sizes cannot share it."""
    buckets: dict[Path, tuple[int, int]] = {}
    for record in records:
        path = cache_file_path(record.path, record.size)
        if buckets.setdefault(path, record.bucket) != record.bucket:
            raise UserError(
                f"{record.path} is used at two resolutions; a disk latent cache holds one per image. "
                "Use --cache_latents (memory) instead of --cache_latents_to_disk"
            )


def _work_batches(records, vae_batch_size: int) -> list[list]:
    """Records grouped by bucket (one VAE call needs one size), at most ``vae_batch_size`` each."""
    ordered = sorted(records, key=lambda r: (r.bucket[0] * r.bucket[1], r.bucket, r.key))
    batches: list[list] = []
    for record in ordered:
        if batches and len(batches[-1]) < vae_batch_size and batches[-1][0].bucket == record.bucket:
            batches[-1].append(record)
        else:
            batches.append([record])
    return batches


@dataclass(frozen=True)
class LatentCaching:
    """How latents are cached: ``--vae_batch_size``, ``--cache_latents_to_disk``, ``--skip_cache_check``,
    and this process's share of the disk cache (every ``num_processes``-th file)."""

    batch_size: int = 1
    to_disk: bool = False
    skip_check: bool = False
    process_index: int = 0
    num_processes: int = 1

    @classmethod
    def for_run(cls, options, process_index: int = 0, num_processes: int = 1) -> LatentCaching:
        """From the run's ``DataOptions`` and its place among the processes."""
        return cls(
            options.vae_batch_size,
            options.cache_latents_to_disk,
            options.skip_cache_check,
            process_index,
            num_processes,
        )


def run_latent_caching(dataset, vae, caching: LatentCaching) -> None:
    """Fill the memory or disk cache of every record of ``dataset`` (a ``TrainDataset``) with ``vae``
    (its device and dtype)."""
    cache_to_disk, process_index, num_processes = (
        caching.to_disk,
        caching.process_index,
        caching.num_processes,
    )
    skip_check, vae_batch_size = caching.skip_check, caching.batch_size
    device, dtype = vae.device, vae.dtype
    records = dataset.records
    stride = dataset.latent_stride = latent_stride(vae)
    todo = list(records)
    if cache_to_disk:
        _check_shared_files(records)
        unique: dict[Path, object] = {}
        for record in records:
            record.npz_path = cache_file_path(record.path, record.size)
            unique.setdefault(record.npz_path, record)
        mine = [
            r
            for i, r in enumerate(sorted(unique.values(), key=lambda r: r.key))
            if i % num_processes == process_index
        ]
        todo = []
        reused = 0
        for record in mine:
            reason = stale_reason(record.npz_path, expected_for(record, stride), record.path, skip_check)
            if reason is None:
                reused += 1
            else:
                if reason != "missing":
                    logger.info("recomputing %s: %s", record.npz_path.name, reason)
                todo.append(record)
        logger.info("latent cache: %d files reused, %d to encode", reused, len(todo))
    batches = _work_batches(todo, max(1, int(vae_batch_size)))
    was_training = vae.training
    vae.eval()
    try:
        for batch in tqdm(batches, desc="caching latents", disable=process_index != 0 or not batches):
            _cache_batch(dataset, vae, batch, cache_to_disk, device, dtype)
    finally:
        vae.train(was_training)


def _cache_batch(dataset, vae, batch: list, cache_to_disk: bool, device, dtype) -> None:
    images, masks = [], []
    for record in batch:
        rgb, mask, _, _ = dataset.prepare_pixels(record, 0, 0, 0, augment=False)
        images.append(torch.from_numpy(rgb).permute(2, 0, 1).float() / 127.5 - 1.0)
        masks.append(None if mask is None else torch.from_numpy(mask).float() / 255.0)
    pixels = torch.stack(images).to(device=device, dtype=dtype)
    seeds = [image_seed(record.path) for record in batch]
    latents = encode_images(vae, pixels, seeds)
    wants_flip = any(record.subset.flip_aug for record in batch)
    flipped = encode_images(vae, torch.flip(pixels, dims=[3]), seeds) if wants_flip else None
    for index, record in enumerate(batch):
        if torch.isnan(latents[index]).any() or (flipped is not None and torch.isnan(flipped[index]).any()):
            raise UserError(f"the VAE produced NaN latents for {record.path}; try --no_half_vae")
        record_flipped = flipped[index] if flipped is not None and record.subset.flip_aug else None
        mask = masks[index] if (record.subset.alpha_mask or record.mask_path is not None) else None
        if cache_to_disk:
            expected = expected_for(record, dataset.latent_stride)
            save_cache(record.npz_path, latents[index], record.size, expected.crop_ltrb, record_flipped, mask)
        else:
            record.latents = latents[index].clone()
            record.latents_flipped = None if record_flipped is None else record_flipped.clone()
            record.cached_mask = mask
