"""Generate images with Stable Diffusion 1.x/2.x and textual inversion embeddings.

A command-line twin of kohya-ss sd-scripts' ``gen_img_diffusers.py``: every option of kohya's
script is accepted with the same name, type and default, so existing command lines keep working.
Options this generator does not implement (LoRA networks, ControlNet, CLIP/VGG16 guidance, Deep
Shrink, gradual latent, XTI) end with one line saying so as soon as they are given a value other
than their default; they are never silently ignored. See ``docs/generation.md``.
"""

from __future__ import annotations

import argparse
import functools
import glob
import logging
from pathlib import Path
from typing import Any

from library.errors import UserError, run_cli
from library.generation.run import (
    GenerationSettings,
    Run,
    load_images,
    prompt_from_metadata,
    read_prompt_file,
    resized,
)
from library.generation.samplers import SAMPLER_NAMES
from library.options import default_of, settings_from
from library.runtime import (
    log_level,
    refuse_options,
    setup_console_logging,
    torch_dtype,
    usable_precision,
    use_attention,
)

logger = logging.getLogger("gen_img")

SAMPLER_CHOICES = list(SAMPLER_NAMES)

# ---------------------------------------------------------------------------------------------
# Options


def setup_parser() -> argparse.ArgumentParser:
    """kohya's options, names, types, defaults and choices unchanged."""
    p = argparse.ArgumentParser(
        description="Generate images with Stable Diffusion 1.x/2.x (kohya gen_img_diffusers.py compatible)"
    )
    add = p.add_argument
    setting_default = functools.partial(default_of, GenerationSettings)  # a run's defaults live there
    add("--console_log_level", type=str, default=None, choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
        help="console log level (default INFO)")  # fmt: skip
    add(
        "--console_log_file", type=str, default=None, help="write the log to this file instead of the console"
    )
    add("--console_log_simple", action="store_true", help="plain log lines without time and level")
    add("--v2", action="store_true", help="the model is Stable Diffusion 2.x (detected from the file anyway)")
    add("--v_parameterization", action="store_true", help="the model predicts v (SD 2.x 768-v models)")
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
        "--ckpt", type=str, default=None, help="model: .safetensors/.ckpt file or diffusers folder (required)"
    )
    add("--vae", type=str, default=None, help="replace the model's VAE with this file or folder")
    add("--tokenizer_cache_dir", type=str, default=None, help="folder caching the tokenizer (kohya's layout)")
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
    add(
        "--xformers",
        action="store_true",
        help="use xformers attention (CUDA with xformers installed; else SDPA)",
    )
    add("--sdpa", action="store_true", help="use PyTorch scaled-dot-product attention (the default)")
    add("--diffusers_xformers", action="store_true", help="same as --xformers")
    add("--opt_channels_last", action="store_true", help="channels-last memory format for the UNet and VAE")
    add(
        "--highvram",
        action="store_true",
        help="(ours, as the trainer's) memory is plentiful: keep fp32 weights, not the file's exact fp16",
    )
    add("--network_module", type=str, default=None, nargs="*", help="not supported yet")
    add("--network_weights", type=str, default=None, nargs="*", help="not supported yet")
    add("--network_mul", type=float, default=None, nargs="*", help="not supported yet")
    add("--network_args", type=str, default=None, nargs="*", help="not supported yet")
    add("--network_show_meta", action="store_true", help="not supported yet")
    add("--network_merge_n_models", type=int, default=None, help="not supported yet")
    add("--network_merge", action="store_true", help="not supported yet")
    add("--network_pre_calc", action="store_true", help="not supported yet")
    add("--network_regional_mask_max_color_codes", type=int, default=None, help="not supported yet")
    add("--textual_inversion_embeddings", type=str, default=None, nargs="*",
        help="embedding files (.safetensors, .pt, .bin, WebUI .png/.webp); the file name is the word to use")  # fmt: skip
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
    add("--control_net_models", type=str, default=None, nargs="*", help="not supported yet")
    add("--control_net_preps", type=str, default=None, nargs="*", help="not supported yet")
    add("--control_net_weights", type=float, default=None, nargs="*", help="not supported yet")
    add("--control_net_ratios", type=float, default=None, nargs="*", help="not supported yet")
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
    return p


# option -> (its default, what it is, what to do instead)
_NETWORKS = ("additional networks (LoRA etc.)", "merge the network into the checkpoint first")
_CONTROL_NET = ("ControlNet", "")
_GUIDANCE = ("CLIP/VGG16 guided generation", "")
_DEEP_SHRINK = ("Deep Shrink", "")
_GRADUAL = ("gradual latent", "")
UNSUPPORTED_OPTIONS: dict[str, tuple[Any, tuple[str, str]]] = {
    "network_module": (None, _NETWORKS),
    "network_weights": (None, _NETWORKS),
    "network_mul": (None, _NETWORKS),
    "network_args": (None, _NETWORKS),
    "network_show_meta": (False, _NETWORKS),
    "network_merge_n_models": (None, _NETWORKS),
    "network_merge": (False, _NETWORKS),
    "network_pre_calc": (False, _NETWORKS),
    "network_regional_mask_max_color_codes": (None, _NETWORKS),
    "XTI_embeddings": (None, ("Extended Textual Inversion (XTI)", "use --textual_inversion_embeddings")),
    "clip_guidance_scale": (0.0, _GUIDANCE),
    "clip_image_guidance_scale": (0.0, _GUIDANCE),
    "vgg16_guidance_scale": (0.0, _GUIDANCE),
    "vgg16_guidance_layer": (20, _GUIDANCE),
    "guide_image_path": (None, ("guide images (CLIP/VGG16 guidance, ControlNet)", "")),
    "highres_fix_upscaler": (
        None,
        ("upscaler modules for the highres fix", "leave it out to upscale with LANCZOS"),
    ),
    "highres_fix_upscaler_args": (None, ("upscaler modules for the highres fix", "")),
    "highres_fix_disable_control_net": (False, _CONTROL_NET),
    "control_net_models": (None, _CONTROL_NET),
    "control_net_preps": (None, _CONTROL_NET),
    "control_net_weights": (None, _CONTROL_NET),
    "control_net_ratios": (None, _CONTROL_NET),
    "ds_depth_1": (None, _DEEP_SHRINK),
    "ds_timesteps_1": (650, _DEEP_SHRINK),
    "ds_depth_2": (None, _DEEP_SHRINK),
    "ds_timesteps_2": (650, _DEEP_SHRINK),
    "ds_ratio": (0.5, _DEEP_SHRINK),
    "gradual_latent_timesteps": (None, _GRADUAL),
    "gradual_latent_ratio": (0.5, _GRADUAL),
    "gradual_latent_ratio_step": (0.125, _GRADUAL),
    "gradual_latent_every_n_steps": (3, _GRADUAL),
    "gradual_latent_s_noise": (1.0, _GRADUAL),
    "gradual_latent_unsharp_params": (None, _GRADUAL),
}


def refuse_unsupported(args: argparse.Namespace) -> None:
    """One clear line for the first unimplemented option given a non-default value.

    An empty list (``--network_module`` with no value) counts as not given, as in kohya's script.
    """
    refuse_options(args, {
        name: (default, f"{feature} is not supported by this generator yet" + (f"; {hint}" if hint else ""))
        for name, (default, (feature, hint)) in UNSUPPORTED_OPTIONS.items()
    })  # fmt: skip


def validate_args(args: argparse.Namespace) -> None:
    """Catch mistakes before the model is loaded, each with the flag named."""
    refuse_unsupported(args)
    if not args.ckpt:
        raise UserError("--ckpt is required: the .safetensors/.ckpt checkpoint or diffusers folder to use")
    for name in ("images_per_prompt", "n_iter", "batch_size", "steps", "highres_fix_steps"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} {getattr(args, name)}: must be at least 1")
    for name in ("W", "H"):
        value = getattr(args, name)
        if value is not None and (value < 8 or value % 8):
            raise UserError(f"--{name} {value}: the image size must be a multiple of 8 (e.g. 512)")
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
    if args.mask_path is not None and args.image_path is None:
        raise UserError("--mask_path needs --image_path (the image to inpaint)")


# ---------------------------------------------------------------------------------------------
# Runtime set-up


def setup_logging(args: argparse.Namespace) -> None:
    setup_console_logging(log_level(args.console_log_level), args.console_log_file, args.console_log_simple)


def choose_device_and_dtype(args: argparse.Namespace):
    """CUDA when there is one; ``--fp16``/``--bf16`` by the rule the trainer uses (library.runtime)."""
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    wanted = "fp16" if args.fp16 else "bf16" if args.bf16 else "no"
    precision = usable_precision(wanted, f"--{wanted}", on_gpu=device.type == "cuda")
    return device, torch_dtype(precision)


def setup_attention(args: argparse.Namespace, model, device) -> None:
    """xformers when asked for and usable; otherwise PyTorch SDPA."""
    flag = "--xformers" if args.xformers else "--diffusers_xformers"
    chosen = use_attention([model.unet, model.vae], xformers=args.xformers or args.diffusers_xformers, flag=flag,
                           device=device)  # fmt: skip
    logger.info("using %s attention", "xformers" if chosen == "xformers" else "PyTorch SDPA")


def resolve_checkpoint(path: str) -> str:
    """kohya: a path that is no file may be a glob pattern matching exactly one file."""
    if Path(path).exists():
        return path
    matches = glob.glob(path)
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise UserError(f"--ckpt {path}: the pattern matches {len(matches)} files; name one")
    return path  # load_sd_model reports it as not found


# ---------------------------------------------------------------------------------------------
# Entry point


def main(argv: list[str] | None = None) -> int:
    args = setup_parser().parse_args(argv)
    validate_args(args)  # before anything heavy is imported: a mistake is reported at once
    setup_logging(args)
    from library.files import ensure_writable_folder

    ensure_writable_folder(Path(args.outdir), "--outdir")  # before the model loads
    if args.use_original_file_name and args.image_path is None:
        logger.warning(
            "--use_original_file_name only applies to img2img (--image_path); using the usual names"
        )
    if args.v_parameterization and not args.v2:
        logger.warning("--v_parameterization without --v2: v-prediction is normally used with SD 2.x models")

    prompt_list: list[str] = []
    if args.from_file is not None:
        prompt_list = read_prompt_file(args.from_file)
        logger.info("read %d prompts from %s", len(prompt_list), args.from_file)
    elif args.prompt is not None:
        prompt_list = [args.prompt]
    if args.from_file is not None and args.prompt is not None:
        logger.warning("--from_file is given, so --prompt is not used (as in kohya's script)")

    init_images = load_images(args.image_path, "--image_path") if args.image_path else None
    mask_images = load_images(args.mask_path, "--mask_path") if args.mask_path else None
    if init_images and not prompt_list and not args.interactive:
        prompt_list = [prompt_from_metadata(image) for image in init_images]
        init_images = [image for image in init_images for _ in range(args.images_per_prompt)]
        if mask_images:
            mask_images = [image for image in mask_images for _ in range(args.images_per_prompt)]
        logger.info("using the prompts saved in the %d source images", len(prompt_list))
    if not prompt_list and not args.interactive:
        if args.from_file is not None:
            raise UserError(f"--from_file {args.from_file}: the file holds no prompts")
        raise UserError("no prompt: give --prompt, --from_file or --interactive")
    if args.interactive and args.n_iter > 1:
        logger.warning(
            "--interactive: --n_iter %d is ignored; each prompt is generated once (kohya)", args.n_iter
        )
    settings = settings_from(GenerationSettings, args, n_iter=1 if args.interactive else args.n_iter)
    if init_images and args.W and args.H:
        size = (args.W, args.H)
        if args.highres_fix_scale is not None:  # the first pass works at the reduced size
            size = (int(args.W * args.highres_fix_scale + 0.5), int(args.H * args.highres_fix_scale + 0.5))
        init_images = [resized(image, size) for image in init_images]
        mask_images = [resized(image, size) for image in mask_images] if mask_images else None

    from library.embeddings.install import install_embeddings
    from library.generation.generator import ImageGenerator
    from library.host_memory import keep_freed_memory_in_process
    from library.models.loading import load_sd_model

    device, dtype = choose_device_and_dtype(args)
    model = load_sd_model(
        resolve_checkpoint(args.ckpt),
        v2=args.v2,
        v_parameterization=args.v_parameterization,
        vae=args.vae,
        tokenizer_cache_dir=args.tokenizer_cache_dir,
        dtype=dtype,  # cast as it loads: no full-precision copy
        exact_half_storage=not args.highvram,  # in fp32, the file's fp16 weights stay fp16 (same pixels)
    )
    embeddings = install_embeddings(model, args.textual_inversion_embeddings or [])
    model.text_encoder.to(device)  # already in dtype; a cast would widen the half-stored weights
    setup_attention(args, model, device)
    if args.opt_channels_last:
        import torch

        model.unet.to(memory_format=torch.channels_last)
        model.vae.to(memory_format=torch.channels_last)
    if args.vae_slices is not None:
        model.vae.enable_tiling()
        logger.info(
            "--vae_slices %d: decoding with diffusers' VAE tiling (the image is split into tiles, not %d slices)",
            args.vae_slices,
            args.vae_slices,
        )
    vae_batch_size = None
    if args.vae_batch_size is not None:
        value = args.vae_batch_size
        vae_batch_size = max(1, int(args.batch_size * value)) if value < 1 else int(value)
    generator = ImageGenerator(
        model,
        clip_skip=args.clip_skip,
        max_embeddings_multiples=args.max_embeddings_multiples,
        device=device,
        dtype=dtype,
        placeholder_vectors=embeddings,
        vae_batch_size=vae_batch_size,
        progress_bar=True,
    )
    if device.type == "cpu":  # the load's temporaries are returned; the steps' activations are then reused
        keep_freed_memory_in_process()
    run = Run(settings, generator, model, embeddings)
    run.init_images, run.mask_images = init_images, mask_images
    written = run.run(prompt_list, args.interactive)
    logger.info("done: %d images in %s", len(written), args.outdir)
    return 0


if __name__ == "__main__":
    run_cli(main)
