"""Tiny random Stable Diffusion models in every layout users have, for tests and the demo.

``build_tiny_model(family, out_dir)`` writes one model three ways from the same weights:
a diffusers folder (``diffusers/``), and single-file LDM checkpoints ``model.safetensors`` and
``model.ckpt``. The shapes follow SD1 (OpenAI CLIP text encoder, 8-head UNet) or SD2 (OpenCLIP
text encoder whose last layer the loaders drop, 64-channel heads, linear projections) so that
the real loading code paths run; the sizes are small enough to train on a CPU in seconds.

The single files are written with ``library.models.ldm_export`` (our diffusers -> LDM mapping; the
loader uses diffusers' LDM -> diffusers conversion, so a round trip checks each against the other).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from library.models.diffusers_folder import readable_by_every_transformers
from library.models.ldm_export import (
    sd1_text_to_ldm,
    sd2_text_to_ldm,
    sdxl_checkpoint,
    unet_to_ldm,
    vae_to_ldm,
)
from library.models.loading import base_config, unet_heads
from library.text.tokenizer import shipped_tokenizer

# bump when the fixture layout changes, so cached copies are rebuilt
FIXTURE_VERSION = 6

TINY = {
    "sd1": {"unet_channels": [32, 64], "text_width": 32, "text_layers": 2},
    "sd2": {"unet_channels": [32, 64], "text_width": 64, "text_layers": 2},
    # two encoders of different widths (as 768 and 1280), so that swapped clip_l/clip_g fail on shape
    "sdxl": {"unet_channels": [32, 64], "text_widths": (32, 64), "text_layers": 2, "time_embed_dim": 8},
}


def tiny_vae(family: str) -> AutoencoderKL:
    """A random VAE that downsamples by 8 like SD's, with the family's latent scale."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=[32, 32, 32, 32],
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        layers_per_block=1,
        norm_num_groups=32,
        sample_size=64,
        scaling_factor=base_config(family)["vae"]["scaling_factor"],
    ).eval()


def tiny_components(family: str, seed: int = 0) -> tuple[UNet2DConditionModel, AutoencoderKL, CLIPTextModel]:
    """Random UNet, VAE (/8 like SD's) and text encoder of the family's layout."""
    torch.manual_seed(seed)
    size = TINY[family]
    base = base_config(family)
    channels = size["unet_channels"]
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=channels,
        layers_per_block=1,
        down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
        cross_attention_dim=size["text_width"],
        attention_head_dim=unet_heads(channels, family),
        use_linear_projection=family == "sd2",
        norm_num_groups=32,
    )
    vae = tiny_vae(family)
    text_config = dict(base["text_encoder"])
    text_config.update(
        hidden_size=size["text_width"],
        intermediate_size=size["text_width"] * 4,
        num_hidden_layers=size["text_layers"],
        num_attention_heads=max(1, size["text_width"] // 64),
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_config))
    # random init is N(0, 0.02); make the VAE and UNet outputs non-trivial but finite
    for module in (unet, vae, text_encoder):
        module.eval()
    return unet, vae, text_encoder


# ---------------------------------------------------------------------------------------------


def tiny_sdxl_components(seed: int = 0):
    """Random SDXL-layout UNet (no attention at the first level, linear projections, added
    text/size conditioning), VAE, CLIP-L-like and bigG-like (with projection) text encoders."""
    torch.manual_seed(seed)
    size = TINY["sdxl"]
    base = base_config("sdxl")
    width_l, width_g = size["text_widths"]
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=size["unet_channels"],
        layers_per_block=1,
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
        cross_attention_dim=width_l + width_g,
        attention_head_dim=unet_heads(size["unet_channels"], "sdxl"),
        use_linear_projection=True,
        transformer_layers_per_block=[1, 1],
        addition_embed_type="text_time",
        addition_time_embed_dim=size["time_embed_dim"],
        projection_class_embeddings_input_dim=width_g + 6 * size["time_embed_dim"],
        norm_num_groups=32,
    ).eval()
    encoders = []
    for name, width, model_cls in (
        ("text_encoder", width_l, CLIPTextModel),
        ("text_encoder_2", width_g, CLIPTextModelWithProjection),
    ):
        config = dict(base[name])
        config.update(
            hidden_size=width,
            intermediate_size=4 * width,
            num_hidden_layers=size["text_layers"],
            num_attention_heads=max(1, width // 64),
            projection_dim=width,
        )
        encoders.append(model_cls(CLIPTextConfig(**config)).eval())
    return unet, tiny_vae("sdxl"), encoders[0], encoders[1]


def build_tiny_sdxl_model(out_dir: Path, seed: int = 0) -> Path:
    """The SDXL-layout tiny model: a diffusers folder and SAI-layout single files (fp32 ``.safetensors``
    and ``.ckpt``, and an fp16 ``model-fp16.safetensors``)."""
    unet, vae, text_encoder, text_encoder_2 = tiny_sdxl_components(seed)
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=shipped_tokenizer(False),
        tokenizer_2=shipped_tokenizer(True),
        unet=unet,
        scheduler=DDIMScheduler(**base_config("sdxl")["scheduler"]),
    )
    pipe.save_pretrained(out_dir / "diffusers", safe_serialization=True)
    readable_by_every_transformers(out_dir / "diffusers")
    ldm = sdxl_checkpoint(unet, vae, text_encoder, text_encoder_2)
    save_file(ldm, str(out_dir / "model.safetensors"))
    # as SDXL files are shared: fp16, whose frozen layers the trainer keeps in exact half precision
    save_file({k: v.half() for k, v in ldm.items()}, str(out_dir / "model-fp16.safetensors"))
    torch.save({"state_dict": ldm}, out_dir / "model.ckpt")
    return out_dir


def build_tiny_model(family: str, out_dir: Path, seed: int = 0) -> Path:
    """Write the diffusers folder and both single files of one tiny model into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if family == "sdxl":
        return build_tiny_sdxl_model(out_dir, seed)
    unet, vae, text_encoder = tiny_components(family, seed)
    tokenizer = shipped_tokenizer(family == "sd2")
    scheduler = DDIMScheduler(**base_config(family)["scheduler"])
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out_dir / "diffusers", safe_serialization=True)
    readable_by_every_transformers(out_dir / "diffusers")
    text = sd1_text_to_ldm(text_encoder) if family == "sd1" else sd2_text_to_ldm(text_encoder)
    ldm = {**unet_to_ldm(unet), **vae_to_ldm(vae), **text}
    ldm = {k: v.detach().contiguous().clone() for k, v in ldm.items()}
    save_file(ldm, str(out_dir / "model.safetensors"))
    torch.save({"state_dict": ldm}, out_dir / "model.ckpt")
    return out_dir


CACHE_ROOT = Path(__file__).resolve().parent.parent / ".cache" / f"tiny-models-v{FIXTURE_VERSION}"


def ensure_tiny_model(family: str, cache_root: Path = CACHE_ROOT) -> Path:
    """The cached tiny model of ``family``, built on first use (a finished build is renamed into place)."""
    final = Path(cache_root) / family
    if (final / "model.ckpt").is_file():
        return final
    staging = Path(cache_root) / f".{family}-building-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    build_tiny_model(family, staging)
    try:
        staging.rename(final)
    except OSError:  # another process finished first
        shutil.rmtree(staging, ignore_errors=True)
    return final
