"""Writing diffusers modules as a single-file Stable Diffusion checkpoint (LDM key names).

The loader (``library.models.loading``) reads single files with diffusers' own LDM -> diffusers
conversion; diffusers ships no function for the other direction, so the mapping below is ours.
It is used to write the tiny test models and the small real model in ``models/``, and the tests
check it by round trip: every tensor written here must come back unchanged through the loader.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from library.models.loading import canonical_text_keys

LDM_EMBEDDINGS = {"time_embedding": "time_embed", "add_embedding": "label_emb.0"}


def _resnet_to_ldm(name: str) -> str:
    for new, old in (
        ("norm1", "in_layers.0"),
        ("conv1", "in_layers.2"),
        ("time_emb_proj", "emb_layers.1"),
        ("norm2", "out_layers.0"),
        ("conv2", "out_layers.3"),
        ("conv_shortcut", "skip_connection"),
    ):
        name = name.replace(f".{new}.", f".{old}.")
    return name


def unet_to_ldm(unet: UNet2DConditionModel) -> dict[str, torch.Tensor]:
    """LDM (``model.diffusion_model.*``) names for a diffusers UNet's weights."""
    assert len(unet.config.block_out_channels) == len(unet.config.up_block_types)
    return {
        "model.diffusion_model." + unet_key_to_ldm(key, unet.config): value
        for key, value in unet.state_dict().items()
    }


def unet_key_to_ldm(key: str, config) -> str:
    """The LDM name (without ``model.diffusion_model.``) of a diffusers UNet weight's name; the
    rule SDXL's LoRA files also name their UNet layers by (``input_blocks_4_1_...``)."""
    per_level = config.layers_per_block + 1
    parts = key.split(".")
    if parts[0] in ("time_embedding", "add_embedding"):  # add_embedding: SDXL's pooled text + sizes
        ldm = key.replace(f"{parts[0]}.linear_1", LDM_EMBEDDINGS[parts[0]] + ".0").replace(
            f"{parts[0]}.linear_2", LDM_EMBEDDINGS[parts[0]] + ".2"
        )
    elif parts[0] == "conv_in":
        ldm = key.replace("conv_in", "input_blocks.0.0")
    elif parts[0] == "conv_norm_out":
        ldm = key.replace("conv_norm_out", "out.0")
    elif parts[0] == "conv_out":
        ldm = key.replace("conv_out", "out.2")
    elif parts[0] == "down_blocks":
        level, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
        if kind == "downsamplers":
            ldm = f"input_blocks.{1 + level * per_level + config.layers_per_block}.0.op.{parts[-1]}"
        else:
            sub = 0 if kind == "resnets" else 1
            ldm = f"input_blocks.{1 + level * per_level + j}.{sub}.{rest}"
    elif parts[0] == "mid_block":
        kind, j, rest = parts[1], int(parts[2]), ".".join(parts[3:])
        ldm = f"middle_block.{1 if kind == 'attentions' else 2 * j}.{rest}"
    elif parts[0] == "up_blocks":
        level, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
        if kind == "upsamplers":
            has_attention = config.up_block_types[level].startswith("CrossAttn")
            ldm = f"output_blocks.{level * per_level + config.layers_per_block}.{2 if has_attention else 1}.{rest}"
        else:
            sub = 0 if kind == "resnets" else 1
            ldm = f"output_blocks.{level * per_level + j}.{sub}.{rest}"
    else:
        raise KeyError(key)
    if ".resnets." in key:
        ldm = _resnet_to_ldm("." + ldm)[1:]
    return ldm


def vae_to_ldm(vae: AutoencoderKL) -> dict[str, torch.Tensor]:
    """LDM (``first_stage_model.*``) names for a diffusers VAE's weights."""
    n_levels = len(vae.config.block_out_channels)
    out = {}
    for key, value in vae.state_dict().items():
        ldm = key
        parts = key.split(".")
        if parts[1] == "down_blocks":
            i, kind = parts[2], parts[3]
            if kind == "resnets":
                ldm = f"encoder.down.{i}.block.{parts[4]}." + ".".join(parts[5:])
            else:
                ldm = f"encoder.down.{i}.downsample.conv." + parts[-1]
        elif parts[1] == "up_blocks":
            i, kind = n_levels - 1 - int(parts[2]), parts[3]
            if kind == "resnets":
                ldm = f"{parts[0]}.up.{i}.block.{parts[4]}." + ".".join(parts[5:])
            else:
                ldm = f"{parts[0]}.up.{i}.upsample.conv." + parts[-1]
        elif parts[1] == "mid_block":
            if parts[2] == "resnets":
                ldm = f"{parts[0]}.mid.block_{int(parts[3]) + 1}." + ".".join(parts[4:])
            else:
                name = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}[
                    parts[4]
                ]
                ldm = f"{parts[0]}.mid.attn_1.{name}.{parts[-1]}"
                if value.ndim == 2:  # LDM keeps these as 1x1 convolutions
                    value = value[:, :, None, None]
        elif parts[1] == "conv_norm_out":
            ldm = key.replace("conv_norm_out", "norm_out")
        ldm = ldm.replace(".conv_shortcut.", ".nin_shortcut.")
        out["first_stage_model." + ldm] = value
    return out


def sd1_text_to_ldm(text_encoder: CLIPTextModel) -> dict[str, torch.Tensor]:
    sd = canonical_text_keys(text_encoder.state_dict())
    return {"cond_stage_model.transformer.text_model." + k: v for k, v in sd.items()}


def sd2_text_to_ldm(text_encoder: CLIPTextModel, seed: int = 1) -> dict[str, torch.Tensor]:
    """OpenCLIP names, plus the extra last layer and projection that real SD2 files carry."""
    prefix = "cond_stage_model.model."
    sd = canonical_text_keys(text_encoder.state_dict())
    width = text_encoder.config.hidden_size
    n = text_encoder.config.num_hidden_layers
    gen = torch.Generator().manual_seed(seed)
    device = sd["embeddings.token_embedding.weight"].device  # "meta" for the full-size layout test
    out = {
        prefix + "token_embedding.weight": sd["embeddings.token_embedding.weight"],
        prefix + "positional_embedding": sd["embeddings.position_embedding.weight"],
        prefix + "ln_final.weight": sd["final_layer_norm.weight"],
        prefix + "ln_final.bias": sd["final_layer_norm.bias"],
        prefix + "text_projection": (torch.randn(width, width, generator=gen) * 0.02).to(device),
        prefix + "logit_scale": torch.tensor(4.6).to(device),
    }
    for i in range(n + 1):
        src = f"encoder.layers.{min(i, n - 1)}."
        dst = f"{prefix}transformer.resblocks.{i}."
        extra = i == n  # the layer SD2 drops: give it its own random values

        def get(name: str, src: str = src, extra: bool = extra) -> torch.Tensor:
            like = sd[src + name]
            if not extra:
                return like
            if device.type == "meta":
                return torch.empty_like(like)
            return torch.randn(like.shape, generator=gen) * 0.02

        out[dst + "attn.in_proj_weight"] = torch.cat([get(f"self_attn.{p}_proj.weight") for p in "qkv"])
        out[dst + "attn.in_proj_bias"] = torch.cat([get(f"self_attn.{p}_proj.bias") for p in "qkv"])
        for ours, theirs in (
            ("self_attn.out_proj", "attn.out_proj"),
            ("layer_norm1", "ln_1"),
            ("layer_norm2", "ln_2"),
            ("mlp.fc1", "mlp.c_fc"),
            ("mlp.fc2", "mlp.c_proj"),
        ):
            for p in ("weight", "bias"):
                out[dst + f"{theirs}.{p}"] = get(f"{ours}.{p}")
    return out


def openclip_text_to_ldm(text_encoder: CLIPTextModelWithProjection, prefix: str) -> dict[str, torch.Tensor]:
    """OpenCLIP names (SDXL's second encoder) for every layer, the final norm and the projection."""
    sd = canonical_text_keys(text_encoder.state_dict())
    out = {
        prefix + "token_embedding.weight": sd["embeddings.token_embedding.weight"],
        prefix + "positional_embedding": sd["embeddings.position_embedding.weight"],
        prefix + "ln_final.weight": sd["final_layer_norm.weight"],
        prefix + "ln_final.bias": sd["final_layer_norm.bias"],
        prefix + "text_projection": sd["text_projection.weight"].T,  # OpenCLIP multiplies x @ projection
        prefix + "logit_scale": torch.tensor(4.6052),
    }
    for i in range(text_encoder.config.num_hidden_layers):
        src, dst = f"encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for p in ("weight", "bias"):
            out[dst + f"attn.in_proj_{p}"] = torch.cat([sd[f"{src}self_attn.{q}_proj.{p}"] for q in "qkv"])
            for ours, theirs in OPENCLIP_LAYER_NAMES:
                out[dst + f"{theirs}.{p}"] = sd[f"{src}{ours}.{p}"]
    return out


OPENCLIP_LAYER_NAMES = (
    ("self_attn.out_proj", "attn.out_proj"),
    ("layer_norm1", "ln_1"),
    ("layer_norm2", "ln_2"),
    ("mlp.fc1", "mlp.c_fc"),
    ("mlp.fc2", "mlp.c_proj"),
)


def sdxl_checkpoint(
    unet: UNet2DConditionModel,
    vae: AutoencoderKL,
    text_encoder: CLIPTextModel,
    text_encoder_2: CLIPTextModelWithProjection,
) -> dict:
    """All tensors of an SDXL single-file checkpoint in the SAI layout (``conditioner.embedders.0``:
    CLIP ViT-L in transformers names, ``.1``: OpenCLIP ViT-bigG in OpenCLIP names)."""
    text = canonical_text_keys(text_encoder.state_dict())
    ldm = {
        **unet_to_ldm(unet),
        **vae_to_ldm(vae),
        **{"conditioner.embedders.0.transformer.text_model." + k: v for k, v in text.items()},
        **openclip_text_to_ldm(text_encoder_2, "conditioner.embedders.1.model."),
    }
    return {k: v.detach().contiguous().clone() for k, v in ldm.items()}


def sd1_checkpoint(unet: UNet2DConditionModel, vae: AutoencoderKL, text_encoder: CLIPTextModel) -> dict:
    """All tensors of an SD 1.x single-file checkpoint, contiguous and detached, ready to save."""
    ldm = {**unet_to_ldm(unet), **vae_to_ldm(vae), **sd1_text_to_ldm(text_encoder)}
    return {k: v.detach().contiguous().clone() for k, v in ldm.items()}
