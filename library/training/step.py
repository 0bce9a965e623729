"""One micro-batch of Textual Inversion: the frozen model's diffusion loss, given the new vectors.

The loss is Stable Diffusion's training objective: noise the image's latents at a random
timestep, ask the UNet (conditioned on the caption, whose word is the new vectors) for the noise
(or the velocity), and compare. Only the vectors receive a gradient.

Every random draw of a micro-batch (VAE sample, noise, timesteps) comes from a generator seeded
by ``(seed, optimizer step, micro-step, process)``: nothing depends on a running RNG, so a run
resumed from a saved state repeats the uninterrupted run's draws exactly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from library.text.encoding import encode_prompts
from library.training.loss import LossSettings, compute_loss
from library.training.noise import (
    NoiseSettings,
    TrainingSchedule,
    sample_noise_and_timesteps,
    training_target,
)


def step_generator(seed: int, step: int, micro_step: int, rank: int, device: torch.device) -> torch.Generator:
    """The random source of one micro-batch: a function of (seed, step, micro-step, process) only."""
    state = np.random.SeedSequence([seed, step, micro_step, rank]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator(device=device).manual_seed(int(state) & 0x7FFF_FFFF_FFFF_FFFF)


@dataclass
class DiffusionLoss:
    """The loss of one micro-batch; built once per run from the frozen model and the settings."""

    text_encoder: Any
    tokenizer: Any
    unet: Any
    vae: Any  # None once latents are cached and nothing else needs it
    latent_scale: float  # the VAE's scaling factor (0.18215 for SD)
    schedule: TrainingSchedule
    noise: NoiseSettings
    loss: LossSettings
    clip_skip: int | None
    v_parameterization: bool
    weight_dtype: torch.dtype
    vae_dtype: torch.dtype
    seed: int
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext

    def __call__(
        self, batch: dict, step: int, micro_step: int, rank: int, seed: int | None = None
    ) -> torch.Tensor:
        device = self.unet.device
        generator = step_generator(self.seed if seed is None else seed, step, micro_step, rank, device)
        with self.autocast():
            latents = self.batch_latents(batch, generator)
            hidden = encode_prompts(
                self.text_encoder, self.tokenizer, batch["input_ids"].to(device), self.clip_skip
            )
            noisy, noise, timesteps = sample_noise_and_timesteps(
                latents, self.schedule, self.noise, generator
            )
            prediction = self.unet(noisy, timesteps, hidden.to(self.weight_dtype)).sample
        target = training_target(self.schedule, latents, noise, timesteps, self.v_parameterization)
        return compute_loss(prediction, target, timesteps, self.schedule, self.loss, batch["loss_weights"],
                            batch.get("alpha_masks"))  # fmt: skip

    def batch_latents(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        """Cached latents, or images encoded by the frozen VAE (a sample of its distribution)."""
        scale = self.latent_scale
        if batch.get("latents") is not None:  # cached unscaled, as kohya caches them
            return (batch["latents"].to(self.unet.device) * scale).to(self.weight_dtype)
        with torch.no_grad():
            images = batch["images"].to(self.vae.device, dtype=self.vae_dtype)
            latents = self.vae.encode(images).latent_dist.sample(generator=generator)
        return (latents * scale).to(self.weight_dtype)
