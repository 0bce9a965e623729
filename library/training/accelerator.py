"""Precision, attention and the accelerate ``Accelerator`` for a training run.

Only the new vectors train; everything else is frozen and can run in half precision. The
vectors always stay fp32 (``SplicedTokenEmbedding``), so fp16 cannot round their updates away.
"""

from __future__ import annotations

import datetime
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from library.errors import UserError
from library.models.lean_activations import keep_less_for_backward
from library.runtime import torch_dtype, usable_precision, use_attention, vae_dtype
from library.training.tracking import TrackerSettings

if TYPE_CHECKING:
    from accelerate import Accelerator

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ComputeSettings:
    """Precision, memory and speed options of a run (fields named like the options)."""

    mixed_precision: str = "no"
    full_fp16: bool = False
    full_bf16: bool = False
    no_half_vae: bool = False
    gradient_checkpointing: bool = False
    xformers: bool = False
    sdpa: bool = False
    torch_compile: bool = False
    dynamo_backend: str = "inductor"
    ddp_timeout: int | None = None


@dataclass(frozen=True)
class Precision:
    """The run's precision as it can run here: accelerate's name and the frozen models' dtypes."""

    mixed_precision: str  # "no", "fp16" or "bf16"
    weight_dtype: torch.dtype  # the frozen text encoder and UNet
    vae_dtype: torch.dtype  # fp32 with --no_half_vae


def resolve_precision(compute: ComputeSettings) -> Precision:
    """``--mixed_precision``, with ``--full_fp16/--full_bf16`` folded in and the CPU rule applied."""
    mixed_precision = resolve_mixed_precision(compute.mixed_precision, compute.full_fp16, compute.full_bf16)
    weight_dtype = torch_dtype(mixed_precision)
    return Precision(mixed_precision, weight_dtype, vae_dtype(weight_dtype, compute.no_half_vae))


def resolve_mixed_precision(mixed_precision: str, full_fp16: bool = False, full_bf16: bool = False) -> str:
    """``--mixed_precision``, with ``--full_fp16/--full_bf16`` folded in and the CPU rule applied."""
    if full_fp16 and full_bf16:
        raise UserError("--full_fp16 and --full_bf16 exclude each other; choose one")
    if full_fp16 or full_bf16:
        flag = "--full_fp16" if full_fp16 else "--full_bf16"
        wanted = "fp16" if full_fp16 else "bf16"
        if mixed_precision != wanted:
            raise UserError(f"{flag} needs --mixed_precision {wanted}")
        logger.info("%s: the frozen models run in %s; the trained vectors stay fp32", flag, wanted)
    return usable_precision(
        mixed_precision, f"--mixed_precision {mixed_precision}", bf16_flag="--mixed_precision bf16"
    )


def make_accelerator(
    tracking: TrackerSettings, precision: Precision, accumulation: int, compute: ComputeSettings
) -> Accelerator:
    """One ``Accelerator``: mixed precision, trackers, and accelerate's gradient accumulation (its
    ``accumulate`` context decides when an optimizer step is due, an epoch's end included)."""
    # imported here: option parsing imports this module
    from accelerate import Accelerator, InitProcessGroupKwargs

    handlers = []
    if compute.ddp_timeout:
        handlers.append(InitProcessGroupKwargs(timeout=datetime.timedelta(minutes=compute.ddp_timeout)))
    trackers = tracking.trackers
    if trackers and "wandb" in trackers:
        _require_wandb(tracking.wandb_api_key)
    accelerator = Accelerator(
        mixed_precision=precision.mixed_precision,
        gradient_accumulation_steps=accumulation,
        log_with=trackers,
        project_dir=run_logging_dir(tracking.logging_dir, tracking.log_prefix),
        kwargs_handlers=handlers,
    )
    warn_if_started_alone(accelerator.num_processes, os.environ)
    return accelerator


def warn_if_started_alone(num_processes: int, environ: Mapping[str, str]) -> None:
    """``accelerate launch --num_processes 2`` without ``--multi_gpu`` on a CPU or a single GPU starts
    one process, saying nothing; its plain launcher still sets ``MASTER_ADDR`` (torchrun, which
    starts several, also sets ``WORLD_SIZE``), so the run can tell the user."""
    if num_processes == 1 and "MASTER_ADDR" in environ and "WORLD_SIZE" not in environ:
        logger.warning(
            "accelerate launch was asked for several processes but started this one alone: without "
            "several GPUs it needs --multi_gpu (on a CPU also ACCELERATE_USE_CPU=true) to start them"
        )


def run_logging_dir(logging_dir: str | None, log_prefix: str | None) -> str | None:
    """kohya's folder for one run's logs: ``<logging_dir>/<log_prefix><YYYYmmddHHMMSS>``, so that
    every run has its own (TensorBoard would otherwise mix them); trackers add ``textual_inversion/``."""
    if logging_dir is None:
        return None
    return str(Path(logging_dir) / f"{log_prefix or ''}{time.strftime('%Y%m%d%H%M%S')}")


def _require_wandb(api_key: str | None) -> None:
    try:
        import wandb
    except ImportError as exc:
        raise UserError("--log_with wandb needs the wandb package: pip install wandb") from exc
    if api_key:
        wandb.login(key=api_key)


def freeze_and_move(model, device: torch.device) -> None:
    """Freeze every original weight and move the models to ``device``.

    The loader already gave each model its run dtype; a cast here would also widen the weights
    it keeps in exact half precision. ``model.vae`` may be None (latents were cached with a VAE
    loaded alone and already freed).
    """
    for module in (model.unet, *model.text_encoders, model.vae):
        if module is not None:
            module.requires_grad_(False)
            module.eval()
            module.to(device)


def configure_for_training(unet, text_encoders: list, compute: ComputeSettings, device: torch.device):
    """Attention backend, the lean feed-forward backward, gradient checkpointing and
    ``torch.compile`` as the options ask; returns the UNet."""
    use_attention([unet], xformers=compute.xformers, flag="--xformers", device=device)
    keep_less_for_backward(unet)
    if compute.gradient_checkpointing:  # diffusers and transformers only checkpoint in training mode
        unet.enable_gradient_checkpointing()
        unet.train()  # neither model has dropout
        for text_encoder in text_encoders:
            text_encoder.gradient_checkpointing_enable()
            text_encoder.train()
    if compute.torch_compile:
        unet = torch.compile(unet, backend=compute.dynamo_backend)
    return unet
