"""Command-line options of ``gen_img_diffusers.py``: kohya's names, types, defaults and choices.

The options the trainer shares (model, console log, attention) come from
``library.shared_options``; options this generator does not implement are accepted, so that a
kohya command line is understood, and refused with one line as soon as they are given a value
other than their default. ``settings_from_command_line`` turns the command line into
``GeneratorSettings`` once; nothing below reads the parsed namespace.
"""

from __future__ import annotations

import argparse
import functools
import glob
import logging
from dataclasses import dataclass, field
from pathlib import Path

from library.errors import OneLineParser, UserError
from library.generation.run import GenerationSettings
from library.generation.samplers import SAMPLER_NAMES, check_steps
from library.images import MAX_RESOLUTION
from library.options import default_of, settings_from
from library.runtime import refuse_impossible_numbers, refuse_options, setup_console_logging
from library.shared_options import (
    ConsoleSettings,
    ModelSettings,
    add_attention_options,
    add_console_options,
    add_model_options,
)

logger = logging.getLogger("gen_img")

SAMPLER_CHOICES = list(SAMPLER_NAMES)


def setup_parser() -> argparse.ArgumentParser:
    """kohya's options, names, types, defaults and choices unchanged."""
    p = OneLineParser(
        description="Generate images with Stable Diffusion 1.x/2.x and SDXL (kohya gen_img_diffusers.py and "
        "gen_img.py compatible)"
    )
    add_console_options(p)
    add_model_options(p, "--ckpt", "model: .safetensors/.ckpt file or diffusers folder (required)")
    add_attention_options(p)
    add = p.add_argument
    add("--sdxl", action="store_true", help="the model is SDXL (kohya's gen_img.py; detected from the file)")
    add("--v1", action="store_true", help="the model is SD 1.x (kohya's gen_img.py; detected from the file)")
    setting_default = functools.partial(default_of, GenerationSettings)  # a run's defaults live there
    add(
        "--prompt",
        type=str,
        default=None,
        help="the prompt, with optional --n --w --h --s --d --l --nl --ss options",
    )
    add(
        "--from_file",
        type=str,
        default=None,
        help="read prompts from this file, one a line (# starts a comment)",
    )
    add(
        "--interactive",
        action="store_true",
        help="read prompts from standard input, one a line, until end of input",
    )
    add("--no_preview", action="store_true", help="accepted for compatibility; images are never previewed")
    add(
        "--image_path",
        type=str,
        default=None,
        help="source image (or folder of images) for img2img / inpainting",
    )
    add(
        "--mask_path",
        type=str,
        default=None,
        help="inpainting mask (or folder): white is repainted, black kept",
    )
    add(
        "--strength",
        type=float,
        default=setting_default("strength"),
        help="img2img / inpainting strength, 0..1 (default 0.8)",
    )
    add(
        "--images_per_prompt",
        type=int,
        default=setting_default("images_per_prompt"),
        help="images per prompt",
    )
    add("--outdir", type=str, default=setting_default("outdir"), help="folder for the images")
    add("--sequential_file_name", action="store_true", help="name images im_000001.png, im_000002.png, ...")
    add(
        "--use_original_file_name",
        action="store_true",
        help="img2img: name each image after its source image",
    )
    add(
        "--n_iter",
        type=int,
        default=setting_default("n_iter"),
        help="repeat the whole prompt list this many times",
    )
    add(
        "--H",
        type=int,
        default=setting_default("H"),
        help="image height (default 512; img2img: the source image's)",
    )
    add(
        "--W",
        type=int,
        default=setting_default("W"),
        help="image width (default 512; img2img: the source image's)",
    )
    add("--batch_size", type=int, default=setting_default("batch_size"), help="images generated together")
    add(
        "--vae_batch_size",
        type=float,
        default=None,
        help="images decoded together; below 1: a share of --batch_size",
    )
    add(
        "--vae_slices",
        type=int,
        default=None,
        help="decode the VAE in tiles to save memory (diffusers' VAE tiling)",
    )
    add(
        "--no_half_vae",
        action="store_true",
        help="keep the VAE in fp32 with --fp16/--bf16 (kohya's SDXL generators: SDXL's VAE overflows in fp16)",
    )
    add("--steps", type=int, default=setting_default("steps"), help="sampling steps")
    add(
        "--sampler",
        type=str,
        default=setting_default("sampler"),
        choices=SAMPLER_CHOICES,
        help="sampler (scheduler)",
    )
    add("--scale", type=float, default=setting_default("scale"), help="classifier-free guidance scale")
    add(
        "--seed",
        type=int,
        default=setting_default("seed"),
        help="seed of a single image, or the seed that draws every image's seed",
    )
    add(
        "--iter_same_seed",
        action="store_true",
        help="without --seed: one seed for every prompt of an iteration",
    )
    add("--shuffle_prompts", action="store_true", help="shuffle the prompt list in each iteration")
    add("--fp16", action="store_true", help="run in float16 (bfloat16 on CPU)")
    add("--bf16", action="store_true", help="run in bfloat16")
    add("--diffusers_xformers", action="store_true", help="same as --xformers")
    add("--opt_channels_last", action="store_true", help="channels-last memory format for the UNet and VAE")
    add(
        "--network_module",
        type=str,
        default=None,
        nargs="*",
        help="one per --network_weights file: networks.lora (kohya's LoRA)",
    )
    add("--network_weights", type=str, default=None, nargs="*", help="kohya LoRA files to apply")
    add("--network_mul", type=float, default=None, nargs="*", help="each LoRA's strength (default 1.0)")
    add("--network_args", type=str, default=None, nargs="*", help="not supported yet")
    add("--network_show_meta", action="store_true", help="print each LoRA file's metadata")
    add("--network_merge_n_models", type=int, default=None, help="not supported yet")
    add(
        "--network_merge",
        action="store_true",
        help="kohya merges the LoRA into the weights for speed; here it is always applied beside them "
        "(the same images)",
    )
    add(
        "--network_pre_calc",
        action="store_true",
        help="a speed option of kohya's; the same images without it",
    )
    add("--network_regional_mask_max_color_codes", type=int, default=None, help="not supported yet")
    add(
        "--textual_inversion_embeddings",
        type=str,
        default=None,
        nargs="*",
        help="embedding files (.safetensors, .pt, .bin, WebUI .png/.webp); the file name is the word to use",
    )
    add("--XTI_embeddings", type=str, default=None, nargs="*", help="not supported yet")
    add(
        "--clip_skip",
        type=int,
        default=setting_default("clip_skip"),
        help="use the output of the n-th text encoder layer from the end",
    )
    add(
        "--max_embeddings_multiples",
        type=int,
        default=setting_default("max_embeddings_multiples"),
        help="allow prompts of 75 x this many tokens (1-3)",
    )
    add("--clip_guidance_scale", type=float, default=0.0, help="not supported yet")
    add("--clip_image_guidance_scale", type=float, default=0.0, help="not supported yet")
    add("--vgg16_guidance_scale", type=float, default=0.0, help="not supported yet")
    add("--vgg16_guidance_layer", type=int, default=20, help="not supported yet")
    add("--guide_image_path", type=str, default=None, nargs="*", help="not supported yet")
    add(
        "--highres_fix_scale",
        type=float,
        default=setting_default("highres_fix_scale"),
        help="highres fix: first pass at this share of the size",
    )
    add(
        "--highres_fix_steps",
        type=int,
        default=setting_default("highres_fix_steps"),
        help="highres fix: steps of the first pass",
    )
    add(
        "--highres_fix_strength",
        type=float,
        default=setting_default("highres_fix_strength"),
        help="highres fix: img2img strength of the first pass",
    )
    add("--highres_fix_save_1st", action="store_true", help="highres fix: also save the first pass's images")
    add(
        "--highres_fix_latents_upscaling",
        action="store_true",
        help="highres fix: upscale latents, not images",
    )
    add("--highres_fix_upscaler", type=str, default=None, help="not supported yet")
    add("--highres_fix_upscaler_args", type=str, default=None, help="not supported yet")
    add("--highres_fix_disable_control_net", action="store_true", help="not supported yet")
    add(
        "--negative_scale",
        type=float,
        default=setting_default("negative_scale"),
        help="a separate guidance scale for the negative prompt",
    )
    for name, what in (
        ("original_height", "original height"),
        ("original_width", "original width"),
        ("original_height_negative", "original height for the negative prompt"),
        ("original_width_negative", "original width for the negative prompt"),
        ("crop_top", "crop top"),
        ("crop_left", "crop left"),
    ):
        add(f"--{name}", type=int, default=setting_default(name), help=f"SDXL size conditioning: {what}")
    add("--control_net_models", type=str, default=None, nargs="*", help="not supported yet")
    add("--control_net_preps", type=str, default=None, nargs="*", help="not supported yet")
    add("--control_net_weights", type=float, default=None, nargs="*", help="not supported yet")
    add("--control_net_ratios", type=float, default=None, nargs="*", help="not supported yet")
    add("--control_net_lllite_models", type=str, default=None, nargs="*", help="not supported yet")
    add("--control_net_multipliers", type=float, default=None, nargs="*", help="not supported yet")
    add("--clip_vision_strength", type=float, default=None, help="not supported yet")
    add("--ds_depth_1", type=int, default=None, help="not supported yet")
    add("--ds_timesteps_1", type=int, default=650, help="not supported yet")
    add("--ds_depth_2", type=int, default=None, help="not supported yet")
    add("--ds_timesteps_2", type=int, default=650, help="not supported yet")
    add("--ds_ratio", type=float, default=0.5, help="not supported yet")
    add("--gradual_latent_timesteps", type=int, default=None, help="not supported yet")
    add("--gradual_latent_ratio", type=float, default=0.5, help="not supported yet")
    add("--gradual_latent_ratio_step", type=float, default=0.125, help="not supported yet")
    add("--gradual_latent_every_n_steps", type=int, default=3, help="not supported yet")
    add("--gradual_latent_s_noise", type=float, default=1.0, help="not supported yet")
    add("--gradual_latent_unsharp_params", type=str, default=None, help="not supported yet")
    add("--zero_terminal_snr", action="store_true", help="not supported yet")
    add("--force_scheduler_zero_steps_offset", action="store_true", help="not supported yet")
    add("--pyramid_noise_prob", type=float, default=None, help="not supported yet")
    add("--pyramid_noise_discount_range", type=float, nargs=2, default=None, help="not supported yet")
    add("--noise_offset_prob", type=float, default=None, help="not supported yet")
    add("--noise_offset_range", type=float, nargs=2, default=None, help="not supported yet")
    add("--from_module", type=str, default=None, help="not supported yet")
    add("--prompter_module_args", type=str, default=None, help="not supported yet")
    add(
        "--emb_normalize_mode",
        type=str,
        default="original",
        choices=["original", "none", "abs"],
        help="prompt weights keep each prompt's mean (kohya's original); the others are not supported yet",
    )
    return p


_NETWORKS = (
    "this network option",
    "kohya LoRA files are applied with --network_module networks.lora --network_weights FILE",
)
_CONTROL_NET = ("ControlNet", "")
_GUIDANCE = ("CLIP/VGG16 guided generation", "")
_DEEP_SHRINK = ("Deep Shrink", "")
_GRADUAL = ("gradual latent", "")
_NOISE = ("extra start noise (noise offset, pyramid noise)", "")
_PROMPTER = ("prompt modules (Python code that writes the prompts)", "use --from_file")
UNSUPPORTED_OPTIONS: dict[str, tuple[str, str]] = {  # name: (what it is, what to do instead)
    "network_args": _NETWORKS,
    "network_merge_n_models": _NETWORKS,
    "network_regional_mask_max_color_codes": _NETWORKS,
    "XTI_embeddings": ("Extended Textual Inversion (XTI)", "use --textual_inversion_embeddings"),
    "clip_guidance_scale": _GUIDANCE,
    "clip_image_guidance_scale": _GUIDANCE,
    "vgg16_guidance_scale": _GUIDANCE,
    "vgg16_guidance_layer": _GUIDANCE,
    "guide_image_path": ("guide images (CLIP/VGG16 guidance, ControlNet)", ""),
    "highres_fix_upscaler": ("upscaler modules for the highres fix", "leave it out to upscale with LANCZOS"),
    "highres_fix_upscaler_args": ("upscaler modules for the highres fix", ""),
    "highres_fix_disable_control_net": _CONTROL_NET,
    "control_net_models": _CONTROL_NET,
    "control_net_preps": _CONTROL_NET,
    "control_net_weights": _CONTROL_NET,
    "control_net_ratios": _CONTROL_NET,
    "control_net_lllite_models": ("ControlNet-LLLite", ""),
    "control_net_multipliers": _CONTROL_NET,
    "clip_vision_strength": ("CLIP Vision conditioning of SDXL img2img", ""),
    "ds_depth_1": _DEEP_SHRINK,
    "ds_timesteps_1": _DEEP_SHRINK,
    "ds_depth_2": _DEEP_SHRINK,
    "ds_timesteps_2": _DEEP_SHRINK,
    "ds_ratio": _DEEP_SHRINK,
    "gradual_latent_timesteps": _GRADUAL,
    "gradual_latent_ratio": _GRADUAL,
    "gradual_latent_ratio_step": _GRADUAL,
    "gradual_latent_every_n_steps": _GRADUAL,
    "gradual_latent_s_noise": _GRADUAL,
    "gradual_latent_unsharp_params": _GRADUAL,
    "zero_terminal_snr": ("zero terminal SNR schedules", ""),
    "force_scheduler_zero_steps_offset": ("a zero steps offset forced on the sampler", ""),
    "pyramid_noise_prob": _NOISE,
    "pyramid_noise_discount_range": _NOISE,
    "noise_offset_prob": _NOISE,
    "noise_offset_range": _NOISE,
    "from_module": _PROMPTER,
    "prompter_module_args": _PROMPTER,
    "emb_normalize_mode": (
        "prompt-weight normalisation other than kohya's original (each prompt keeps its mean)",
        "leave --emb_normalize_mode out",
    ),
}


def refuse_unsupported(args: argparse.Namespace) -> None:
    """One clear line for the first unimplemented option given a non-default value.

    An empty list (``--network_module`` with no value) counts as not given, as in kohya's script.
    """
    reasons = {
        name: f"{feature} is not supported by this generator yet" + (f"; {hint}" if hint else "")
        for name, (feature, hint) in UNSUPPORTED_OPTIONS.items()
    }
    refuse_options(args, setup_parser(), reasons)


def check_options(args: argparse.Namespace) -> None:
    """Catch mistakes before the model is loaded, each with the flag named."""
    refuse_unsupported(args)
    refuse_impossible_numbers(args, setup_parser())
    if args.v1 and (args.sdxl or args.v2):
        raise UserError(
            f"--v1 and --{'sdxl' if args.sdxl else 'v2'} name two model families; give the one of your model "
            "(it is also recognised from the file)"
        )
    if not args.ckpt:
        raise UserError("--ckpt is required: the .safetensors/.ckpt checkpoint or diffusers folder to use")
    for name in ("images_per_prompt", "n_iter", "batch_size", "steps", "highres_fix_steps"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} {getattr(args, name)}: must be at least 1")
    for name in ("W", "H"):
        value = getattr(args, name)
        if value is not None and (value < 8 or value % 8):
            raise UserError(f"--{name} {value}: the image size must be a multiple of 8 (e.g. 512)")
        if value is not None and value > MAX_RESOLUTION:
            raise UserError(
                f"--{name} {value}: more than {MAX_RESOLUTION} pixels; models draw at 512 to 2048"
            )
    for name in ("strength", "highres_fix_strength"):
        value = getattr(args, name)
        if value is not None and not 0.0 <= value <= 1.0:
            raise UserError(f"--{name} {value}: must be between 0 and 1")
    if args.max_embeddings_multiples is not None and args.max_embeddings_multiples not in (1, 2, 3):
        raise UserError(
            f"--max_embeddings_multiples {args.max_embeddings_multiples}: use 1, 2 or 3 (75, 150 or 225 tokens)"
        )
    if args.clip_skip is not None and args.clip_skip < 1:
        raise UserError(f"--clip_skip {args.clip_skip}: use 1 or more (1 = the last layer)")
    if args.highres_fix_scale is not None and args.highres_fix_scale <= 0:
        raise UserError(f"--highres_fix_scale {args.highres_fix_scale}: must be above 0 (e.g. 0.5)")
    if args.vae_batch_size is not None and args.vae_batch_size <= 0:
        raise UserError(f"--vae_batch_size {args.vae_batch_size}: must be above 0")
    if args.vae_slices is not None and args.vae_slices < 1:
        raise UserError(f"--vae_slices {args.vae_slices}: must be at least 1")
    check_steps(args.sampler, args.steps)
    if args.mask_path is not None and args.image_path is None:
        raise UserError("--mask_path needs --image_path (the image to inpaint)")


@dataclass(frozen=True)
class InputSettings:
    """Where prompts and source images come from (fields named like kohya's options)."""

    prompt: str | None = None
    from_file: str | None = None
    interactive: bool = False
    image_path: str | None = None
    mask_path: str | None = None
    textual_inversion_embeddings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class NetworkSettings:
    """kohya LoRA files to apply (``--network_weights``) and their strengths (``--network_mul``)."""

    weights: list[str] = field(default_factory=list)
    multipliers: list[float] = field(default_factory=list)
    show_meta: bool = False


LORA_MODULE = "networks.lora"


def network_settings(args: argparse.Namespace) -> NetworkSettings:
    """kohya's pairing: the i-th ``--network_module`` and ``--network_weights`` go together, the
    i-th ``--network_mul`` is the strength (1.0 when missing)."""
    modules, weights, muls = args.network_module or [], args.network_weights or [], args.network_mul or []
    for name in ("network_merge", "network_pre_calc"):
        if getattr(args, name):
            logger.info("--%s: LoRA files are applied beside the weights; the images are the same", name)
    if not modules and not weights:
        if muls:
            raise UserError("--network_mul: give the LoRA files with --network_module and --network_weights")
        return NetworkSettings()
    if len(modules) != len(weights):
        raise UserError(
            f"--network_module names {len(modules)} module(s) for {len(weights)} --network_weights file(s); "
            f"give one '{LORA_MODULE}' per file"
        )
    other = next((m for m in modules if m != LORA_MODULE), None)
    if other is not None:
        raise UserError(f"--network_module {other}: only kohya's LoRA ({LORA_MODULE}) is supported")
    if len(muls) > len(weights):
        raise UserError(f"--network_mul gives {len(muls)} strengths for {len(weights)} LoRA file(s)")
    for path in weights:
        if not Path(path).is_file():
            raise UserError(f"--network_weights {path}: file not found")
    return NetworkSettings(
        weights=list(weights),
        multipliers=[*muls, *[1.0] * (len(weights) - len(muls))],
        show_meta=args.network_show_meta,
    )


@dataclass(frozen=True)
class DeviceSettings:
    """Precision, attention and VAE decoding options (fields named like kohya's options)."""

    fp16: bool = False
    bf16: bool = False
    xformers: bool = False
    diffusers_xformers: bool = False
    sdpa: bool = False
    opt_channels_last: bool = False
    vae_batch_size: float | None = None
    vae_slices: int | None = None
    no_half_vae: bool = False

    @property
    def wanted_precision(self) -> str:
        return "fp16" if self.fp16 else "bf16" if self.bf16 else "no"

    def vae_batch(self, batch_size: int) -> int | None:
        """``--vae_batch_size``: images decoded together; below 1, a share of ``--batch_size``."""
        value = self.vae_batch_size
        if value is None:
            return None
        return max(1, int(batch_size * value)) if value < 1 else int(value)


@dataclass(frozen=True)
class GeneratorSettings:
    """Everything the generator reads, built once from the command line."""

    model: ModelSettings
    console: ConsoleSettings
    inputs: InputSettings
    device: DeviceSettings
    generation: GenerationSettings
    networks: NetworkSettings = field(default_factory=NetworkSettings)


def settings_from_command_line(argv: list[str] | None = None) -> GeneratorSettings:
    """The command line as settings, checked before anything heavy is imported; console logging is
    set up then, so that what the options do not do is said in the user's log."""
    args = setup_parser().parse_args(argv)
    check_options(args)
    setup_console_logging(settings_from(ConsoleSettings, args))
    interactive = args.interactive
    if args.use_original_file_name and args.image_path is None:
        logger.warning(
            "--use_original_file_name only applies to img2img (--image_path); using the usual names"
        )
    if args.v_parameterization and not args.v2:
        logger.warning("--v_parameterization without --v2: v-prediction is normally used with SD 2.x models")
    if args.from_file is not None and args.prompt is not None:
        logger.warning("--from_file is given, so --prompt is not used (as in kohya's script)")
    if interactive and args.n_iter > 1:
        logger.warning(
            "--interactive: --n_iter %d is ignored; each prompt is generated once (kohya)", args.n_iter
        )
    return GeneratorSettings(
        model=settings_from(
            ModelSettings,
            args,
            path=resolve_checkpoint(args.ckpt),
            expect_sdxl=True if args.sdxl else False if args.v1 else None,
        ),
        console=settings_from(ConsoleSettings, args),
        inputs=settings_from(
            InputSettings, args, textual_inversion_embeddings=args.textual_inversion_embeddings or []
        ),
        device=settings_from(DeviceSettings, args),
        generation=settings_from(GenerationSettings, args, n_iter=1 if interactive else args.n_iter),
        networks=network_settings(args),
    )


def resolve_checkpoint(path: str) -> str:
    """kohya: a path that is no file may be a glob pattern matching exactly one file."""
    if Path(path).exists():
        return path
    matches = glob.glob(path)
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise UserError(f"--ckpt {path}: the pattern matches {len(matches)} files; name one")
    return path  # the loader reports it as not found
