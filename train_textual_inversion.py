"""Train a Textual Inversion embedding for Stable Diffusion 1.x/2.x (SDXL: ``sdxl_train_textual_inversion.py``).

A kohya-ss/sd-scripts compatible command line (same options, dataset folders and TOML). The
algorithm, top to bottom:

1. the new word: add ``--num_vectors_per_token`` tokens to the tokenizer;
2. the data: images and captions in which the word appears;
3. the model: load it, freeze it, splice the new vectors (the only trained weights) into the
   text encoder's token lookup;
4. the optimizer and LR schedule over those vectors;
5. the loop: encode prompts, add noise, predict it with the UNet, step on the loss;
6. save embeddings every client loads (WebUI ``.pt``, kohya/ComfyUI ``.safetensors``).

With ``--network_module networks.lora`` a UNet LoRA trains beside the vectors (pivotal tuning,
``library.training.pivotal``) and is saved as ``name_lora.safetensors`` with the word bundled.

Run with ``accelerate launch train_textual_inversion.py ...`` or plain ``python``.
"""

from __future__ import annotations

from library.allocator import restart_under_installed_allocator
from library.errors import run_cli
from library.training.args import check_command_line

if __name__ == "__main__":  # first: the slow imports below wait for options that make sense,
    run_cli(lambda: check_command_line(sdxl=False))  # and a restart under tcmalloc would repeat them
    run_cli(restart_under_installed_allocator)

import logging
import random

import torch
from tqdm import tqdm

from library.host_memory import (
    hand_back_freed_memory,
    hand_back_what_the_step_freed,
    keep_freed_memory_in_process,
)
from library.models.loading import load_model, load_model_vae, load_tokenizers
from library.text.tokenizer import match_padding
from library.training.accelerator import (
    configure_for_training,
    freeze_and_move,
    make_accelerator,
    resolve_precision,
)
from library.training.args import RunSettings, settings_from_command_line
from library.training.cadence import RunLength
from library.training.dataset import TokenCaptionRule, build_train_dataset, make_train_dataloader
from library.training.dataset.latent_cache import LatentCaching
from library.training.events import RunEvents
from library.training.new_word import NewWord, add_placeholder_tokens
from library.training.optimizers import create_lr_scheduler, create_optimizer, optimizer_train_mode
from library.training.pivotal import UNetLoRA
from library.training.run import Run
from library.training.state import Progress, check_resume, prepare_output_folders, resume_or_start, saved_seed
from library.training.steering import VectorSteering
from library.training.step import DiffusionLoss
from library.training.tracking import TrainLogger

logger = logging.getLogger("train_textual_inversion")


def main(argv: list[str] | None = None, sdxl: bool = False) -> None:
    """``sdxl``: the SDXL trainer (``sdxl_train_textual_inversion.py``); the steps are the same."""
    settings = settings_from_command_line(argv, sdxl)  # every mistake the options show ends here, in one line
    precision = resolve_precision(settings.compute)
    k = settings.loop.gradient_accumulation_steps
    accelerator = make_accelerator(settings.tracking, precision, k, settings.compute)
    if not accelerator.is_local_main_process and logger.getEffectiveLevel() > logging.DEBUG:
        logging.getLogger().setLevel(logging.WARNING)  # one copy of the progress messages
    device = accelerator.device
    seed = run_seed(settings)
    prepare_output_folders(settings.saving, settings.tracking, accelerator.is_main_process)

    # 1. The new word: token_string, token_string1, ... in the tokenizer(s).
    token_string = settings.word.token_string
    tokenizers = load_tokenizers(settings.model)
    num_vectors = len(add_placeholder_tokens(tokenizers, token_string, settings.word.num_vectors_per_token))

    # 2. The data. Checked before the model loads, so a mistake costs seconds, not minutes.
    caption_rule = TokenCaptionRule(token_string, num_vectors, settings.word.template)
    dataset = build_train_dataset(settings.data, tokenizers[0], caption_rule, seed)
    dataset.verify_token_in_captions()
    if settings.data.debug_dataset:
        dataset.debug_dataset(settings.saving.folder)
        return
    length = RunLength.for_loop(settings.loop, len(dataset), accelerator.num_processes)
    dataset.set_run_length(length.max_train_steps, length.steps_per_epoch, k, accelerator.num_processes)

    # 3. The model, frozen and cast as it loads, with the new vectors spliced into its token lookup.
    #    Frozen fp32 layers keep the file's exact fp16 weights and widen them as they run (the same
    #    numbers in half the memory), unless --highvram asks for speed or torch.compile traces them.
    #    When every batch will come from cached latents and nothing renders samples, the VAE is read
    #    alone first, encodes the images and is freed: it never shares memory with the UNet.
    caching = settings.data.cache_latents or settings.data.cache_latents_to_disk
    vae_alone = caching and not settings.sampling.sample_prompts
    if vae_alone:
        latent_scale = cache_latents_with_vae_alone(dataset, settings, accelerator, precision.vae_dtype)
    model = load_model(settings.model, precision.weight_dtype, precision.vae_dtype, with_vae=not vae_alone)
    match_padding(tokenizers, model.tokenizers)  # a file that is SD 2.x after all pads with "!"
    if model.vae is not None:
        latent_scale = model.vae.config.scaling_factor
    freeze_and_move(model, device)
    word = NewWord.start(model, tokenizers[0], settings.word, num_vectors, seed)
    start_vectors = word.snapshot()  # before a resume replaces them: what --init_pull pulls toward
    text = model.text_conditioner(
        tokenizers, clip_skip=settings.loop.clip_skip, max_token_length=settings.data.max_token_length
    )
    text.drop_unused_layers()  # the layers past --clip_skip never run
    lora = UNetLoRA.for_run(model, settings.lora, length.max_train_steps, device, seed)  # --network_module
    model.unet = configure_for_training(model.unet, model.text_encoders, settings.compute, device)
    if caching and not vae_alone:  # the VAE stays: samples are decoded with it
        cache_latents(dataset, model.vae, settings, accelerator)

    # 4. The optimizer and LR schedule see only the new vectors (and the LoRA, at --unet_lr); the
    #    schedule runs over the real steps.
    trained = [word.parameters] + ([lora.parameters] if lora else [])  # each clipped on its own
    groups = word.parameters if lora is None else [{"params": word.parameters}, lora.param_group()]
    optimizer_name, _, optimizer = create_optimizer(groups, settings.optimizer)
    scheduler = create_lr_scheduler(optimizer, settings.optimizer, length.max_train_steps)
    optimizer = accelerator.prepare_optimizer(optimizer)  # fp16 loss scaling on CUDA
    loader = accelerator.prepare_data_loader(
        make_train_dataloader(dataset, settings.data), device_placement=True
    )
    progress = resume_or_start(
        settings, word, optimizer, scheduler, seed, length, lora=lora.network if lora else None
    )
    run = Run(
        settings=settings,
        accelerator=accelerator,
        precision=precision,
        model=model,
        text=text,
        word=word,
        dataset=dataset,
        length=length,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        progress=progress,
        lora=lora,
    )
    steering = VectorSteering.for_run(
        settings.steering, start_vectors, run.start_norms, word.vocabulary_norms()
    )
    if progress.global_step == 0:
        steering.place(word.vectors)  # --direction_only starts on its sphere
    diffusion_loss = DiffusionLoss.build(run, latent_scale)
    events = RunEvents(run, diffusion_loss, TrainLogger.for_run(run, optimizer_name))
    logger.info("training %s", run.describe())
    if settings.sampling.sample_at_first and progress.global_step == 0:
        events.render_samples(0)

    # 5. The loop: an optimizer step every k batches (and at an epoch's end), until the run is finished.
    # On a CPU the load's temporaries go back to the kernel, then each step reuses what it frees;
    # unless --highvram asks for speed, what a step freed goes back too, so that the steps'
    # slightly different layouts do not add up (library/host_memory.py).
    heap_tuned = device.type == "cpu" and keep_freed_memory_in_process()
    hand_back_after_steps = heap_tuned and not settings.model.highvram
    optimizer_train_mode(optimizer)
    with progress_bar(run) as bar:
        while not events.finished:
            for batch in epoch_batches(accelerator, loader, progress):
                logger.debug("step %d, epoch %d: %s", progress.global_step, progress.epoch, batch["keys"])
                if lora:  # --train_vectors_fraction: past the pivot only the LoRA learns
                    word.set_trainable(lora.trains_vectors(progress.global_step))
                with accelerator.accumulate():
                    micro_step = progress.batches_done_in_epoch % k
                    loss = diffusion_loss(batch, progress.global_step, micro_step, accelerator.process_index)
                    accelerator.backward(loss)  # divided by k by accelerate
                progress.batches_done_in_epoch += 1
                if not accelerator.sync_gradients:
                    continue

                # one optimizer step on the gradient averaged over processes, clipped over every
                # encoder's rows (kohya's SDXL trainer clips only the last encoder's), the LoRA apart
                events.guard.before_step(word.vectors)
                for weights in (w for group in trained for w in group if w.grad is not None):
                    weights.grad = accelerator.reduce(weights.grad, reduction="mean")
                steering.before_step(word.vectors)  # --init_pull, --direction_only
                if settings.optimizer.max_grad_norm:
                    for group in trained:
                        accelerator.clip_grad_norm_(group, settings.optimizer.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                steering.after_step(word.vectors)  # --preserve_embedding_norm, --direction_only
                progress.global_step += 1
                bar.update(1)
                events.after_step(loss, bar)  # checks, logs, saves, samples, validation
                if hand_back_after_steps:
                    hand_back_what_the_step_freed()
                if events.finished:
                    break
            events.after_epoch()

    # 6. Save the final embedding (and state), named after --output_name.
    events.finish()
    accelerator.end_training()


# ---------------------------------------------------------------------------------------------
# small helpers of the steps above


def run_seed(settings: RunSettings) -> int:
    """``--seed``, the resumed run's seed, or a fresh one (a resumed run keeps its own)."""
    wanted, resume = settings.loop.seed, settings.saving.resume
    if resume:
        check_resume(resume, settings.optimizer, with_lora=settings.lora.enabled)
        saved = saved_seed(resume)
        if wanted is not None and wanted != saved:
            logger.warning("--seed %d differs from the resumed run's seed %d; using %d", wanted, saved, saved)
        return saved
    return wanted if wanted is not None else random.randint(0, 2**31 - 1)


def cache_latents(dataset, vae, settings: RunSettings, accelerator) -> None:
    """Encode every training (and held-out) image once; each process takes its share, all wait."""
    caching = LatentCaching.for_run(settings.data, accelerator.process_index, accelerator.num_processes)
    with torch.no_grad():
        for part in (dataset, dataset.validation) if dataset.validation else (dataset,):
            part.cache_latents(vae, caching)
    accelerator.wait_for_everyone()


def cache_latents_with_vae_alone(
    dataset, settings: RunSettings, accelerator, vae_dtype: torch.dtype
) -> float:
    """Read only the VAE, cache every image's latents with it, free it; returns its latent scale.

    Called before the text encoder and the UNet are read, so the peak memory of loading is the
    larger of the two, not their sum (on CPU the VAE's freed memory is handed back at once).
    """
    vae = load_model_vae(settings.model, vae_dtype)
    vae.requires_grad_(False).to(accelerator.device)
    cache_latents(dataset, vae, settings, accelerator)
    latent_scale = vae.config.scaling_factor
    del vae
    hand_back_freed_memory()
    return latent_scale


def progress_bar(run: Run) -> tqdm:
    """Steps done of the run, on the main process only."""
    return tqdm(
        total=run.length.max_train_steps,
        initial=run.progress.global_step,
        desc="steps",
        smoothing=0.1,
        disable=not run.accelerator.is_local_main_process,
    )


def epoch_batches(accelerator, loader, progress: Progress):
    """The current epoch's batches, after the ones a resumed run already used.

    accelerate's loader hands its own epoch counter to ``dataset.set_epoch`` when iterated, so the
    epoch (which decides the batch order) is set through the loader that is iterated.
    """
    skip = progress.batches_done_in_epoch  # > 0 only right after --resume
    epoch_loader = accelerator.skip_first_batches(loader, skip) if skip else loader
    epoch_loader.set_epoch(progress.epoch)
    return epoch_loader


if __name__ == "__main__":
    run_cli(main)
