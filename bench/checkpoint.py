"""Full-size SD 1.5- and SDXL-architecture checkpoints with random weights, built once and cached.

Timing needs the real architecture (860M-parameter UNet, 123M text encoder, 84M VAE), not real
weights, and nothing may be downloaded. So the shipped SD1 configs are instantiated with
diffusers' and transformers' own random initialisation (activations then stay in a normal
range, unlike arbitrary fills that could hit slow denormal paths), written as a single-file LDM
``.safetensors`` in fp16 (about 2 GB, like the files users have) and reused on later runs. The
SDXL one (2.6B-parameter UNet, CLIP ViT-L and OpenCLIP bigG, 6.9 GB) is written in the SAI layout.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE_DIR = ROOT / ".cache" / "bench"
CHECKPOINT = CACHE_DIR / "sd15-random.safetensors"
SDXL_CHECKPOINT = CACHE_DIR / "sdxl-random.safetensors"


def ensure_checkpoint(path: Path = CHECKPOINT, log=print, family: str = "sd1") -> Path:
    """The cached checkpoint of ``family`` (``sd1``, ``sdxl``), built when it does not exist yet
    (SD 1.5: about a minute on 2 cores; SDXL: several)."""
    if path.is_file():
        return path
    log(f"building the random full-size {family} checkpoint {path} (once)")
    started = time.perf_counter()
    state = random_sdxl_state_dict() if family == "sdxl" else random_sd15_state_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.{os.getpid()}")
    from safetensors.torch import save_file

    save_file(state, str(staging))
    staging.replace(path)  # atomic: a half-written file is never mistaken for a finished one
    log(f"  built in {time.perf_counter() - started:.0f} s ({path.stat().st_size / 1e9:.2f} GB)")
    return path


def random_sd15_state_dict() -> dict:
    """LDM-named fp16 tensors of randomly initialised SD1.5-shaped UNet, VAE and text encoder."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from library.models.ldm_export import sd1_text_to_ldm, unet_to_ldm, vae_to_ldm
    from library.models.loading import base_config

    torch.manual_seed(0)
    config = base_config("sd1")
    state: dict = {}
    unet = UNet2DConditionModel(**config["unet"])
    state.update(_fp16(unet_to_ldm(unet)))
    del unet
    vae = AutoencoderKL(**config["vae"])
    state.update(_fp16(vae_to_ldm(vae)))
    del vae
    text_encoder = CLIPTextModel(CLIPTextConfig(**config["text_encoder"]))
    state.update(_fp16(sd1_text_to_ldm(text_encoder)))
    return state


def random_sdxl_state_dict() -> dict:
    """SAI-named fp16 tensors of a randomly initialised SDXL 1.0-shaped model, one part at a time
    (each part is built in fp16, so the 2.6B-parameter UNet never needs fp32 memory)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from library.models.ldm_export import openclip_text_to_ldm, unet_to_ldm, vae_to_ldm
    from library.models.loading import base_config, canonical_text_keys

    torch.manual_seed(0)
    config = base_config("sdxl")
    state: dict = {}
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)
    try:
        unet = UNet2DConditionModel(**config["unet"])
        state.update(_fp16(unet_to_ldm(unet)))
        del unet
        vae = AutoencoderKL(**config["vae"])
        state.update(_fp16(vae_to_ldm(vae)))
        del vae
        text = CLIPTextModel(CLIPTextConfig(**config["text_encoder"]))
        prefix = "conditioner.embedders.0.transformer.text_model."
        state.update(_fp16({prefix + k: v for k, v in canonical_text_keys(text.state_dict()).items()}))
        del text
        text_2 = CLIPTextModelWithProjection(CLIPTextConfig(**config["text_encoder_2"]))
        state.update(_fp16(openclip_text_to_ldm(text_2, "conditioner.embedders.1.model.")))
    finally:
        torch.set_default_dtype(default)
    return state


def _fp16(state: dict) -> dict:
    return {key: value.detach().to(dtype=_half(value)).contiguous().clone() for key, value in state.items()}


def _half(value):
    import torch

    return torch.float16 if value.is_floating_point() else value.dtype
