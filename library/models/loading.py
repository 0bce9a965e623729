"""Loading Stable Diffusion 1.x/2.x and SDXL models offline, from any layout users have.

Layouts: a single-file checkpoint (``.safetensors`` or ``.ckpt``, fp16 or fp32, with or without
a ``state_dict`` wrapper; SD 1.x/2.x in the LDM layout, SDXL in the SAI layout with its two text
encoders under ``conditioner.embedders``) or a diffusers folder (``model_index.json`` + subfolders).

Single files are converted with diffusers' own key-mapping functions. The architecture sizes
(channels, layers, cross-attention width, text width and depth) are read from the tensor shapes,
on top of the base configs shipped in ``library/models/configs/``; that is why tiny test checkpoints
load exactly like full-size ones, and why nothing is ever fetched from the hub.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from library.errors import UserError
from library.models.checkpoint_io import (
    SD1_TEXT_PREFIX,
    SD2_TEXT_PREFIX,
    SDXL_TEXT_PREFIXES,
    UNET_PREFIX,
    VAE_PREFIX,
    Checkpoint,
    describe_non_sd_file,
    strip_prefix,
)
from library.models.exact_half_weights import (
    HalfStoredConv2d,
    HalfStoredLinear,
    exact_storage_dtype,
    half_storable_layers,
    store_weights_in_exact_half,
    use_stored_half_weight,
)
from library.models.family import FAMILIES, SD2, ModelFamily
from library.shared_options import ModelSettings
from library.text.conditioning import TextConditioner
from library.text.tokenizer import family_tokenizers

logger = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


@dataclass
class SDModel:
    """The parts of a Stable Diffusion model the trainer and the generator use.

    ``tokenizers`` and ``text_encoders`` are lists, one entry per text encoder of the family
    (``family.encoder_keys``); ``tokenizer``/``text_encoder`` name the first, SD 1.x/2.x's only one.
    """

    tokenizers: list
    text_encoders: list
    vae: AutoencoderKL
    unet: UNet2DConditionModel
    scheduler_config: dict
    family: ModelFamily
    v_parameterization: bool
    name: str  # the checkpoint's file or folder name, recorded in saved embeddings

    @property
    def v2(self) -> bool:
        return self.family is SD2

    @property
    def tokenizer(self) -> Any:
        return self.tokenizers[0]

    @property
    def text_encoder(self) -> CLIPTextModel:
        return self.text_encoders[0]

    @property
    def text_dim(self) -> int:
        return self.text_encoder.config.hidden_size

    @property
    def text_dims(self) -> dict[str, int]:
        """Each text encoder's width, by embedding-file key (``{"clip_l": 768, "clip_g": 1280}``)."""
        return {
            key: encoder.config.hidden_size
            for key, encoder in zip(self.family.encoder_keys, self.text_encoders)
        }

    def text_conditioner(self, tokenizers: list | None = None, **options: Any) -> TextConditioner:
        """The family's text conditioning over this model's encoders; ``tokenizers`` replace the
        model's (the trainer's have the new word's tokens); ``options`` as ``TextConditioner``'s."""
        return self.family.conditioner(tokenizers or self.tokenizers, self.text_encoders, **options)


def base_config(family: str) -> dict:
    """The shipped full-size configuration of a family (``sd1`` or ``sd2``)."""
    return json.loads((CONFIG_DIR / f"{family}.json").read_text())


# ---------------------------------------------------------------------------------------------
# Architecture from tensor shapes


def unet_heads(block_out_channels: list[int], family: str) -> int | list[int]:
    """SD1 UNets use 8 heads everywhere; SD2 and SDXL use 64-channel heads (at least one per level)."""
    if family == "sd1":
        return 8
    return [max(1, ch // 64) for ch in block_out_channels]


def infer_unet_config(unet_sd: dict[str, torch.Tensor], family: str, pooled_width: int = 0) -> dict:
    """A diffusers ``UNet2DConditionModel`` config for the LDM UNet weights ``unet_sd``;
    ``pooled_width`` is SDXL's pooled text width (the rest of its added input is the sizes')."""
    conv_in = unet_sd["input_blocks.0.0.weight"]
    block_ids = sorted({int(k.split(".")[1]) for k in unet_sd if k.startswith("input_blocks.")})
    levels: list[list[int]] = [[]]
    for i in block_ids[1:]:
        if f"input_blocks.{i}.0.op.weight" in unet_sd:  # a downsampler closes a level
            levels.append([])
        else:
            levels[-1].append(i)
    block_out_channels = [
        int(unet_sd[f"input_blocks.{lv[0]}.0.out_layers.3.weight"].shape[0]) for lv in levels
    ]
    has_attention = [f"input_blocks.{lv[0]}.1.proj_in.weight" in unet_sd for lv in levels]
    depth = [_transformer_depth(unet_sd, f"input_blocks.{lv[0]}.1.") for lv in levels]
    if not has_attention[-1]:  # diffusers gives the middle block the last level's depth
        depth[-1] = _transformer_depth(unet_sd, "middle_block.1.")
    attention_depth = [d for d, attn in zip(depth, has_attention) if attn]
    to_k = next(v for k, v in unet_sd.items() if k.endswith("attn2.to_k.weight"))
    proj_in = next(v for k, v in unet_sd.items() if k.endswith(".proj_in.weight"))

    config = base_config(family)["unet"]
    if "label_emb.0.0.weight" in unet_sd:  # SDXL: pooled text and six size numbers, each embedded
        added_input = int(unet_sd["label_emb.0.0.weight"].shape[1])
        config.update(
            projection_class_embeddings_input_dim=added_input,
            addition_time_embed_dim=(added_input - pooled_width) // 6,
        )
        attention_depth = [max(d, 1) for d in depth]  # one entry per level, attention or not
    config.update(
        in_channels=int(conv_in.shape[1]),
        out_channels=int(unet_sd["out.2.weight"].shape[0]),
        block_out_channels=block_out_channels,
        layers_per_block=len(levels[0]),
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in has_attention],
        up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(has_attention)],
        cross_attention_dim=int(to_k.shape[1]),
        transformer_layers_per_block=attention_depth[0]
        if len(set(attention_depth)) == 1
        else attention_depth,
        use_linear_projection=proj_in.ndim == 2,
        attention_head_dim=unet_heads(block_out_channels, family),
    )
    return config


def _transformer_depth(unet_sd: dict[str, torch.Tensor], block: str) -> int:
    """Transformer layers of the attention block at ``block`` (0 where there is none)."""
    prefix = block + "transformer_blocks."
    return len({k[len(prefix) :].split(".")[0] for k in unet_sd if k.startswith(prefix)})


def infer_vae_config(vae_sd: dict[str, torch.Tensor], family: str) -> dict:
    """A diffusers ``AutoencoderKL`` config for LDM VAE weights (prefix already removed)."""
    n_levels = len({k.split(".")[2] for k in vae_sd if k.startswith("encoder.down.")})
    channels = [int(vae_sd[f"encoder.down.{i}.block.0.conv2.weight"].shape[0]) for i in range(n_levels)]
    n_res = len({k.split(".")[4] for k in vae_sd if k.startswith("encoder.down.0.block.")})
    config = base_config(family)["vae"]
    config.update(
        in_channels=int(vae_sd["encoder.conv_in.weight"].shape[1]),
        out_channels=int(vae_sd["decoder.conv_out.weight"].shape[0]),
        latent_channels=int(vae_sd["quant_conv.weight"].shape[0]) // 2,
        block_out_channels=channels,
        layers_per_block=n_res,
        down_block_types=["DownEncoderBlock2D"] * n_levels,
        up_block_types=["UpDecoderBlock2D"] * n_levels,
    )
    return config


def canonical_text_keys(text_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Text-encoder weights named without the ``text_model.`` level (transformers 5 naming)."""
    return {k.removeprefix("text_model."): v for k, v in text_sd.items()}


def _keys_for_module(module: torch.nn.Module, text_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers 4 nests CLIPTextModel under ``text_model`` (and transformers 5 still nests
    CLIPTextModelWithProjection); the projection sits beside it."""
    if hasattr(module, "text_model"):
        return {k if k.startswith("text_projection.") else "text_model." + k: v for k, v in text_sd.items()}
    return text_sd


def infer_text_config(
    text_sd: dict[str, torch.Tensor], family: str, part: str = "text_encoder"
) -> CLIPTextConfig:
    """A ``CLIPTextConfig`` for canonical text encoder weights (see ``canonical_text_keys``);
    ``part`` names the base config (SDXL's second encoder: ``text_encoder_2``)."""
    token_embedding = text_sd["embeddings.token_embedding.weight"]
    width = int(token_embedding.shape[1])
    layers = len({k.split(".")[2] for k in text_sd if k.startswith("encoder.layers.")})
    config = base_config(family)[part]
    if "text_projection.weight" in text_sd:
        config["projection_dim"] = int(text_sd["text_projection.weight"].shape[0])
    config.update(
        vocab_size=int(token_embedding.shape[0]),
        hidden_size=width,
        intermediate_size=int(text_sd["encoder.layers.0.mlp.fc1.weight"].shape[0]),
        num_hidden_layers=layers,
        num_attention_heads=max(1, width // 64),
        max_position_embeddings=int(text_sd["embeddings.position_embedding.weight"].shape[0]),
    )
    return CLIPTextConfig(**config)


# ---------------------------------------------------------------------------------------------
# Building modules from converted weights


def _build(
    model_cls,
    config,
    state: dict[str, torch.Tensor],
    what: str,
    path: Path,
    dtype: torch.dtype,
    exact_half_storage: bool = False,
):
    """Instantiate without memory (meta device) and move ``state``'s tensors in, cast to ``dtype``.

    The tensors are taken out of ``state`` one by one as they are cast, so the file's copy of a
    weight is freed as soon as its cast copy exists: the peak is the model plus what is left of
    ``state`` plus one tensor, not both whole (an fp16 file loaded for fp32 used to hold both).
    With ``exact_half_storage`` a frozen layer's weight that is exact in half precision stays in
    it (``library.models.exact_half_weights``): an fp16 file's fp32 copy never exists.
    """
    with init_empty_weights(include_buffers=False):
        model = model_cls(config) if isinstance(config, CLIPTextConfig) else model_cls(**config)
    if isinstance(config, CLIPTextConfig):
        state = _keys_for_module(model, state)
    expected = set(model.state_dict())
    missing = sorted(expected - set(state))
    if missing:
        raise UserError(
            f"{path}: the {what} weights are incomplete (missing {len(missing)} tensors, "
            f"e.g. {missing[0]}); the file is damaged or of an unsupported architecture"
        )
    for key in [k for k in state if k not in expected]:
        del state[key]
    narrowable = half_storable_layers(model, dtype) if exact_half_storage else {}
    for key in list(state):
        tensor = state.pop(key)
        owner, _, name = key.rpartition(".")
        layer = narrowable.get(owner) if name == "weight" else None
        narrow = exact_storage_dtype(tensor) if layer is not None else None
        _assign(model, key, tensor.to(narrow or dtype), path, trainable=narrow is None)
        if narrow is not None:
            use_stored_half_weight(layer)
    return model.eval()


def _assign(
    model: torch.nn.Module, key: str, tensor: torch.Tensor, path: Path, trainable: bool = True
) -> None:
    """Put ``tensor`` in place of the (meta) parameter or buffer ``key`` of ``model``."""
    owner_name, _, name = key.rpartition(".")
    owner = model.get_submodule(owner_name)
    current = owner._parameters.get(name)
    if current is None:
        current = owner._buffers[name]
    if current.shape != tensor.shape:
        raise UserError(
            f"{path}: {key} has shape {tuple(tensor.shape)} where the model needs {tuple(current.shape)}; "
            "the file is damaged or of an unsupported architecture"
        )
    if name in owner._parameters:
        owner._parameters[name] = torch.nn.Parameter(
            tensor, requires_grad=current.requires_grad and trainable
        )
    else:
        owner._buffers[name] = tensor


def _sd2_text_weights(state: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """OpenCLIP weights in diffusers names, without the last layer (SD2 uses the penultimate one)."""
    layers = sorted(
        {int(k.split(".")[4]) for k in state if k.startswith(SD2_TEXT_PREFIX + "transformer.resblocks.")}
    )
    last = f"{SD2_TEXT_PREFIX}transformer.resblocks.{layers[-1]}."
    kept = {k: v for k, v in state.items() if not k.startswith(last)}
    # the conversion only reads .config.hidden_size from the model when there is no text_projection
    width = int(state[SD2_TEXT_PREFIX + "token_embedding.weight"].shape[1])
    stand_in = type("StandIn", (), {"config": CLIPTextConfig(hidden_size=width)})()
    converted = convert_open_clip_checkpoint(stand_in, kept, prefix=SD2_TEXT_PREFIX)
    converted.pop("text_projection.weight", None)  # CLIPTextModel has no projection
    return canonical_text_keys(converted)


def _sd1_text_weights(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    converted = canonical_text_keys(convert_ldm_clip_checkpoint(state))  # old files lack "text_model."
    converted.pop("embeddings.position_ids", None)
    return converted


def _sdxl_text_weights(state: dict[str, torch.Tensor], part: int) -> dict[str, torch.Tensor]:
    """SDXL's encoder ``part`` (0: CLIP ViT-L in transformers names; 1: OpenCLIP bigG, every layer
    kept and its projection) in canonical diffusers names."""
    prefix = SDXL_TEXT_PREFIXES[part]
    if part == 0:
        converted = canonical_text_keys(strip_prefix(state, prefix))
    else:
        width = int(state[prefix + "token_embedding.weight"].shape[1])
        stand_in = type("StandIn", (), {"config": CLIPTextConfig(hidden_size=width)})()
        converted = canonical_text_keys(convert_open_clip_checkpoint(stand_in, state, prefix=prefix))
    converted.pop("embeddings.position_ids", None)
    return converted


def text_family(keys: Iterable[str]) -> str:
    """``sdxl`` for SDXL's two encoders, ``sd2`` for an OpenCLIP text encoder, ``sd1`` for OpenAI CLIP."""
    keys = list(keys)
    if any(k.startswith("conditioner.embedders.") for k in keys):
        return "sdxl"
    return "sd2" if any(k.startswith(SD2_TEXT_PREFIX + "transformer.") for k in keys) else "sd1"


def load_vae_weights(
    vae_sd: dict[str, torch.Tensor],
    family: str,
    path: Path,
    dtype: torch.dtype = torch.float32,
    exact_half_storage: bool = False,
) -> AutoencoderKL:
    """An ``AutoencoderKL`` from LDM-named or diffusers-named VAE weights, cast to ``dtype``."""
    if any(k.startswith(VAE_PREFIX) for k in vae_sd):
        vae_sd = strip_prefix(vae_sd, VAE_PREFIX)
    if "encoder.down_blocks.0.resnets.0.conv1.weight" in vae_sd:  # already diffusers names
        down = {k.split(".")[2] for k in vae_sd if k.startswith("encoder.down_blocks.")}
        channels = [
            int(vae_sd[f"encoder.down_blocks.{i}.resnets.0.conv2.weight"].shape[0]) for i in range(len(down))
        ]
        config = base_config(family)["vae"]
        config.update(
            block_out_channels=channels,
            latent_channels=int(vae_sd["quant_conv.weight"].shape[0]) // 2,
            down_block_types=["DownEncoderBlock2D"] * len(channels),
            up_block_types=["UpDecoderBlock2D"] * len(channels),
            layers_per_block=len(
                {k.split(".")[4] for k in vae_sd if k.startswith("encoder.down_blocks.0.resnets.")}
            ),
        )
        return _build(AutoencoderKL, config, vae_sd, "VAE", path, dtype, exact_half_storage)
    if "encoder.conv_in.weight" not in vae_sd:
        raise UserError(f"{path}: no VAE weights found (expected encoder.* / decoder.* tensors)")
    config = infer_vae_config(vae_sd, family)
    converted = convert_ldm_vae_checkpoint(vae_sd, config)
    vae_sd.clear()
    return _build(AutoencoderKL, config, converted, "VAE", path, dtype, exact_half_storage)


# ---------------------------------------------------------------------------------------------
# Entry points


@dataclass(frozen=True)
class LoadOptions:
    """How to read a model: ``dtype`` for the text encoders and the UNet, ``vae_dtype`` for the
    VAE; ``with_vae=False`` reads no VAE; ``exact_half_storage`` keeps frozen layers' exact half
    weights (``library.models.exact_half_weights``); the rest as the options of the same names."""

    v_parameterization: bool = False
    tokenizer_cache_dir: str | Path | None = None
    dtype: torch.dtype = torch.float32
    vae_dtype: torch.dtype = torch.float32
    with_vae: bool = True
    exact_half_storage: bool = False


def load_model(
    settings: ModelSettings, dtype: torch.dtype, vae_dtype: torch.dtype | None = None, with_vae: bool = True
) -> SDModel:
    """The model the command line names (``ModelSettings``), in ``dtype`` (its VAE in ``vae_dtype``)."""
    model = load_sd_model(
        settings.path,
        v2=settings.v2,
        v_parameterization=settings.v_parameterization,
        vae=settings.vae,
        tokenizer_cache_dir=settings.tokenizer_cache_dir,
        dtype=dtype,
        vae_dtype=vae_dtype,
        with_vae=with_vae,
        exact_half_storage=settings.exact_half_storage,
    )
    check_trainer_family(settings, model.family.name)
    return model


def load_model_vae(settings: ModelSettings, dtype: torch.dtype) -> AutoencoderKL:
    """The VAE alone of the model the command line names (``--vae`` when given)."""
    return load_sd_vae(settings.path, settings.vae, dtype)


def load_tokenizers(settings: ModelSettings) -> list:
    """The tokenizers of the model the command line names, before the model itself is read (the
    words are added and the captions checked first): a diffusers folder's own, else the shipped
    vocabulary with ``--v2``'s padding (corrected by ``match_padding`` once the file is read).
    A model of the other trainer's family is refused here, before anything else is read."""
    path = _existing_model_path(settings.path)
    family = peek_family(path)
    if family is not None:
        check_trainer_family(settings, family)
    if settings.expect_sdxl:
        family = "sdxl"
    elif family != "sdxl":
        family = "sd2" if settings.v2 else "sd1"
    return family_tokenizers(family, path if path.is_dir() else None, settings.tokenizer_cache_dir)


def peek_family(path: Path) -> str | None:
    """``sdxl`` or ``sd`` (1.x or 2.x) as far as a cheap look tells: a folder's subfolders, a
    ``.safetensors`` header's names; None for a ``.ckpt`` (known only once it is read)."""
    if path.is_dir():
        return "sdxl" if (path / "text_encoder_2").is_dir() else "sd"
    if path.suffix.lower() != ".safetensors":
        return None
    keys = Checkpoint(path).keys()
    return "sdxl" if any(k.startswith(SDXL_TEXT_PREFIXES) for k in keys) else "sd"


def check_trainer_family(settings: ModelSettings, family: str) -> None:
    """Each trainer trains its own family (``settings.expect_sdxl``); the other one's model is
    refused with the name of the script that trains it."""
    if settings.expect_sdxl is None:
        return
    if settings.expect_sdxl and family != "sdxl":
        raise UserError(
            f"{settings.path}: an SD 1.x/2.x model, not SDXL; train it with train_textual_inversion.py "
            "(the same options) and generate without --sdxl, or pass an SDXL model"
        )
    if not settings.expect_sdxl and family == "sdxl":
        raise UserError(
            f"{settings.path}: an SDXL model; train it with sdxl_train_textual_inversion.py "
            "(the same options) and generate without --v1, or pass an SD 1.x/2.x model"
        )


def load_sd_model(
    path: str | Path,
    v2: bool | None = None,
    v_parameterization: bool = False,
    vae: str | Path | None = None,
    tokenizer_cache_dir: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
    vae_dtype: torch.dtype | None = None,
    with_vae: bool = True,
    exact_half_storage: bool = False,
) -> SDModel:
    """Load tokenizers, text encoders, VAE and UNet (eval mode) from a file or a diffusers folder.

    ``v2`` is what the user said (``--v2``); the file decides, and a disagreement is a warning,
    not the silent breakage kohya gives. ``v_parameterization`` cannot be read from SD weights,
    so the flag (or a diffusers folder's scheduler config) decides it. The weights are cast to
    ``dtype`` (the VAE to ``vae_dtype``, by default the same) as they are read, so a copy in
    another precision never exists; ``vae`` (``--vae``) replaces the model's VAE, which is then
    not read at all. ``with_vae=False`` reads no VAE (``SDModel.vae`` is None): for a caller that
    already has one from ``load_sd_vae``. ``exact_half_storage`` (for frozen fp32 models) keeps
    the layer weights in half precision where that is exact (``library.models.exact_half_weights``); the
    models must then stay frozen and in their dtype.
    """
    vae_dtype = dtype if vae_dtype is None else vae_dtype
    path = _existing_model_path(path)
    options = LoadOptions(
        v_parameterization=v_parameterization,
        tokenizer_cache_dir=tokenizer_cache_dir,
        dtype=dtype,
        vae_dtype=vae_dtype,
        with_vae=with_vae and vae is None,
        exact_half_storage=exact_half_storage,
    )
    model = (_load_diffusers_folder if path.is_dir() else _load_single_file)(path, options)
    _warn_on_v2_mismatch(path, v2, model.family.name)
    if with_vae and vae is not None:
        model.vae = load_vae(vae, model.family.name, vae_dtype, exact_half_storage)
    if exact_half_storage:
        _log_half_storage(model)
    return model


def _log_half_storage(model: SDModel) -> None:
    parts = [part for part in (*model.text_encoders, model.unet, model.vae) if part is not None]
    stored = [
        m for part in parts for m in part.modules() if isinstance(m, HalfStoredConv2d | HalfStoredLinear)
    ]
    if stored:
        saved = sum(m.weight.numel() * (4 - m.weight.element_size()) for m in stored)
        logger.info(
            "%d frozen layers keep their exact half-precision weights and compute in fp32: %.2f GB less "
            "(--highvram keeps them in fp32: more memory, CPU steps up to a fifth faster)",
            len(stored),
            saved / 1e9,
        )


def load_sd_vae(
    path: str | Path, vae: str | Path | None = None, dtype: torch.dtype = torch.float32
) -> AutoencoderKL:
    """The VAE alone: the model's (``path``), or ``vae`` (``--vae``) when given; eval mode.

    The trainer encodes its latents with this before the text encoder and the UNet are read, and
    frees it afterwards, so the VAE and the UNet never take memory at the same time. Only the
    VAE's tensors are read from the checkpoint; the file is checked as ``load_sd_model`` checks it.
    """
    path = _existing_model_path(path)
    if path.is_dir():
        family = _folder_family(path)
        if vae is None:
            return _read_folder_vae(path, dtype)
    else:
        checkpoint = Checkpoint(path)
        keys = checkpoint.keys()
        family = _single_file_family(path, keys)
        if vae is None:
            return load_vae_weights(
                checkpoint.read(k for k in keys if k.startswith(VAE_PREFIX)), family, path, dtype
            )
    return load_vae(vae, family, dtype)


def _existing_model_path(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise UserError(
            f"{path}: not found; pass the path of a .safetensors/.ckpt checkpoint or a diffusers folder "
            "(models are never downloaded)"
        )
    return path


def _warn_on_v2_mismatch(path: Path, v2: bool | None, family: str) -> None:
    if v2 is None:
        return
    if v2 and family == "sd1":
        logger.warning("--v2 was given but %s is an SD 1.x model (CLIP ViT-L); loading it as SD 1.x", path)
    elif not v2 and family == "sd2":
        logger.warning(
            "%s is an SD 2.x model (OpenCLIP ViT-H) but --v2 was not given; loading it as SD 2.x", path
        )


def _scheduler_config(family: str, v_parameterization: bool) -> dict:
    config = base_config(family)["scheduler"]
    config["prediction_type"] = "v_prediction" if v_parameterization else "epsilon"
    return config


def _load_single_file(path: Path, options: LoadOptions) -> SDModel:
    """One component at a time: its tensors read, converted to diffusers names and cast into the model."""
    checkpoint = Checkpoint(path)
    keys = checkpoint.keys()
    family = _single_file_family(path, keys)
    text_encoders = _single_file_text_encoders(checkpoint, keys, family, options)
    pooled_width = text_encoders[-1].config.projection_dim if family == "sdxl" else 0

    unet_state = checkpoint.read(k for k in keys if k.startswith(UNET_PREFIX))
    unet_config = infer_unet_config(strip_prefix(unet_state, UNET_PREFIX), family, pooled_width)
    if options.v_parameterization and family == "sd2":
        unet_config["sample_size"] = 96
    unet_sd = convert_ldm_unet_checkpoint(unet_state, unet_config)
    unet_state.clear()
    unet = _build(
        UNet2DConditionModel, unet_config, unet_sd, "UNet", path, options.dtype, options.exact_half_storage
    )

    vae = None
    if options.with_vae:
        vae = load_vae_weights(
            checkpoint.read(k for k in keys if k.startswith(VAE_PREFIX)),
            family,
            path,
            options.vae_dtype,
            options.exact_half_storage,
        )
    return SDModel(
        tokenizers=family_tokenizers(family, tokenizer_cache_dir=options.tokenizer_cache_dir),
        text_encoders=text_encoders,
        vae=vae,
        unet=unet,
        scheduler_config=_scheduler_config(family, options.v_parameterization),
        family=FAMILIES[family],
        v_parameterization=options.v_parameterization,
        name=path.name,
    )


def _single_file_text_encoders(
    checkpoint: Checkpoint, keys: list[str], family: str, options: LoadOptions
) -> list:
    """The family's text encoders, each read, converted and cast before the next is read."""
    path = checkpoint.path
    if family == "sdxl":
        parts = ((CLIPTextModel, "text_encoder"), (CLIPTextModelWithProjection, "text_encoder_2"))
    else:
        parts = ((CLIPTextModel, "text_encoder"),)
    encoders = []
    for index, (model_cls, part) in enumerate(parts):
        if family == "sdxl":
            state = checkpoint.read(k for k in keys if k.startswith(SDXL_TEXT_PREFIXES[index]))
            text_sd = _sdxl_text_weights(state, index)
        else:
            prefix = SD2_TEXT_PREFIX if family == "sd2" else SD1_TEXT_PREFIX
            state = checkpoint.read(k for k in keys if k.startswith(prefix))
            text_sd = _sd2_text_weights(state, path) if family == "sd2" else _sd1_text_weights(state)
        state.clear()
        what = f"text encoder {index + 1}" if len(parts) > 1 else "text encoder"
        config = infer_text_config(text_sd, family, part)
        encoders.append(
            _build(model_cls, config, text_sd, what, path, options.dtype, options.exact_half_storage)
        )
    return encoders


def _single_file_family(path: Path, keys: list[str]) -> str:
    """``sd1``, ``sd2`` or ``sdxl`` for a single-file checkpoint, after checking that it is a whole model."""
    problem = describe_non_sd_file(keys)
    if problem:
        raise UserError(f"{path}: {problem}")
    family = text_family(keys)
    for number, prefix in enumerate(SDXL_TEXT_PREFIXES if family == "sdxl" else (), start=1):
        if not any(k.startswith(prefix) for k in keys):
            raise UserError(
                f"{path}: an SDXL checkpoint without its text encoder {number} ({prefix}*); the file is "
                "incomplete or of another architecture"
            )
    if family == "sd1" and not any(k.startswith(SD1_TEXT_PREFIX) for k in keys):
        raise UserError(f"{path}: no text encoder weights (cond_stage_model.*) in this checkpoint")
    return family


def _check_diffusers_folder(path: Path) -> None:
    if not (path / "unet" / "config.json").is_file():
        raise UserError(
            f"{path}: not a diffusers model folder (no unet/config.json); pass a checkpoint or a folder"
        )


def _folder_family(path: Path) -> str:
    """``sdxl`` with a second text encoder; ``sd2`` when the text encoder is OpenCLIP's (gelu) or
    the UNet uses linear projections; else ``sd1``."""
    _check_diffusers_folder(path)
    if (path / "text_encoder_2").is_dir():
        return "sdxl"
    try:
        unet = json.loads((path / "unet" / "config.json").read_text())
        text = json.loads((path / "text_encoder" / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: cannot read this diffusers folder ({exc})") from exc
    return "sd2" if text.get("hidden_act") == "gelu" or unet.get("use_linear_projection") else "sd1"


def _read_folder_vae(path: Path, dtype: torch.dtype, exact_half_storage: bool = False) -> AutoencoderKL:
    try:  # diffusers builds on the meta device and casts each tensor as it reads it
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", local_files_only=True, torch_dtype=dtype)
    except (OSError, ValueError, RuntimeError) as exc:
        raise UserError(f"{path}: cannot read this diffusers folder ({exc})") from exc
    return _narrowed_if(exact_half_storage, vae.to(dtype), dtype).eval()


def _narrowed_if(exact_half_storage: bool, model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A model built whole by diffusers or transformers, narrowed afterwards when asked."""
    if exact_half_storage:
        store_weights_in_exact_half(model, dtype)
    return model


FOLDER_TEXT_ENCODERS = {
    "sd1": (("text_encoder", CLIPTextModel),),
    "sd2": (("text_encoder", CLIPTextModel),),
    "sdxl": (("text_encoder", CLIPTextModel), ("text_encoder_2", CLIPTextModelWithProjection)),
}


def _load_diffusers_folder(path: Path, options: LoadOptions) -> SDModel:
    family = _folder_family(path)
    dtype = options.dtype
    try:
        # diffusers and transformers build on the meta device and cast each tensor as they read it
        unet = UNet2DConditionModel.from_pretrained(
            path, subfolder="unet", local_files_only=True, torch_dtype=dtype
        )
        text_encoders = [
            model_cls.from_pretrained(path, subfolder=name, local_files_only=True, torch_dtype=dtype)
            for name, model_cls in FOLDER_TEXT_ENCODERS[family]
        ]
    except (OSError, ValueError, RuntimeError) as exc:
        raise UserError(f"{path}: cannot read this diffusers folder ({exc})") from exc
    unet = _narrowed_if(options.exact_half_storage, unet.to(dtype), dtype)
    text_encoders = [
        _narrowed_if(options.exact_half_storage, encoder.to(dtype), dtype).eval() for encoder in text_encoders
    ]
    vae = _read_folder_vae(path, options.vae_dtype, options.exact_half_storage) if options.with_vae else None
    _warn_on_prediction_type(path, options.v_parameterization)
    return SDModel(
        tokenizers=family_tokenizers(family, model_dir=path, tokenizer_cache_dir=options.tokenizer_cache_dir),
        text_encoders=text_encoders,
        vae=vae,
        unet=unet.eval(),
        scheduler_config=_scheduler_config(family, options.v_parameterization),
        family=FAMILIES[family],
        v_parameterization=options.v_parameterization,
        name=path.name,
    )


def _warn_on_prediction_type(path: Path, v_parameterization: bool) -> None:
    """``--v_parameterization`` decides; a folder whose scheduler says otherwise gets a warning."""
    scheduler_file = path / "scheduler" / "scheduler_config.json"
    if not scheduler_file.is_file():
        return
    prediction = json.loads(scheduler_file.read_text()).get("prediction_type", "epsilon")
    if (prediction == "v_prediction") != v_parameterization:
        logger.warning(
            "%s: the folder's scheduler says prediction_type=%s; using %s as given by --v_parameterization",
            path,
            prediction,
            "v_prediction" if v_parameterization else "epsilon",
        )


def load_vae(
    path: str | Path, family: str, dtype: torch.dtype = torch.float32, exact_half_storage: bool = False
) -> AutoencoderKL:
    """``--vae``: a file (LDM or diffusers names), a VAE folder, or a pipeline folder with ``vae/``."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"--vae {path}: not found")
    if path.is_dir():
        folder = path if (path / "config.json").is_file() else path / "vae"
        if not (folder / "config.json").is_file():
            raise UserError(f"--vae {path}: a folder without config.json (nor vae/config.json)")
        try:
            vae = AutoencoderKL.from_pretrained(folder, local_files_only=True, torch_dtype=dtype)
            return _narrowed_if(exact_half_storage, vae.to(dtype), dtype).eval()
        except (OSError, ValueError, RuntimeError) as exc:
            raise UserError(f"--vae {path}: cannot read this VAE folder ({exc})") from exc
    checkpoint = Checkpoint(path)
    return load_vae_weights(checkpoint.read(checkpoint.keys()), family, path, dtype, exact_half_storage)
