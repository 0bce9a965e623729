"""Train a Textual Inversion embedding for Stable Diffusion 1.x/2.x.

A kohya-ss/sd-scripts compatible command line (same options, dataset folders and TOML). The
algorithm, top to bottom:

1. the new word: add ``--num_vectors_per_token`` tokens to the tokenizer;
2. the data: images and captions in which the word appears;
3. the model: load it, freeze it, splice the new vectors (the only trained weights) into the
   text encoder's token lookup;
4. the optimizer and LR schedule over those vectors;
5. the loop: encode prompts, add noise, predict it with the UNet, step on the loss;
6. save embeddings every client loads (WebUI ``.pt``, kohya/ComfyUI ``.safetensors``).

Run with ``accelerate launch train_textual_inversion.py ...`` or plain ``python``.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

import torch
from tqdm import tqdm

from library.embeddings.formats import load_embedding_file, sai_model_spec_metadata
from library.errors import UserError, run_cli
from library.files import ensure_writable_folder, remove_interrupted_saves
from library.host_memory import hand_back_freed_memory, keep_freed_memory_in_process
from library.models.loading import load_sd_model, load_sd_vae
from library.runtime import log_level, setup_console_logging, torch_dtype, use_attention
from library.text.encoding import drop_unused_layers
from library.text.tokenizer import load_tokenizer, set_family_padding
from library.training.accelerator import (
    freeze_and_move,
    make_accelerator,
    resolve_mixed_precision,
)
from library.training.args import check_training_arguments, parse_args, refuse_unsupported, run_settings
from library.training.cadence import RunLength, SaveCadence
from library.training.checks import (
    FiniteGuard,
    warn_if_resume_is_done,
)
from library.training.dataset import TokenCaptionRule, build_train_dataset, make_train_dataloader
from library.training.events import RunEvents
from library.training.new_word import (
    add_placeholder_tokens,
    init_word_vectors,
    random_vectors,
    rescale_to_norms,
    splice_new_vectors,
)
from library.training.noise import make_training_schedule
from library.training.optimizers import (
    create_lr_scheduler,
    create_optimizer,
    optimizer_eval_mode,
    optimizer_train_mode,
)
from library.training.samples import SampleSchedule, sample_images
from library.training.state import Progress, RunSaver, load_training_state, saved_seed
from library.training.step import DiffusionLoss
from library.training.tracking import TrainLogger
from library.training.validation import ValidationRun, Validator, validation_timesteps

logger = logging.getLogger("train_textual_inversion")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    setup_console_logging(log_level(args.console_log_level), args.console_log_file, args.console_log_simple)
    refuse_unsupported(args)
    check_training_arguments(args)
    settings = run_settings(args)
    settings.noise.warn_about_unused(args.v_parameterization)
    settings.loss.warn_about_unused()
    mixed_precision = resolve_mixed_precision(args.mixed_precision, args.full_fp16, args.full_bf16)
    accelerator = make_accelerator(settings.tracking, mixed_precision, args.gradient_accumulation_steps,
                                   args.ddp_timeout)  # fmt: skip
    if not accelerator.is_local_main_process and log_level(args.console_log_level) > logging.DEBUG:
        logging.getLogger().setLevel(logging.WARNING)  # one copy of the progress messages
    device = accelerator.device
    seed = run_seed(args)
    output_dir = Path(args.output_dir or "debug_dataset")
    output_name = args.output_name or args.token_string  # kohya: files are named after the word
    check_output_folders(args, output_dir, accelerator.is_main_process)

    # 1. The new word: token_string, token_string1, ... in the tokenizer.
    model_path = Path(args.pretrained_model_name_or_path)
    tokenizer = load_tokenizer(args.v2, model_dir=model_path if model_path.is_dir() else None,
                               tokenizer_cache_dir=args.tokenizer_cache_dir)  # fmt: skip
    num_vectors = len(add_placeholder_tokens(tokenizer, args.token_string, args.num_vectors_per_token))

    # 2. The data. Checked before the model loads, so a mistake costs seconds, not minutes.
    template = "object" if args.use_object_template else "style" if args.use_style_template else None
    dataset = build_train_dataset(
        settings.data, tokenizer, TokenCaptionRule(args.token_string, num_vectors, template), seed
    )
    dataset.verify_token_in_captions()
    if args.debug_dataset:
        dataset.debug_dataset(output_dir)
        return
    k = args.gradient_accumulation_steps
    length = RunLength.plan(
        len(dataset), accelerator.num_processes, k, args.max_train_steps, args.max_train_epochs
    )
    dataset.set_run_length(length.max_train_steps, length.steps_per_epoch, k, accelerator.num_processes)

    # 3. The model, frozen and cast as it loads, with the new vectors spliced into its token lookup.
    #    Frozen fp32 layers keep the file's exact fp16 weights and widen them as they run (the same
    #    numbers in half the memory), unless --highvram asks for speed or torch.compile traces them.
    #    When every batch will come from cached latents and nothing renders samples, the VAE is read
    #    alone first, encodes the images and is freed: it never shares memory with the UNet.
    weight_dtype = torch_dtype(mixed_precision)
    vae_dtype = torch.float32 if args.no_half_vae else weight_dtype
    caching = args.cache_latents or args.cache_latents_to_disk
    vae_only_for_caching = caching and not settings.sampling.sample_prompts
    if vae_only_for_caching:
        latent_scale = cache_latents_with_vae_alone(dataset, args, accelerator, vae_dtype)
    model = load_sd_model(args.pretrained_model_name_or_path, v2=args.v2, v_parameterization=args.v_parameterization,
                          vae=args.vae, tokenizer_cache_dir=args.tokenizer_cache_dir, dtype=weight_dtype,
                          vae_dtype=vae_dtype, with_vae=not vae_only_for_caching,
                          exact_half_storage=not (args.highvram or args.torch_compile))  # fmt: skip
    set_family_padding(tokenizer, model.family)
    text_encoder, unet, vae = model.text_encoder, model.unet, model.vae
    if vae is not None:
        latent_scale = vae.config.scaling_factor
    token_table = text_encoder.get_input_embeddings().weight.detach()
    vectors = initial_vectors(args, tokenizer, token_table, num_vectors, seed, model.family)
    freeze_and_move(model, device)
    new_rows = splice_new_vectors(text_encoder, vectors.to(device))
    clip_skip = drop_unused_layers(text_encoder, args.clip_skip)  # the layers past --clip_skip never run
    unet = configure_for_training(unet, text_encoder, args, device)
    if caching and not vae_only_for_caching:  # the VAE stays: samples are decoded with it
        cache_latents(dataset, vae, args, accelerator, vae_dtype)

    # 4. The optimizer and LR schedule see only the new vectors; the schedule runs over the real steps.
    optimizer_name, optimizer_args, optimizer = create_optimizer([new_rows.vectors], settings.optimizer)
    lr_scheduler = create_lr_scheduler(optimizer, settings.optimizer, length.max_train_steps)
    optimizer = accelerator.prepare_optimizer(optimizer)  # fp16 loss scaling on CUDA
    loader = accelerator.prepare_data_loader(
        make_train_dataloader(dataset, settings.data), device_placement=True
    )
    progress = Progress(seed=seed)
    if args.resume:
        progress = load_training_state(Path(args.resume), new_rows.vectors, optimizer, lr_scheduler)
        logger.info(
            "resumed from %s at step %d (epoch %d)", args.resume, progress.global_step, progress.epoch + 1
        )
        warn_if_resume_is_done(progress.global_step, length.max_train_steps)

    diffusion_loss = DiffusionLoss(
        text_encoder, tokenizer, unet, vae, latent_scale, make_training_schedule(args.v_parameterization,
        settings.noise.zero_terminal_snr, device), settings.noise, settings.loss, clip_skip, args.v_parameterization,
        weight_dtype, vae_dtype, seed, accelerator.autocast,
    )  # fmt: skip
    events = make_run_events(
        args, settings, accelerator, length, progress, new_rows.vectors, optimizer, lr_scheduler,
        (optimizer_name, optimizer_args), model, tokenizer, dataset, diffusion_loss, output_dir, output_name,
        clip_skip, weight_dtype, seed,
    )  # fmt: skip
    start_norms = events.start_vectors.norm(dim=1)  # what --preserve_embedding_norm holds each vector to

    logger.info(
        "training %d vectors of dimension %d for %d steps (%d epochs, %d steps each) on %s x%d process(es), %s",
        num_vectors, vectors.shape[1], length.max_train_steps, length.num_epochs, length.steps_per_epoch, device,
        accelerator.num_processes, mixed_precision,
    )  # fmt: skip
    if args.sample_at_first and progress.global_step == 0:
        events.render_samples(0)

    # 5. The loop: an optimizer step every k batches (and at an epoch's end), until the run is finished.
    if device.type == "cpu":  # the load's temporaries are returned; the steps' activations are then reused
        keep_freed_memory_in_process()
    optimizer_train_mode(optimizer)
    with tqdm(total=length.max_train_steps, initial=progress.global_step, desc="steps", smoothing=0.1,
              disable=not accelerator.is_local_main_process) as bar:  # fmt: skip
        while not events.finished:
            for batch in epoch_batches(accelerator, loader, progress):
                logger.debug("step %d, epoch %d: %s", progress.global_step, progress.epoch, batch["keys"])
                with accelerator.accumulate():
                    micro_step = progress.batches_done_in_epoch % k
                    loss = diffusion_loss(batch, progress.global_step, micro_step, accelerator.process_index)
                    accelerator.backward(loss)  # divided by k by accelerate
                progress.batches_done_in_epoch += 1
                if not accelerator.sync_gradients:
                    continue

                # one optimizer step on the gradient averaged over processes
                events.guard.before_step(new_rows.vectors)
                new_rows.vectors.grad = accelerator.reduce(new_rows.vectors.grad, reduction="mean")
                if args.max_grad_norm:
                    accelerator.clip_grad_norm_([new_rows.vectors], args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                if args.preserve_embedding_norm:
                    rescale_to_norms(new_rows.vectors, start_norms)
                progress.global_step += 1
                bar.update(1)
                events.after_step(loss, bar)  # checks, logs, saves, samples, validation
                if events.finished:
                    break
            events.after_epoch()

    # 6. Save the final embedding (and state), named after --output_name.
    events.finish(with_state=args.save_state or args.save_state_on_train_end)
    accelerator.end_training()


# ---------------------------------------------------------------------------------------------
# small helpers of the steps above


def initial_vectors(
    args, tokenizer, token_table: torch.Tensor, num_vectors: int, seed: int, family: str
) -> torch.Tensor:
    """``--weights`` (continue), else ``--init_word``, else random vectors with the vocabulary's norm."""
    if args.weights:
        loaded = load_embedding_file(args.weights)
        if loaded.vectors.shape[1] != token_table.shape[1]:
            raise UserError(
                f"--weights {args.weights}: vectors of dimension {loaded.vectors.shape[1]}, but this "
                f"{family.upper()} model's text encoder uses {token_table.shape[1]}"
            )
        if loaded.vectors.shape[0] != num_vectors:
            raise UserError(
                f"--weights {args.weights}: {loaded.vectors.shape[0]} vectors, but --num_vectors_per_token is "
                f"{num_vectors}; use --num_vectors_per_token {loaded.vectors.shape[0]}"
            )
        return loaded.vectors.float()
    if args.init_word:
        return init_word_vectors(tokenizer, token_table, args.init_word, num_vectors, args.init_word_mode)
    logger.info("no --init_word: starting from random vectors with the vocabulary's mean norm")
    return random_vectors(token_table, num_vectors, seed)


def run_seed(args) -> int:
    """``--seed``, the resumed run's seed, or a fresh one (a resumed run keeps its own)."""
    if args.resume:
        saved = saved_seed(Path(args.resume))
        if args.seed is not None and args.seed != saved:
            logger.warning(
                "--seed %d differs from the resumed run's seed %d; using %d", args.seed, saved, saved
            )
        return saved
    return args.seed if args.seed is not None else random.randint(0, 2**31 - 1)


def configure_for_training(unet, text_encoder, args, device):
    """Attention backend, gradient checkpointing and ``torch.compile`` as the options ask; returns the UNet."""
    use_attention([unet], xformers=args.xformers, flag="--xformers", device=device)
    if args.gradient_checkpointing:  # diffusers and transformers only checkpoint in training mode
        unet.enable_gradient_checkpointing()
        unet.train()  # neither model has dropout
        text_encoder.gradient_checkpointing_enable()
        text_encoder.train()
    if args.torch_compile:
        unet = torch.compile(unet, backend=args.dynamo_backend)
    return unet


def cache_latents(dataset, vae, args, accelerator, vae_dtype) -> None:
    """Encode every training (and held-out) image once; each process takes its share, all wait."""
    with torch.no_grad():
        for part in (dataset, dataset.validation) if dataset.validation else (dataset,):
            part.cache_latents(vae, args.vae_batch_size, args.cache_latents_to_disk, accelerator.device, vae_dtype,
                               accelerator.process_index, accelerator.num_processes)  # fmt: skip
    accelerator.wait_for_everyone()


def cache_latents_with_vae_alone(dataset, args, accelerator, vae_dtype) -> float:
    """Read only the VAE, cache every image's latents with it, free it; returns its latent scale.

    Called before the text encoder and the UNet are read, so the peak memory of loading is the
    larger of the two, not their sum (on CPU the VAE's freed memory is handed back at once).
    """
    vae = load_sd_vae(args.pretrained_model_name_or_path, args.vae, vae_dtype)
    vae.requires_grad_(False).to(accelerator.device)
    cache_latents(dataset, vae, args, accelerator, vae_dtype)
    latent_scale = vae.config.scaling_factor
    del vae
    hand_back_freed_memory()
    return latent_scale


def make_run_events(
    args, settings, accelerator, length: RunLength, progress: Progress, vectors, optimizer, lr_scheduler,
    optimizer_label: tuple[str, str], model, tokenizer, dataset, diffusion_loss, output_dir: Path, output_name: str,
    clip_skip: int | None, weight_dtype: torch.dtype, seed: int,
) -> RunEvents:  # fmt: skip
    """What happens around the optimizer steps: the NaN guard, logs, saves, samples and validation."""
    saves = SaveCadence(args.save_every_n_steps, save_every_n_epochs(args, length.num_epochs), args.save_last_n_steps,
                        args.save_last_n_epochs, args.save_last_n_steps_state, args.save_last_n_epochs_state,
                        length.num_epochs)  # fmt: skip
    saver = RunSaver(accelerator, output_dir, output_name, args.save_model_as or "pt", saves, args.save_state,
                     vectors, optimizer, lr_scheduler, progress, lambda: embedding_metadata(args, model, dataset,
                     output_name), SAVE_DTYPES[args.save_precision], model.name)  # fmt: skip
    saver.warn_if_final_exists()
    guard = FiniteGuard(vectors, lambda label, v, step: saver.embedding(f"{output_name}-{label}.{saver.extension}",
                                                                        v, step))  # fmt: skip
    tracker = TrainLogger(accelerator, settings.tracking, vars(args), *optimizer_label)
    samples = SampleSchedule.from_settings(settings.sampling, vectors.shape[0])

    def render_samples(epoch: int | None) -> None:
        optimizer_eval_mode(optimizer)
        sample_images(accelerator, samples, model, tokenizer, output_dir, output_name, step=progress.global_step,
                      epoch=epoch, weight_dtype=weight_dtype, token_string=args.token_string, clip_skip=clip_skip,
                      max_token_length=args.max_token_length)  # fmt: skip
        optimizer_train_mode(optimizer)

    validation_seed = seed if args.validation_seed is None else args.validation_seed
    validation = make_validation(
        settings, dataset, diffusion_loss, progress, saver, tracker, validation_seed, length
    )
    return RunEvents(accelerator, progress, length, vectors, optimizer, lr_scheduler, guard, tracker, saver, saves,
                     samples, render_samples, validation, settings.validation, vectors.detach().clone())  # fmt: skip


def make_validation(
    settings, dataset, diffusion_loss, progress, saver, tracker, seed: int, length: RunLength
) -> ValidationRun | None:
    """The validation loss on held-out images, else on a fixed training batch, when one is wanted."""
    options = settings.validation
    if not options.wanted(held_out=dataset.validation is not None):
        return None
    if options.every_n_steps:
        evaluations = length.max_train_steps // options.every_n_steps
    else:
        evaluations = length.num_epochs // (options.validate_every_n_epochs or 1)
    if options.early_stopping and options.early_stopping_window > evaluations:
        logger.warning(
            "--early_stopping: the window of %d validation values is longer than this run's %d evaluations, so it "
            "cannot stop early; lower --early_stopping_window", options.early_stopping_window, evaluations,
        )  # fmt: skip
    held_out = dataset.validation is not None
    source = dataset.validation if held_out else dataset
    batches = source.fixed_batches(options.max_validation_steps or (None if held_out else 1))
    noise = settings.noise
    logger.info("validation: %d %s batch(es), timesteps %s", len(batches), "held-out" if held_out else "fixed training",
                validation_timesteps(noise.min_timestep, noise.max_timestep))  # fmt: skip
    validator = Validator(
        batches, diffusion_loss, seed, validation_timesteps(noise.min_timestep, noise.max_timestep)
    )

    def save_best(step: int, loss: float) -> None:
        saver.embedding(f"{saver.name}-best.{saver.extension}", step=step,
                        extra_metadata={"ti_trainer.step": str(step), "ti_trainer.validation_loss": f"{loss:.6g}"})  # fmt: skip

    return ValidationRun(validator, options, progress, save_best, tracker.log_validation)


def check_output_folders(args, output_dir: Path, main_process: bool) -> None:
    """Writable output and log folders before anything loads; leftovers of a killed save removed."""
    ensure_writable_folder(output_dir, "--output_dir" if args.output_dir else "--debug_dataset")
    if args.logging_dir:
        ensure_writable_folder(Path(args.logging_dir), "--logging_dir")
    if main_process:
        remove_interrupted_saves(output_dir)


def epoch_batches(accelerator, loader, progress: Progress):
    """The current epoch's batches, after the ones a resumed run already used.

    accelerate's loader hands its own epoch counter to ``dataset.set_epoch`` when iterated, so the
    epoch (which decides the batch order) is set through the loader that is iterated.
    """
    skip = progress.batches_done_in_epoch  # > 0 only right after --resume
    epoch_loader = accelerator.skip_first_batches(loader, skip) if skip else loader
    epoch_loader.set_epoch(progress.epoch)
    return epoch_loader


def save_every_n_epochs(args, num_epochs: int) -> int | None:
    """``--save_every_n_epochs``, or ``--save_n_epoch_ratio``: about that many saves in the whole run."""
    if args.save_n_epoch_ratio:
        return max(1, num_epochs // args.save_n_epoch_ratio)
    return args.save_every_n_epochs


SAVE_DTYPES = {None: torch.float32, "float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def embedding_metadata(args, model, dataset, output_name: str) -> dict[str, str]:
    """SAI model-spec metadata for ``.safetensors`` (kohya's keys), from the run and --metadata_*."""
    width, height = dataset.resolution
    extra = {name: getattr(args, f"metadata_{name}") for name in (
        "title", "author", "description", "license", "tags", "trigger_phrase", "usage_hint", "merged_from",
        "preprocessor", "thumbnail", "is_negative_embedding") if getattr(args, f"metadata_{name}")}  # fmt: skip
    timesteps = None
    if args.min_timestep is not None or args.max_timestep is not None:
        timesteps = (args.min_timestep or 0, 1000 if args.max_timestep is None else args.max_timestep)
    return sai_model_spec_metadata(
        v2=model.v2,
        v_parameterization=args.v_parameterization,
        resolution=(width, height),
        title=args.metadata_title or output_name,
        clip_skip=args.clip_skip,
        extra=extra,
        timesteps=timesteps,
    )


if __name__ == "__main__":
    run_cli(main)
