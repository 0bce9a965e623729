"""Generate images with Stable Diffusion 1.x/2.x and textual inversion embeddings.

A command-line twin of kohya-ss sd-scripts' ``gen_img_diffusers.py``: every option of kohya's
script is accepted with the same name, type and default, so existing command lines keep working.
kohya LoRA files (``--network_module networks.lora --network_weights``) are applied, with the
embeddings they bundle. Options this generator does not implement (other networks, ControlNet,
CLIP/VGG16 guidance, Deep Shrink, gradual latent, XTI) end with one line saying so as soon as
they are given a value other than their default; they are never silently ignored. See
``docs/generation.md``.

The program, top to bottom: options → prompts and source images → model, embeddings and LoRA → run.
"""

from __future__ import annotations

from library.allocator import restart_under_installed_allocator
from library.errors import run_cli

if __name__ == "__main__":  # first: a restart under tcmalloc would repeat every import below
    run_cli(restart_under_installed_allocator)

import logging
from pathlib import Path

from library.errors import UserError
from library.generation.args import (
    UNSUPPORTED_OPTIONS,
    refuse_unsupported,
    settings_from_command_line,
    setup_parser,
)
from library.generation.run import load_images, prompt_from_metadata, read_prompt_file, resized

__all__ = ["UNSUPPORTED_OPTIONS", "main", "refuse_unsupported", "setup_parser"]

logger = logging.getLogger("gen_img")


def main(argv: list[str] | None = None) -> int:
    settings = settings_from_command_line(argv)  # before anything heavy is imported: mistakes show at once
    inputs, generation, device_settings = settings.inputs, settings.generation, settings.device
    from library.files import ensure_writable_folder

    ensure_writable_folder(Path(generation.outdir), "--outdir")  # before the model loads

    # prompts and source images
    prompt_list = prompts_of(inputs)
    init_images = load_images(inputs.image_path, "--image_path") if inputs.image_path else None
    mask_images = load_images(inputs.mask_path, "--mask_path") if inputs.mask_path else None
    if init_images and not prompt_list and not inputs.interactive:
        prompt_list = [prompt_from_metadata(image) for image in init_images]
        init_images = [image for image in init_images for _ in range(generation.images_per_prompt)]
        if mask_images:
            mask_images = [image for image in mask_images for _ in range(generation.images_per_prompt)]
        logger.info("using the prompts saved in the %d source images", len(prompt_list))
    if not prompt_list and not inputs.interactive:
        if inputs.from_file is not None:
            raise UserError(f"--from_file {inputs.from_file}: the file holds no prompts")
        raise UserError("no prompt: give --prompt, --from_file or --interactive")
    if init_images and generation.W and generation.H:
        size = (generation.W, generation.H)
        if generation.highres_fix_scale is not None:  # the first pass works at the reduced size
            scale = generation.highres_fix_scale
            size = (int(generation.W * scale + 0.5), int(generation.H * scale + 0.5))
        init_images = [resized(image, size) for image in init_images]
        mask_images = [resized(image, size) for image in mask_images] if mask_images else None

    # the model, the embeddings' words and the LoRA networks
    from library.embeddings.install import embedding_words, install_embeddings
    from library.generation.generator import ImageGenerator
    from library.generation.run import AppliedLoRA, Run
    from library.host_memory import keep_freed_memory_in_process
    from library.models.loading import load_model, peek_family
    from library.networks.lora import attach_lora_files, bundled_embeddings, read_lora_file
    from library.runtime import vae_dtype
    from library.text.sdxl_conditioning import refuse_clip_skip

    path = Path(settings.model.path)
    if settings.model.expect_sdxl or (path.exists() and peek_family(path) == "sdxl"):
        refuse_clip_skip(generation.clip_skip)  # before minutes of loading
    device, dtype = choose_device_and_dtype(device_settings.wanted_precision)
    # a file that is no LoRA shows before the model loads
    loras = [read_lora_file(path) for path in settings.networks.weights]
    bundled = [embedding for lora in loras for embedding in bundled_embeddings(lora)]
    if not inputs.interactive:  # else the prompts are yet to come
        warn_about_unused_words(embedding_words(inputs.textual_inversion_embeddings, bundled), prompt_list)
    # cast as it loads (fp32 keeps the file's exact fp16 weights); the VAE in fp32 with --no_half_vae
    vae_in = vae_dtype(dtype, device_settings.no_half_vae)
    model = load_model(settings.model, dtype, vae_in)
    embeddings = install_embeddings(model, inputs.textual_inversion_embeddings, bundled=bundled)
    networks = attach_lora_files(model, loras, settings.networks.multipliers, settings.networks.show_meta)
    for text_encoder in model.text_encoders:
        text_encoder.to(device)  # already in dtype; a cast would widen the half-stored weights
    prepare_modules(model, device_settings, device)
    generator = ImageGenerator(
        model,
        clip_skip=generation.clip_skip,
        max_embeddings_multiples=generation.max_embeddings_multiples,
        device=device,
        dtype=dtype,
        vae_dtype=vae_in,
        placeholder_vectors=embeddings,
        vae_batch_size=device_settings.vae_batch(generation.batch_size),
        progress_bar=True,
    )
    if device.type == "cpu":  # the load's temporaries are returned; the steps' activations are then reused
        keep_freed_memory_in_process()

    # the run
    applied = [
        AppliedLoRA(Path(lora.path).name, network, strength)
        for lora, network, strength in zip(loras, networks, settings.networks.multipliers)
    ]
    run = Run(generation, generator, model, embeddings, loras=applied)
    run.init_images, run.mask_images = init_images, mask_images
    written = run.run(prompt_list, inputs.interactive)
    logger.info("done: %d images in %s", len(written), generation.outdir)
    return 0


def prompts_of(inputs) -> list[str]:
    """``--from_file`` (one prompt a line, ``#`` starts a comment), else ``--prompt``."""
    if inputs.from_file is not None:
        prompts = read_prompt_file(inputs.from_file)
        logger.info("read %d prompts from %s", len(prompts), inputs.from_file)
        return prompts
    return [inputs.prompt] if inputs.prompt is not None else []


def warn_about_unused_words(words: list[str], prompts: list[str]) -> None:
    """An embedding whose word no prompt contains changes no image, and nothing else would say so."""
    from library.text.tokens import words_in_no_text

    for word in words_in_no_text(words, prompts):
        logger.warning(
            "the embedding word '%s' is in none of the prompts, so it changes no image; an embedding file's "
            "word is its file name: type that, or rename the file to the word you type",
            word,
        )


def choose_device_and_dtype(wanted_precision: str):
    """CUDA when there is one; ``--fp16``/``--bf16`` by the rule the trainer uses (library.runtime)."""
    import torch

    from library.runtime import torch_dtype, usable_precision

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = usable_precision(
        wanted_precision, f"--{wanted_precision}", on_gpu=device.type == "cuda", bf16_flag="--bf16"
    )
    return device, torch_dtype(precision)


def prepare_modules(model, device_settings, device) -> None:
    """Attention backend (xformers when asked for and usable, else SDPA), channels-last, VAE tiling."""
    import torch

    from library.runtime import use_attention

    xformers = device_settings.xformers or device_settings.diffusers_xformers
    flag = "--xformers" if device_settings.xformers else "--diffusers_xformers"
    chosen = use_attention([model.unet, model.vae], xformers=xformers, flag=flag, device=device)
    logger.info("using %s attention", "xformers" if chosen == "xformers" else "PyTorch SDPA")
    if device_settings.opt_channels_last:
        model.unet.to(memory_format=torch.channels_last)
        model.vae.to(memory_format=torch.channels_last)
    if device_settings.vae_slices is not None:
        model.vae.enable_tiling()
        logger.info(
            "--vae_slices %d: decoding with diffusers' VAE tiling (the image is split into tiles, not %d slices)",
            device_settings.vae_slices,
            device_settings.vae_slices,
        )


if __name__ == "__main__":
    run_cli(main)
