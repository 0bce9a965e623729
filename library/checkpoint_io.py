"""Reading single-file checkpoints safely, and telling the user what a file is when it is not one.

Checkpoints come from strangers. ``.ckpt``/``.pt``/``.bin`` are read with
``torch.load(weights_only=True)``, which never executes pickled code; ``.safetensors`` cannot
carry code at all. Every failure becomes one ``UserError`` line naming the file.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file as load_safetensors

from library.errors import UserError

PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin"}
UNET_PREFIX = "model.diffusion_model."
SD1_TEXT_PREFIX = "cond_stage_model.transformer."
SD2_TEXT_PREFIX = "cond_stage_model.model."
VAE_PREFIX = "first_stage_model."


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a ``.safetensors`` or pickle checkpoint, unwrapping ``state_dict``."""
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise UserError(f"{path}: the file is empty (an interrupted download?)")
    if path.suffix.lower() == ".safetensors":
        try:
            state = load_safetensors(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise UserError(
                f"{path}: not a readable .safetensors file (truncated or corrupt: {exc}); download it again"
            ) from exc
    elif path.suffix.lower() in PICKLE_SUFFIXES:
        state = _read_pickle_checkpoint(path)
    else:
        raise UserError(f"{path}: unknown checkpoint type {path.suffix!r}; expected .safetensors or .ckpt")
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise UserError(f"{path}: does not hold a dictionary of weights; not a Stable Diffusion checkpoint")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def _read_pickle_checkpoint(path: Path) -> dict:
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UserError(
            f"{path}: refused: the file contains pickled code or objects other than weights, which could run "
            "code on your machine; use a .safetensors version of this model"
        ) from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise UserError(
            f"{path}: not a readable checkpoint (truncated or corrupt: {exc}); download it again"
        ) from exc


def describe_non_sd_file(state: dict[str, torch.Tensor]) -> str | None:
    """What a file is when it is not an SD 1.x/2.x checkpoint, as advice; None when it is one."""
    keys = list(state)
    if any(k.startswith("conditioner.embedders.") for k in keys):
        return "is an SDXL checkpoint; SDXL is not supported yet (use an SD 1.x or 2.x model)"
    if any(k.startswith(UNET_PREFIX) for k in keys):
        return None
    if any(
        k.startswith(("lora_unet_", "lora_te", "lora_")) or ".lora_down." in k or "lora_A" in k for k in keys
    ):
        return "is a LoRA, not a Stable Diffusion checkpoint; pass the base model it was trained for"
    if {"emb_params"} <= set(keys) or {"clip_l", "clip_g"} <= set(keys) or "string_to_param" in keys:
        return "is a Textual Inversion embedding, not a Stable Diffusion checkpoint"
    if any(k.startswith(("encoder.conv_in", VAE_PREFIX + "encoder.")) for k in keys):
        return "is a VAE only; pass it with --vae together with a full checkpoint"
    return f"has no Stable Diffusion UNet weights ({UNET_PREFIX}*); not an SD 1.x/2.x checkpoint"


def strip_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries under ``prefix``, with the prefix removed."""
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
