"""Precision, attention and the accelerate ``Accelerator`` for a training run.

Only the new vectors train; everything else is frozen and can run in half precision. The
vectors always stay fp32 (``SplicedTokenEmbedding``), so fp16 cannot round their updates away.
"""

from __future__ import annotations

import datetime
import logging
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, InitProcessGroupKwargs

from library.errors import UserError

logger = logging.getLogger(__name__)

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
NATIVE_BF16_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}  # x86 flags; "bf16" is Arm's Features entry


def resolve_mixed_precision(args: Any) -> str:
    """``--mixed_precision``, with ``--full_fp16/--full_bf16`` folded in and fp16 → bf16 on CPU."""
    mixed = args.mixed_precision
    if args.full_fp16 and args.full_bf16:
        raise UserError("--full_fp16 and --full_bf16 exclude each other; choose one")
    if args.full_fp16 or args.full_bf16:
        wanted = "fp16" if args.full_fp16 else "bf16"
        if mixed != wanted:
            flag = "--full_fp16" if args.full_fp16 else "--full_bf16"
            raise UserError(f"{flag} needs --mixed_precision {wanted}")
        logger.info("%s: the frozen models run in %s; the trained vectors stay fp32", flag_of(args), wanted)
    if mixed == "fp16" and not torch.cuda.is_available():
        if cpu_has_native_bf16():
            logger.warning("--mixed_precision fp16 needs a GPU; on this CPU bf16 is used instead")
            mixed = "bf16"
        else:
            logger.warning("--mixed_precision fp16 needs a GPU and this CPU has no native bf16; using fp32")
            mixed = "no"
    elif mixed == "bf16" and not torch.cuda.is_available() and not cpu_has_native_bf16():
        logger.warning(
            "--mixed_precision bf16: this CPU has no native bf16 kernels (no AVX512-BF16/AMX), so bf16 is "
            "emulated and much slower than fp32; consider --mixed_precision no"
        )
    return mixed


def cpu_has_native_bf16() -> bool:
    """Whether the CPU computes bf16 in hardware (AVX512-BF16, AMX, or Arm's BF16), so bf16 beats fp32.

    oneDNN's own check (``torch.ops.mkldnn._is_mkldnn_bf16_supported``) also answers yes on plain
    AVX-512, where bf16 is emulated by converting to fp32 and back: there a bf16 UNet step took
    2.5 times as long as fp32 (docs/benchmarks.md). So the instruction sets themselves are asked:
    torch's CPU feature checks where this torch has them, and the kernel's CPU flags.
    """
    checks = [
        getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    ]
    for check in checks:
        try:
            if check is not None and check():
                return True
        except RuntimeError:
            pass
    return bool(NATIVE_BF16_FLAGS & cpu_flags())


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The CPU feature flags the kernel reports (``flags`` on x86, ``Features`` on Arm); empty elsewhere."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def flag_of(args: Any) -> str:
    return "--full_fp16" if args.full_fp16 else "--full_bf16"


def make_accelerator(args: Any, mixed_precision: str) -> Accelerator:
    """One ``Accelerator``: mixed precision, trackers, and accelerate's gradient accumulation (its
    ``accumulate`` context decides when an optimizer step is due, an epoch's end included)."""
    handlers = []
    if args.ddp_timeout:
        handlers.append(InitProcessGroupKwargs(timeout=datetime.timedelta(minutes=args.ddp_timeout)))
    log_with = None
    if args.log_with:
        if not args.logging_dir:
            raise UserError(f"--log_with {args.log_with} needs --logging_dir")
        log_with = ["tensorboard", "wandb"] if args.log_with == "all" else [args.log_with]
        if "wandb" in log_with:
            _require_wandb(args)
    elif args.logging_dir:
        log_with = ["tensorboard"]
    return Accelerator(
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=log_with,
        project_dir=run_logging_dir(args.logging_dir, args.log_prefix),
        kwargs_handlers=handlers,
    )


def run_logging_dir(logging_dir: str | None, log_prefix: str | None) -> str | None:
    """kohya's folder for one run's logs: ``<logging_dir>/<log_prefix><YYYYmmddHHMMSS>``, so that
    every run has its own (TensorBoard would otherwise mix them); trackers add ``textual_inversion/``."""
    if logging_dir is None:
        return None
    return str(Path(logging_dir) / f"{log_prefix or ''}{time.strftime('%Y%m%d%H%M%S')}")


def _require_wandb(args: Any) -> None:
    try:
        import wandb
    except ImportError as exc:
        raise UserError("--log_with wandb needs the wandb package: pip install wandb") from exc
    if args.wandb_api_key:
        wandb.login(key=args.wandb_api_key)


def configure_attention(unet, args: Any, device: torch.device) -> None:
    """SDPA by default; xformers only where it can run (CUDA and installed), else a warning."""
    if args.xformers:
        try:
            import xformers  # noqa: F401

            available = device.type == "cuda"
        except ImportError:
            available = False
        if available:
            unet.enable_xformers_memory_efficient_attention()
            return
        logger.warning(
            "--xformers: xformers is not installed or has no kernels for %s; using SDPA", device.type
        )
    if args.mem_eff_attn:
        logger.info("--mem_eff_attn: PyTorch SDPA picks its memory-efficient kernel by itself")
    from diffusers.models.attention_processor import AttnProcessor2_0

    unet.set_attn_processor(AttnProcessor2_0())


def freeze_and_cast(model, weight_dtype: torch.dtype, vae_dtype: torch.dtype, device: torch.device) -> None:
    """Freeze every original weight and move the models to ``device`` in their run dtype."""
    for module in (model.unet, model.text_encoder, model.vae):
        module.requires_grad_(False)
        module.eval()
    model.unet.to(device=device, dtype=weight_dtype)
    model.text_encoder.to(device=device, dtype=weight_dtype)
    model.vae.to(device=device, dtype=vae_dtype)
