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
import math
import random
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from library.dataset import TokenCaptionRule, build_train_dataset, make_train_dataloader
from library.embeddings import load_embedding_file, sai_model_spec_metadata, save_embedding
from library.errors import UserError, run_cli
from library.host_memory import keep_freed_memory_in_process
from library.loss import LossSettings, check_loss_arguments, compute_loss
from library.models import load_sd_model
from library.noise import (
    NoiseSettings,
    check_noise_arguments,
    make_training_schedule,
    sample_noise_and_timesteps,
)
from library.noise import training_target as noise_target
from library.optimizers import (
    create_lr_scheduler,
    create_optimizer,
    optimizer_eval_mode,
    optimizer_train_mode,
)
from library.placeholder_embedding import (
    add_placeholder_tokens,
    init_word_vectors,
    random_vectors,
    splice_new_vectors,
)
from library.text_encoding import encode_prompts
from library.tokenizer import load_tokenizer, set_family_padding
from library.train_args import log_level, parse_args, refuse_unsupported
from library.train_checks import check_finite, check_training_arguments, warn_if_vectors_frozen
from library.train_logging import TrainLogger, setup_console_logging
from library.train_sampling import SampleSchedule, sample_images
from library.train_state import (
    Progress,
    embedding_file_name,
    load_training_state,
    remove_old_saves,
    save_training_state,
    saved_seed,
    state_folder_name,
)
from library.training_setup import (
    DTYPES,
    configure_attention,
    freeze_and_cast,
    make_accelerator,
    resolve_mixed_precision,
)

logger = logging.getLogger("train_textual_inversion")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    setup_console_logging(log_level(args), args.console_log_file, args.console_log_simple)
    refuse_unsupported(args)
    check_training_arguments(args)
    check_noise_arguments(args)
    check_loss_arguments(args)
    mixed_precision = resolve_mixed_precision(args)
    accelerator = make_accelerator(args, mixed_precision)
    if not accelerator.is_local_main_process and log_level(args) > logging.DEBUG:
        logging.getLogger().setLevel(logging.WARNING)  # one copy of the progress messages
    device = accelerator.device
    if device.type == "cpu":
        keep_freed_memory_in_process()  # reuse freed activations instead of faulting them in each step
    seed = run_seed(args)
    output_dir = Path(args.output_dir or "debug_dataset")
    output_name = args.output_name or "last"

    # 1. The new word: token_string, token_string1, ... in the tokenizer.
    model_path = Path(args.pretrained_model_name_or_path)
    tokenizer = load_tokenizer(args.v2, model_dir=model_path if model_path.is_dir() else None,
                               tokenizer_cache_dir=args.tokenizer_cache_dir)  # fmt: skip
    token_ids = add_placeholder_tokens(tokenizer, args.token_string, args.num_vectors_per_token)
    num_vectors = len(token_ids)

    # 2. The data. Checked before the model loads, so a mistake costs seconds, not minutes.
    template = "object" if args.use_object_template else "style" if args.use_style_template else None
    dataset = build_train_dataset(
        args, tokenizer, TokenCaptionRule(args.token_string, num_vectors, template), seed
    )
    dataset.verify_token_in_captions()
    if args.debug_dataset:
        dataset.debug_dataset(output_dir)
        return
    batches_per_epoch = math.ceil(len(dataset) / accelerator.num_processes)
    steps_per_epoch = math.ceil(batches_per_epoch / args.gradient_accumulation_steps)
    if steps_per_epoch == 0:
        raise UserError(
            f"no training batches: {dataset.num_train_images} images with --train_batch_size "
            f"{args.train_batch_size}; add images, raise repeats or lower the batch size"
        )
    max_train_steps = args.max_train_steps
    if args.max_train_epochs is not None:
        max_train_steps = args.max_train_epochs * steps_per_epoch
    num_epochs = math.ceil(max_train_steps / steps_per_epoch)
    dataset.set_max_train_steps(max_train_steps, args.gradient_accumulation_steps * accelerator.num_processes)
    save_every_n_epochs = args.save_every_n_epochs
    if args.save_n_epoch_ratio:
        save_every_n_epochs = max(1, num_epochs // args.save_n_epoch_ratio)

    # 3. The model, frozen, with the new vectors spliced into its token lookup.
    model = load_sd_model(args.pretrained_model_name_or_path, v2=args.v2, v_parameterization=args.v_parameterization,
                          vae=args.vae, tokenizer_cache_dir=args.tokenizer_cache_dir)  # fmt: skip
    set_family_padding(tokenizer, model.family)
    text_encoder, unet, vae = model.text_encoder, model.unet, model.vae
    token_table = text_encoder.get_input_embeddings().weight.detach()
    vectors = initial_vectors(args, tokenizer, token_table, num_vectors, seed, model.family)
    weight_dtype = DTYPES[mixed_precision]
    vae_dtype = torch.float32 if args.no_half_vae else weight_dtype
    freeze_and_cast(model, weight_dtype, vae_dtype, device)
    new_rows = splice_new_vectors(text_encoder, vectors.to(device))
    configure_attention(unet, args, device)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        unet.train()  # diffusers only checkpoints in training mode; the UNet has no dropout
        text_encoder.gradient_checkpointing_enable()
        text_encoder.train()
    if args.torch_compile:
        unet = torch.compile(unet, backend=args.dynamo_backend)
    if args.cache_latents or args.cache_latents_to_disk:
        with torch.no_grad():
            dataset.cache_latents(vae, args.vae_batch_size, args.cache_latents_to_disk, device, vae_dtype,
                                  accelerator.process_index, accelerator.num_processes)  # fmt: skip
        accelerator.wait_for_everyone()

    # 4. The optimizer and LR schedule see only the new vectors.
    optimizer_name, optimizer_args, optimizer = create_optimizer([new_rows.vectors], args)
    lr_scheduler = create_lr_scheduler(optimizer, args, max_train_steps, accelerator.num_processes)
    optimizer = accelerator.prepare_optimizer(optimizer)  # fp16 loss scaling on CUDA
    loader = accelerator.prepare_data_loader(make_train_dataloader(dataset, args), device_placement=True)
    progress = Progress(seed=seed)
    if args.resume:
        progress = load_training_state(Path(args.resume), new_rows.vectors, optimizer, lr_scheduler)
        logger.info(
            "resumed from %s at step %d (epoch %d)", args.resume, progress.global_step, progress.epoch + 1
        )

    schedule = make_training_schedule(args.v_parameterization, args.zero_terminal_snr, device)
    noise_settings, loss_settings = NoiseSettings.from_args(args), LossSettings.from_args(args)
    samples = SampleSchedule.from_args(args, num_vectors)
    tracker = TrainLogger(accelerator, args, optimizer_name, optimizer_args)
    start_vectors = new_rows.vectors.detach().clone()
    last_good = start_vectors.clone()

    def save_embedding_file(name: str, step: int) -> None:
        if accelerator.is_main_process:
            path = output_dir / name
            save_embedding(path, new_rows.vectors.detach().float().cpu(), output_name, step=step,
                           checkpoint_name=model.name, metadata=embedding_metadata(args, model, output_name),
                           dtype=save_dtype(args.save_precision))  # fmt: skip
            logger.info("saved %s", path)

    def save_state(folder_name: str) -> None:
        if accelerator.is_main_process:
            optimizer_eval_mode(optimizer)
            save_training_state(output_dir / folder_name, new_rows.vectors, optimizer, lr_scheduler, progress)
            optimizer_train_mode(optimizer)
        accelerator.wait_for_everyone()

    def save_intermediate(*, step: int | None = None, epoch: int | None = None) -> None:
        """A numbered embedding (and state) during the run; older ones rotate out per --save_last_n_*."""
        by = "step" if step is not None else "epoch"
        keep = args.save_last_n_steps if step is not None else args.save_last_n_epochs
        keep_state = args.save_last_n_steps_state if step is not None else args.save_last_n_epochs_state
        save_embedding_file(embedding_file_name(output_name, extension(args), step=step, epoch=epoch),
                            progress.global_step)  # fmt: skip
        remove_old_saves(output_dir, output_name, keep, by=by, state=False)
        if args.save_state:
            save_state(state_folder_name(output_name, step=step, epoch=epoch))
            remove_old_saves(output_dir, output_name, keep_state, by=by, state=True)

    def render_samples(epoch: int | None) -> None:
        optimizer_eval_mode(optimizer)
        sample_images(accelerator, args, samples, model, tokenizer, output_dir, output_name,
                      step=progress.global_step, epoch=epoch, weight_dtype=weight_dtype)  # fmt: skip
        optimizer_train_mode(optimizer)

    output_dir.mkdir(parents=True, exist_ok=True)
    logger.info(
        "training %d vectors of dimension %d for %d steps (%d epochs, %d steps each) on %s x%d process(es), %s",
        num_vectors, vectors.shape[1], max_train_steps, num_epochs, steps_per_epoch, device,
        accelerator.num_processes, mixed_precision,
    )  # fmt: skip
    if args.sample_at_first and progress.global_step == 0:
        render_samples(epoch=0)

    # 5. The loop.
    bar = tqdm(total=max_train_steps, initial=progress.global_step, desc="steps",
               disable=not accelerator.is_local_main_process, smoothing=0.1)  # fmt: skip
    optimizer_train_mode(optimizer)
    micro_step = 0  # micro-batches into the current optimizer step (gradient accumulation)
    while progress.global_step < max_train_steps:
        # accelerate's loader hands its own epoch counter to dataset.set_epoch when iterated, so the
        # epoch (which decides the batch order) is set through the loader we iterate
        skip = progress.batches_done_in_epoch  # > 0 only right after --resume
        epoch_loader = accelerator.skip_first_batches(loader, skip) if skip else loader
        epoch_loader.set_epoch(progress.epoch)
        for batch in epoch_loader:
            logger.debug("step %d, epoch %d: %s", progress.global_step, progress.epoch, batch["keys"])
            dataset.set_current_step(progress.global_step)
            generator = step_generator(
                seed, progress.global_step, micro_step, accelerator.process_index, device
            )
            with accelerator.autocast():
                latents = batch_latents(batch, vae, vae_dtype, weight_dtype, generator)
                hidden = encode_prompts(
                    text_encoder, tokenizer, batch["input_ids"].to(device), args.clip_skip
                )
                noisy, noise, timesteps = sample_noise_and_timesteps(
                    latents, schedule, noise_settings, generator
                )
                prediction = unet(noisy, timesteps, hidden.to(weight_dtype)).sample
            target = noise_target(schedule, latents, noise, timesteps, args.v_parameterization)
            loss = compute_loss(prediction, target, timesteps, schedule, loss_settings,
                                batch["loss_weights"], batch.get("alpha_masks"))  # fmt: skip
            accelerator.backward(loss / args.gradient_accumulation_steps)
            micro_step += 1
            progress.batches_done_in_epoch += 1
            if micro_step < args.gradient_accumulation_steps:
                continue
            micro_step = 0

            # one optimizer step: average the new rows' gradient over processes, clip, step
            if accelerator.num_processes > 1:
                new_rows.vectors.grad = accelerator.reduce(new_rows.vectors.grad, reduction="mean")
            if args.max_grad_norm:
                accelerator.clip_grad_norm_([new_rows.vectors], args.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            progress.global_step += 1
            bar.update(1)

            # every process checks the same (averaged) loss, so a NaN stops all of them together
            if accelerator.num_processes > 1:
                loss = accelerator.reduce(loss.detach(), reduction="mean")
            loss_value = check_finite(loss, new_rows.vectors, progress.global_step, last_good, output_dir,
                                      output_name, save_embedding_file)  # fmt: skip
            last_good.copy_(new_rows.vectors.detach())
            warn_if_vectors_frozen(progress.global_step, start_vectors, new_rows.vectors)
            tracker.log_step(progress.global_step, loss_value, lr_scheduler, new_rows.vectors, bar)

            step = progress.global_step
            if args.save_every_n_steps and step % args.save_every_n_steps == 0 and step < max_train_steps:
                save_intermediate(step=step)
            if samples.due_at_step(step):
                render_samples(epoch=None)
            if step >= max_train_steps:
                break

        else:  # the epoch ran to its end
            progress.epoch += 1
            progress.batches_done_in_epoch = 0
            epoch = progress.epoch
            tracker.log_epoch(epoch)
            if save_every_n_epochs and epoch % save_every_n_epochs == 0 and epoch < num_epochs:
                save_intermediate(epoch=epoch)
            if samples.due_at_epoch(epoch):
                render_samples(epoch=epoch)
    bar.close()

    # 6. Save the final embedding (and state), named after --output_name.
    logger.debug(
        "process %d: final vectors sum %.9g", accelerator.process_index, new_rows.vectors.sum().item()
    )
    optimizer_eval_mode(optimizer)
    accelerator.wait_for_everyone()
    save_embedding_file(embedding_file_name(output_name, extension(args)), progress.global_step)
    if args.save_state or args.save_state_on_train_end:
        save_state(state_folder_name(output_name))
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
        return init_word_vectors(tokenizer, token_table, args.init_word, num_vectors)
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


def step_generator(seed: int, step: int, micro_step: int, rank: int, device: torch.device) -> torch.Generator:
    """The random source of one micro-batch: a function of (seed, step, micro-step, process) only."""
    state = np.random.SeedSequence([seed, step, micro_step, rank]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator(device=device).manual_seed(int(state) & 0x7FFF_FFFF_FFFF_FFFF)


def batch_latents(batch, vae, vae_dtype, weight_dtype, generator) -> torch.Tensor:
    """Cached latents, or images encoded by the frozen VAE (a sample of its distribution)."""
    if batch.get("latents") is not None:  # cached unscaled, as kohya caches them
        return (batch["latents"].to(vae.device) * vae.config.scaling_factor).to(weight_dtype)
    with torch.no_grad():
        images = batch["images"].to(vae.device, dtype=vae_dtype)
        latents = vae.encode(images).latent_dist.sample(generator=generator)
    return (latents * vae.config.scaling_factor).to(weight_dtype)


def extension(args) -> str:
    return "safetensors" if args.save_model_as == "safetensors" else "pt"


def save_dtype(save_precision: str | None) -> torch.dtype:
    return {None: torch.float32, "float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[
        save_precision
    ]


def embedding_metadata(args, model, output_name: str) -> dict[str, str]:
    """SAI model-spec metadata for ``.safetensors`` (kohya's keys), from the run and --metadata_*."""
    width, height = dataset_resolution(args)
    extra = {name: getattr(args, f"metadata_{name}") for name in (
        "title", "author", "description", "license", "tags", "trigger_phrase", "usage_hint", "merged_from",
        "preprocessor", "thumbnail", "is_negative_embedding") if getattr(args, f"metadata_{name}")}  # fmt: skip
    return sai_model_spec_metadata(
        v2=model.v2,
        v_parameterization=args.v_parameterization,
        resolution=(width, height),
        title=args.metadata_title or output_name,
        clip_skip=args.clip_skip,
        extra=extra,
    )


def dataset_resolution(args) -> tuple[int, int]:
    if not args.resolution:
        return (512, 512)
    parts = [int(p) for p in str(args.resolution).split(",")]
    return (parts[0], parts[-1])


if __name__ == "__main__":
    run_cli(main)
