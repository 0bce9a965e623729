"""Loading Stable Diffusion 1.x/2.x models offline, from any layout users have.

Layouts: a single-file LDM checkpoint (``.safetensors`` or ``.ckpt``, fp16 or fp32, with or
without a ``state_dict`` wrapper) or a diffusers folder (``model_index.json`` + subfolders).

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
from transformers import CLIPTextConfig, CLIPTextModel

from library.errors import UserError
from library.models.checkpoint_io import (
    SD1_TEXT_PREFIX,
    SD2_TEXT_PREFIX,
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
from library.text.tokenizer import load_tokenizer

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
    """SD1 UNets use 8 heads everywhere; SD2 uses 64-channel heads (at least one per level)."""
    if family == "sd1":
        return 8
    return [max(1, ch // 64) for ch in block_out_channels]


def infer_unet_config(unet_sd: dict[str, torch.Tensor], family: str) -> dict:
    """A diffusers ``UNet2DConditionModel`` config for the LDM UNet weights ``unet_sd``."""
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
    depth = [
        len({k.split(".")[4] for k in unet_sd if k.startswith(f"input_blocks.{lv[0]}.1.transformer_blocks.")})
        for lv, attn in zip(levels, has_attention)
        if attn
    ]
    to_k = next(v for k, v in unet_sd.items() if k.endswith("attn2.to_k.weight"))
    proj_in = next(v for k, v in unet_sd.items() if k.endswith(".proj_in.weight"))

    config = base_config(family)["unet"]
    config.update(
        in_channels=int(conv_in.shape[1]),
        out_channels=int(unet_sd["out.2.weight"].shape[0]),
        block_out_channels=block_out_channels,
        layers_per_block=len(levels[0]),
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in has_attention],
        up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(has_attention)],
        cross_attention_dim=int(to_k.shape[1]),
        transformer_layers_per_block=depth[0] if len(set(depth)) == 1 else depth,
        use_linear_projection=proj_in.ndim == 2,
        attention_head_dim=unet_heads(block_out_channels, family),
    )
    return config


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
    """transformers 4 nests CLIPTextModel under ``text_model``; transformers 5 does not."""
    if hasattr(module, "text_model"):
        return {"text_model." + k: v for k, v in text_sd.items()}
    return text_sd


def infer_text_config(text_sd: dict[str, torch.Tensor], family: str) -> CLIPTextConfig:
    """A ``CLIPTextConfig`` for canonical text encoder weights (see ``canonical_text_keys``)."""
    token_embedding = text_sd["embeddings.token_embedding.weight"]
    width = int(token_embedding.shape[1])
    layers = len({k.split(".")[2] for k in text_sd if k.startswith("encoder.layers.")})
    config = base_config(family)["text_encoder"]
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


def text_family(keys: Iterable[str]) -> str:
    """``sd2`` for an OpenCLIP text encoder, ``sd1`` for OpenAI CLIP."""
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


def load_model(
    settings: ModelSettings, dtype: torch.dtype, vae_dtype: torch.dtype | None = None, with_vae: bool = True
) -> SDModel:
    """The model the command line names (``ModelSettings``), in ``dtype`` (its VAE in ``vae_dtype``)."""
    return load_sd_model(
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


def load_model_vae(settings: ModelSettings, dtype: torch.dtype) -> AutoencoderKL:
    """The VAE alone of the model the command line names (``--vae`` when given)."""
    return load_sd_vae(settings.path, settings.vae, dtype)


def load_tokenizers(settings: ModelSettings) -> list:
    """The tokenizers of the model the command line names, before the model itself is read (the
    words are added and the captions checked first): a diffusers folder's own, else the shipped
    vocabulary with ``--v2``'s padding (corrected by ``set_family_padding`` once the file is read)."""
    path = Path(settings.path)
    folder = path if path.is_dir() else None
    return [load_tokenizer(settings.v2, model_dir=folder, tokenizer_cache_dir=settings.tokenizer_cache_dir)]


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
    """Load tokenizer, text encoder, VAE and UNet (eval mode) from a file or a diffusers folder.

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
    load = _load_diffusers_folder if path.is_dir() else _load_single_file
    model = load(
        path,
        v_parameterization,
        tokenizer_cache_dir,
        dtype,
        vae_dtype,
        with_vae=with_vae and vae is None,
        exact_half_storage=exact_half_storage,
    )
    _warn_on_v2_mismatch(path, v2, model.family.name)
    if with_vae and vae is not None:
        model.vae = load_vae(vae, model.family.name, vae_dtype, exact_half_storage)
    if exact_half_storage:
        _log_half_storage(model)
    return model


def _log_half_storage(model: SDModel) -> None:
    parts = [part for part in (model.text_encoder, model.unet, model.vae) if part is not None]
    stored = [
        m for part in parts for m in part.modules() if isinstance(m, HalfStoredConv2d | HalfStoredLinear)
    ]
    if stored:
        saved = sum(m.weight.numel() * (4 - m.weight.element_size()) for m in stored)
        logger.info(
            "%d frozen layers keep their exact half-precision weights and compute in fp32: %.2f GB less "
            "(--highvram keeps fp32 weights, faster on a CPU at small sizes)",
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


def _load_single_file(
    path: Path,
    v_parameterization: bool,
    tokenizer_cache_dir,
    dtype: torch.dtype,
    vae_dtype: torch.dtype,
    with_vae: bool = True,
    exact_half_storage: bool = False,
) -> SDModel:
    """One component at a time: its tensors read, converted to diffusers names and cast into the model."""
    checkpoint = Checkpoint(path)
    keys = checkpoint.keys()
    family = _single_file_family(path, keys)
    text_prefix = SD2_TEXT_PREFIX if family == "sd2" else SD1_TEXT_PREFIX
    text_state = checkpoint.read(k for k in keys if k.startswith(text_prefix))
    text_sd = _sd2_text_weights(text_state, path) if family == "sd2" else _sd1_text_weights(text_state)
    text_state.clear()
    text_encoder = _build(
        CLIPTextModel,
        infer_text_config(text_sd, family),
        text_sd,
        "text encoder",
        path,
        dtype,
        exact_half_storage,
    )

    unet_state = checkpoint.read(k for k in keys if k.startswith(UNET_PREFIX))
    unet_config = infer_unet_config(strip_prefix(unet_state, UNET_PREFIX), family)
    if v_parameterization:
        unet_config["sample_size"] = 96
    unet_sd = convert_ldm_unet_checkpoint(unet_state, unet_config)
    unet_state.clear()
    unet = _build(UNet2DConditionModel, unet_config, unet_sd, "UNet", path, dtype, exact_half_storage)

    vae = None
    if with_vae:
        vae = load_vae_weights(
            checkpoint.read(k for k in keys if k.startswith(VAE_PREFIX)),
            family,
            path,
            vae_dtype,
            exact_half_storage,
        )
    return SDModel(
        tokenizers=[load_tokenizer(family == "sd2", tokenizer_cache_dir=tokenizer_cache_dir)],
        text_encoders=[text_encoder],
        vae=vae,
        unet=unet,
        scheduler_config=_scheduler_config(family, v_parameterization),
        family=FAMILIES[family],
        v_parameterization=v_parameterization,
        name=path.name,
    )


def _single_file_family(path: Path, keys: list[str]) -> str:
    """``sd1`` or ``sd2`` for a single-file checkpoint, after checking that it is a whole SD model."""
    problem = describe_non_sd_file(keys)
    if problem:
        raise UserError(f"{path}: {problem}")
    family = text_family(keys)
    if family == "sd1" and not any(k.startswith(SD1_TEXT_PREFIX) for k in keys):
        raise UserError(f"{path}: no text encoder weights (cond_stage_model.*) in this checkpoint")
    return family


def _check_diffusers_folder(path: Path) -> None:
    if (path / "text_encoder_2").is_dir():
        raise UserError(
            f"{path}: an SDXL diffusers folder; SDXL is not supported yet (use an SD 1.x or 2.x model)"
        )
    if not (path / "unet" / "config.json").is_file():
        raise UserError(
            f"{path}: not a diffusers model folder (no unet/config.json); pass a checkpoint or a folder"
        )


def _folder_family(path: Path) -> str:
    """``sd2`` when the text encoder is OpenCLIP's (gelu) or the UNet uses linear projections."""
    _check_diffusers_folder(path)
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


def _load_diffusers_folder(
    path: Path,
    v_parameterization: bool,
    tokenizer_cache_dir,
    dtype: torch.dtype,
    vae_dtype: torch.dtype,
    with_vae: bool = True,
    exact_half_storage: bool = False,
) -> SDModel:
    family = _folder_family(path)
    try:
        # diffusers and transformers build on the meta device and cast each tensor as they read it
        unet = UNet2DConditionModel.from_pretrained(
            path, subfolder="unet", local_files_only=True, torch_dtype=dtype
        )
        text_encoder = CLIPTextModel.from_pretrained(
            path, subfolder="text_encoder", local_files_only=True, torch_dtype=dtype
        )
    except (OSError, ValueError, RuntimeError) as exc:
        raise UserError(f"{path}: cannot read this diffusers folder ({exc})") from exc
    unet = _narrowed_if(exact_half_storage, unet.to(dtype), dtype)
    text_encoder = _narrowed_if(exact_half_storage, text_encoder.to(dtype), dtype)
    vae = _read_folder_vae(path, vae_dtype, exact_half_storage) if with_vae else None
    scheduler_file = path / "scheduler" / "scheduler_config.json"
    if scheduler_file.is_file():
        prediction = json.loads(scheduler_file.read_text()).get("prediction_type", "epsilon")
        if (prediction == "v_prediction") != v_parameterization:
            logger.warning(
                "%s: the folder's scheduler says prediction_type=%s; using %s as given by --v_parameterization",
                path,
                prediction,
                "v_prediction" if v_parameterization else "epsilon",
            )
    return SDModel(
        tokenizers=[load_tokenizer(family == "sd2", model_dir=path, tokenizer_cache_dir=tokenizer_cache_dir)],
        text_encoders=[text_encoder.eval()],
        vae=vae,
        unet=unet.eval(),
        scheduler_config=_scheduler_config(family, v_parameterization),
        family=FAMILIES[family],
        v_parameterization=v_parameterization,
        name=path.name,
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
