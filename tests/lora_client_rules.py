"""Test helper: how the clients find the layer each key of a kohya LoRA file adapts.

Our own re-implementations of the rules written in ``docs/embeddings.md`` ("How clients read
our LoRA files"), gathered from the clients' public code (late 2026):

* AUTOMATIC1111 WebUI (``extensions-builtin/Lora/networks.py``, ``load_network``): the name
  before the first dot is first translated from diffusers' UNet names to the LDM model's module
  names by fixed block arithmetic (``convert_diffusers_name_to_compvis``: a down block holds 3
  LDM input blocks, attention sits at position 1); if no module has that name, ``lora_unet`` is
  replaced by ``diffusion_model`` (SDXL files name their layers the LDM way already). Keys
  starting ``bundle_emb.`` are embeddings.
* ComfyUI and Forge (``comfy/lora.py``, ``model_lora_keys_unet``): ``lora_unet_`` plus either
  the LDM weight's path or the diffusers UNet weight's path (from the model's config), dots as
  underscores; other keys are reported as not loaded and skipped.
* diffusers (``load_lora_weights``): refuses a file unless every key contains ``lora``; a
  bundled file is given with its ``bundle_emb.*`` keys left out (it converts kohya names itself;
  the tests run the real library's conversion).
"""

from __future__ import annotations

import re

import torch

BUNDLE = "bundle_emb."


def webui_sd_name(key: str) -> str:
    """The WebUI's translation of a diffusers-named SD 1.x/2.x UNet LoRA name to an LDM module name."""
    resnet_parts = {"conv1": "in_layers_2", "conv2": "out_layers_3", "time_emb_proj": "emb_layers_1"}
    resnet_parts["conv_shortcut"] = "skip_connection"
    down = re.match(r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", key)
    if down:
        block, kind, index, rest = int(down[1]), down[2], int(down[3]), down[4]
        rest = resnet_parts.get(rest, rest) if kind == "resnets" else rest
        return (
            f"diffusion_model_input_blocks_{1 + block * 3 + index}_{1 if kind == 'attentions' else 0}_{rest}"
        )
    middle = re.match(r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)", key)
    if middle:
        kind, index, rest = middle[1], int(middle[2]), middle[3]
        rest = resnet_parts.get(rest, rest) if kind == "resnets" else rest
        return f"diffusion_model_middle_block_{1 if kind == 'attentions' else index * 2}_{rest}"
    downsampler = re.match(r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv", key)
    if downsampler:
        return f"diffusion_model_input_blocks_{3 + int(downsampler[1]) * 3}_0_op"
    upsampler = re.match(r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv", key)
    if upsampler:
        block = int(upsampler[1])
        return f"diffusion_model_output_blocks_{2 + block * 3}_{2 if block > 0 else 1}_conv"
    up = re.match(r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", key)
    if up:
        block, kind, index, rest = int(up[1]), up[2], int(up[3]), up[4]
        rest = resnet_parts.get(rest, rest) if kind == "resnets" else rest
        return f"diffusion_model_output_blocks_{block * 3 + index}_{1 if kind == 'attentions' else 0}_{rest}"
    return key


def webui_module(key: str, ldm_modules: set[str]) -> str | None:
    """The LDM module (``diffusion_model_...``) the WebUI adapts for a LoRA name, or None."""
    name = webui_sd_name(key)
    if name in ldm_modules:
        return name
    if "lora_unet" in key:
        name = key.replace("lora_unet", "diffusion_model")
        return name if name in ldm_modules else None
    return None


def ldm_unet_modules(ldm_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The WebUI's names of a single file's UNet layers (``diffusion_model_<path>``) and their weights."""
    prefix = "model.diffusion_model."
    return {
        "diffusion_model_" + key[len(prefix) : -len(".weight")].replace(".", "_"): value
        for key, value in ldm_state.items()
        if key.startswith(prefix) and key.endswith(".weight")
    }


def comfyui_key_map(ldm_keys: list[str], diffusers_unet_keys: list[str]) -> set[str]:
    """ComfyUI's (and Forge's) accepted UNet LoRA names for a model: ``lora_unet_`` plus the
    LDM or the diffusers weight path, dots as underscores."""
    names = set()
    for key in ldm_keys:
        if key.startswith("model.diffusion_model.") and key.endswith(".weight"):
            names.add("lora_unet_" + key[len("model.diffusion_model.") : -len(".weight")].replace(".", "_"))
    for key in diffusers_unet_keys:
        if key.endswith(".weight"):
            names.add("lora_unet_" + key[: -len(".weight")].replace(".", "_"))
    return names


def diffusers_loadable(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What a diffusers user passes to ``load_lora_weights``: the file without its bundle."""
    return {key: value for key, value in state.items() if not key.startswith(BUNDLE)}


def fits(down: torch.Tensor, up: torch.Tensor, weight: torch.Tensor) -> bool:
    """A LoRA pair's shapes fit a layer: down reads the layer's inputs, up writes its outputs."""
    return down.shape[1] == weight.shape[1] and up.shape[0] == weight.shape[0]
