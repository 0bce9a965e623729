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
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from library.text.conditioning import TextConditioner
from library.training.accelerator import Precision
from library.training.loss import LossSettings, compute_loss
from library.training.noise import (
    NoiseSettings,
    TrainingSchedule,
    make_training_schedule,
    sample_noise_and_timesteps,
    training_target,
)

if TYPE_CHECKING:
    from library.training.run import Run


def step_generator(seed: int, step: int, micro_step: int, rank: int, device: torch.device) -> torch.Generator:
    """The random source of one micro-batch: a function of (seed, step, micro-step, process) only."""
    state = np.random.SeedSequence([seed, step, micro_step, rank]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator(device=device).manual_seed(int(state) & 0x7FFF_FFFF_FFFF_FFFF)


@dataclass
class DiffusionLoss:
    """The loss of one micro-batch; built once per run (``build``) from the frozen model and the settings."""

    text: TextConditioner  # captions -> the UNet's conditioning, through the trained vectors
    unet: Any
    vae: Any  # None once latents are cached and nothing else needs it
    latent_scale: float  # the VAE's scaling factor (0.18215 for SD)
    schedule: TrainingSchedule
    noise: NoiseSettings
    loss: LossSettings
    precision: Precision
    seed: int
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext

    @classmethod
    def build(cls, run: Run, latent_scale: float) -> DiffusionLoss:
        """The run's loss: its frozen model, text conditioning, noise and loss settings, precision, seed."""
        settings, unet = run.settings, run.model.unet
        schedule = make_training_schedule(
            settings.loss.v_parameterization, settings.noise.zero_terminal_snr, unet.device
        )
        return cls(
            run.text,
            unet,
            run.model.vae,
            latent_scale,
            schedule,
            settings.noise,
            settings.loss,
            run.precision,
            run.seed,
            run.accelerator.autocast,
        )

    def __call__(
        self, batch: dict, step: int, micro_step: int, rank: int, seed: int | None = None
    ) -> torch.Tensor:
        device = self.unet.device
        generator = step_generator(self.seed if seed is None else seed, step, micro_step, rank, device)
        with self.autocast():
            latents = self.batch_latents(batch, generator)
            conditioning = self.text.captions(batch["captions"], batch.get("sizes"))
            noisy, noise, timesteps = sample_noise_and_timesteps(
                latents, self.schedule, self.noise, generator
            )
            prediction = self.unet(
                noisy, timesteps, **conditioning.unet_kwargs(self.precision.weight_dtype)
            ).sample
        target = training_target(self.schedule, latents, noise, timesteps, self.loss.v_parameterization)
        return compute_loss(
            prediction,
            target,
            timesteps,
            self.schedule,
            self.loss,
            batch["loss_weights"],
            batch.get("alpha_masks"),
        )

    def batch_latents(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        """Cached latents, or images encoded by the frozen VAE (a sample of its distribution)."""
        scale, dtype = self.latent_scale, self.precision.weight_dtype
        if batch.get("latents") is not None:  # cached unscaled, as kohya caches them
            return (batch["latents"].to(self.unet.device) * scale).to(dtype)
        with torch.no_grad():
            images = batch["images"].to(self.vae.device, dtype=self.precision.vae_dtype)
            latents = self.vae.encode(images).latent_dist.sample(generator=generator)
        return (latents * scale).to(dtype)
