"""Noise, timesteps and targets for one training step, with kohya sd-scripts' semantics.

The trainer builds ``NoiseSettings`` from the command line once (``library.options``), then::

    schedule = make_training_schedule(v_parameterization, settings.zero_terminal_snr, device)

and every step::

    noisy_latents, noise, timesteps = sample_noise_and_timesteps(latents, schedule, settings, generator)
    target = training_target(schedule, latents, noise, timesteps, v_parameterization)

Everything random is drawn from the ``generator`` the trainer passes in (or torch's global RNG when it
passes None), so a run is reproducible and, by saving the generator state, resumable. The schedule
tensors live on the training device from the start. With a generator on the training device (or
None) a step issues no host-device copies and no host syncs; the one exception is multires noise,
whose resize factors must be known on the host. A CPU generator also works with GPU latents: the
numbers are then the same on every device, at the cost of a small host-to-device copy per draw.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from library.errors import UserError
from library.options import default_of

if TYPE_CHECKING:  # diffusers takes seconds to import; only the functions that build a scheduler need it
    from diffusers import DDPMScheduler

logger = logging.getLogger(__name__)

# kohya's training noise schedule (the Stable Diffusion 1.x/2.x one).
BETA_START = 0.00085
BETA_END = 0.012
BETA_SCHEDULE = "scaled_linear"
NUM_TRAIN_TIMESTEPS = 1000
DEFAULT_MULTIRES_NOISE_DISCOUNT = 0.3


def add_noise_arguments(parser: argparse.ArgumentParser) -> None:
    """Add kohya's "noise & timesteps" options (names, types and defaults as in sd-scripts)."""
    parser.add_argument(
        "--noise_offset",
        type=float,
        default=default_of(NoiseSettings, "noise_offset"),
        help="add a per-channel constant offset of this strength to the noise (around 0.1 is typical)",
    )
    parser.add_argument(
        "--noise_offset_random_strength",
        action="store_true",
        help="use a random strength between 0 and --noise_offset for every step",
    )
    parser.add_argument(
        "--adaptive_noise_scale",
        type=float,
        default=default_of(NoiseSettings, "adaptive_noise_scale"),
        help="add |mean of each latent channel| * this value to --noise_offset (needs --noise_offset)",
    )
    parser.add_argument(
        "--multires_noise_iterations",
        type=int,
        default=default_of(NoiseSettings, "multires_noise_iterations"),
        help="enable multi-resolution (pyramid) noise with this many levels (6-10 is typical)",
    )
    parser.add_argument(
        "--multires_noise_discount",
        type=float,
        default=default_of(NoiseSettings, "multires_noise_discount"),
        help="weight decay per level of multires noise (only used with --multires_noise_iterations)",
    )
    parser.add_argument(
        "--ip_noise_gamma",
        type=float,
        default=default_of(NoiseSettings, "ip_noise_gamma"),
        help="input perturbation noise strength (around 0.1 is typical; arxiv.org/abs/2301.11706)",
    )
    parser.add_argument(
        "--ip_noise_gamma_random_strength",
        action="store_true",
        help="use a random strength between 0 and --ip_noise_gamma for every step",
    )
    parser.add_argument(
        "--zero_terminal_snr",
        action="store_true",
        help="rescale the noise schedule so the last timestep has zero SNR (arxiv.org/abs/2305.08891)",
    )
    parser.add_argument(
        "--min_timestep",
        type=int,
        default=default_of(NoiseSettings, "min_timestep"),
        help="smallest timestep to train on, 0-999 (default 0)",
    )
    parser.add_argument(
        "--max_timestep",
        type=int,
        default=default_of(NoiseSettings, "max_timestep"),
        help="timesteps are drawn below this value, 1-1000 (default 1000); equal to --min_timestep "
        "trains on that single timestep",
    )


def timestep_range(min_timestep: int | None, max_timestep: int | None) -> tuple[int, int]:
    """Resolve --min_timestep/--max_timestep to kohya's [low, high) range, validating it.

    As in kohya, ``low == high`` is allowed and means "always use timestep ``high``".
    """
    low = 0 if min_timestep is None else min_timestep
    high = NUM_TRAIN_TIMESTEPS if max_timestep is None else max_timestep
    if not 0 <= low <= NUM_TRAIN_TIMESTEPS - 1:
        raise UserError(f"--min_timestep must be between 0 and {NUM_TRAIN_TIMESTEPS - 1}, got {low}")
    if not 1 <= high <= NUM_TRAIN_TIMESTEPS:
        raise UserError(f"--max_timestep must be between 1 and {NUM_TRAIN_TIMESTEPS}, got {high}")
    if low > high:
        raise UserError(
            f"--min_timestep ({low}) must not be larger than --max_timestep ({high}); "
            "timesteps are drawn from [min_timestep, max_timestep)"
        )
    return low, high


@dataclass(frozen=True)
class NoiseSettings:
    """The noise options of one run (fields named like the options), checked when built.

    ``min_timestep``/``max_timestep`` are resolved to kohya's ``[low, high)`` range. kohya no
    longer rejects --noise_offset together with --multires_noise_iterations (the check is
    commented out in sd-scripts): both are applied, offset first, so that is accepted too.
    """

    noise_offset: float | None = None
    noise_offset_random_strength: bool = False
    adaptive_noise_scale: float | None = None
    multires_noise_iterations: int | None = None
    multires_noise_discount: float = DEFAULT_MULTIRES_NOISE_DISCOUNT
    ip_noise_gamma: float | None = None
    ip_noise_gamma_random_strength: bool = False
    zero_terminal_snr: bool = False
    min_timestep: int | None = None
    max_timestep: int | None = None
    timestep_range_given: bool = field(init=False, default=False)  # written into the metadata (kohya)

    def __post_init__(self) -> None:
        if self.adaptive_noise_scale is not None and self.noise_offset is None:
            raise UserError(
                "--adaptive_noise_scale needs --noise_offset: add --noise_offset (e.g. 0.1) or remove it"
            )
        if self.multires_noise_iterations is not None and self.multires_noise_iterations < 0:
            raise UserError(
                f"--multires_noise_iterations must be 0 or more, got {self.multires_noise_iterations}"
            )
        low, high = timestep_range(self.min_timestep, self.max_timestep)
        given = self.min_timestep is not None or self.max_timestep is not None
        object.__setattr__(self, "timestep_range_given", given)
        object.__setattr__(self, "min_timestep", low)
        object.__setattr__(self, "max_timestep", high)

    def warn_about_unused(self, v_parameterization: bool) -> None:
        """Options that do nothing in this combination (kohya's warnings, and a few more)."""
        if self.noise_offset_random_strength and not self.noise_offset:
            logger.warning("--noise_offset_random_strength has no effect without --noise_offset")
        if self.ip_noise_gamma_random_strength and not self.ip_noise_gamma:
            logger.warning("--ip_noise_gamma_random_strength has no effect without --ip_noise_gamma")
        if (
            self.multires_noise_discount != DEFAULT_MULTIRES_NOISE_DISCOUNT
            and not self.multires_noise_iterations
        ):
            logger.warning("--multires_noise_discount has no effect without --multires_noise_iterations")
        if self.zero_terminal_snr and not v_parameterization:
            logger.warning(
                "--zero_terminal_snr without --v_parameterization: an epsilon model cannot predict at zero SNR, "
                "training may behave unexpectedly (kohya warns the same)"
            )


# ---------------------------------------------------------------------------------------------
# The noise schedule


def make_noise_scheduler(v_parameterization: bool, zero_terminal_snr: bool) -> DDPMScheduler:
    """kohya's training scheduler: SD's scaled-linear DDPM schedule with 1000 steps.

    ``zero_terminal_snr`` uses diffusers' ``rescale_betas_zero_snr``, which applies the same rule as
    kohya's ``fix_noise_scheduler_betas_for_zero_terminal_snr`` (tests check the numbers match).
    """
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        beta_start=BETA_START,
        beta_end=BETA_END,
        beta_schedule=BETA_SCHEDULE,
        num_train_timesteps=NUM_TRAIN_TIMESTEPS,
        clip_sample=False,
        prediction_type="v_prediction" if v_parameterization else "epsilon",
        rescale_betas_zero_snr=zero_terminal_snr,
    )


def snr_of(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio per timestep, computed exactly as kohya does (alpha/sigma, squared)."""
    alpha = torch.sqrt(alphas_cumprod)
    sigma = torch.sqrt(1.0 - alphas_cumprod)
    return (alpha / sigma) ** 2


@dataclass(frozen=True)
class TrainingSchedule:
    """The noise scheduler plus the per-timestep tensors a step needs, already on the training device.

    ``snr`` is kohya's ``all_snr``. kohya computes it *before* applying --zero_terminal_snr, so the loss
    weights (--min_snr_gamma, --debiased_estimation_loss, ...) use the original schedule's SNR while the
    noise itself follows the rescaled one. We keep that order: it is what kohya trains with, and with the
    rescaled SNR the last timestep's weight would be a division by zero.
    """

    scheduler: DDPMScheduler
    alphas_cumprod: torch.Tensor  # [T] float32: the schedule the noise is added with
    snr: torch.Tensor  # [T] float32: the SNR used for loss weighting (see above)
    v_parameterization: bool
    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS

    @property
    def device(self) -> torch.device:
        return self.alphas_cumprod.device


def make_training_schedule(
    v_parameterization: bool, zero_terminal_snr: bool, device: torch.device | str = "cpu"
) -> TrainingSchedule:
    """Build the scheduler and move what every step reads to ``device`` once."""
    scheduler = make_noise_scheduler(v_parameterization, zero_terminal_snr)
    if zero_terminal_snr:
        logger.info("zero terminal SNR: noise schedule betas rescaled (arxiv.org/abs/2305.08891)")
        snr_source = make_noise_scheduler(v_parameterization, False).alphas_cumprod
    else:
        snr_source = scheduler.alphas_cumprod
    return TrainingSchedule(
        scheduler=scheduler,
        alphas_cumprod=scheduler.alphas_cumprod.to(device=device, dtype=torch.float32),
        snr=snr_of(snr_source.to(torch.float32)).to(device),
        v_parameterization=v_parameterization,
        num_train_timesteps=scheduler.config.num_train_timesteps,
    )


def _coefficients(
    schedule: TrainingSchedule, timesteps: torch.Tensor, like: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """sqrt(alpha_bar_t) and sqrt(1 - alpha_bar_t), shaped to broadcast over ``like``.

    Computed in ``like``'s dtype the way diffusers' add_noise/get_velocity do, so results match
    DDPMScheduler bit for bit, without it moving its alphas_cumprod between devices every step.
    """
    alphas_cumprod = schedule.alphas_cumprod.to(dtype=like.dtype)[timesteps.to(schedule.device)]
    shape = (-1,) + (1,) * (like.dim() - 1)
    sqrt_alpha = (alphas_cumprod**0.5).reshape(shape).to(like.device)
    sqrt_one_minus_alpha = ((1 - alphas_cumprod) ** 0.5).reshape(shape).to(like.device)
    return sqrt_alpha, sqrt_one_minus_alpha


def add_noise(
    schedule: TrainingSchedule, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """The forward diffusion process q(x_t | x_0), same numbers as DDPMScheduler.add_noise."""
    sqrt_alpha, sqrt_one_minus_alpha = _coefficients(schedule, timesteps, latents)
    return sqrt_alpha * latents + sqrt_one_minus_alpha * noise


def training_target(
    schedule: TrainingSchedule,
    latents: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    v_parameterization: bool,
) -> torch.Tensor:
    """What the U-Net should predict: the noise, or the velocity for v-parameterization models.

    The velocity is DDPMScheduler.get_velocity's (sqrt(a) * noise - sqrt(1 - a) * latents).
    """
    if not v_parameterization:
        return noise
    sqrt_alpha, sqrt_one_minus_alpha = _coefficients(schedule, timesteps, latents)
    return sqrt_alpha * noise - sqrt_one_minus_alpha * latents


# ---------------------------------------------------------------------------------------------
# Sampling one step's noise and timesteps


class _Draws:
    """Random draws from one generator, returned on the latents' device.

    With a generator the numbers are drawn on the generator's device (a CPU generator therefore gives
    the same noise whatever device trains); without one, torch's global RNG on the latents' device.
    """

    def __init__(self, generator: torch.Generator | None, device: torch.device):
        self.generator = generator
        self.target_device = device
        self.draw_device = generator.device if generator is not None else device

    def _place(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(self.target_device)

    def randn(self, shape: tuple[int, ...], dtype: torch.dtype | None = None) -> torch.Tensor:
        return self._place(torch.randn(shape, generator=self.generator, device=self.draw_device, dtype=dtype))

    def rand(self, shape: tuple[int, ...]) -> torch.Tensor:
        return self._place(torch.rand(shape, generator=self.generator, device=self.draw_device))

    def randint(self, low: int, high: int, shape: tuple[int, ...]) -> torch.Tensor:
        return self._place(torch.randint(low, high, shape, generator=self.generator, device=self.draw_device))

    def host_uniforms(self, count: int) -> list[float]:
        """Numbers needed on the host (resize factors); a host sync when the generator is on a GPU."""
        return torch.rand(count, generator=self.generator, device=self.draw_device).tolist()


def _noise_offset(latents: torch.Tensor, settings: NoiseSettings, draws: _Draws) -> torch.Tensor:
    """Per-(sample, channel) constant noise (crosslabs.org/blog/diffusion-with-offset-noise).

    Strength is --noise_offset (times a uniform draw with --noise_offset_random_strength), plus
    --adaptive_noise_scale * |channel mean of the latents|, clamped at 0, as in kohya.
    """
    strength: float | torch.Tensor = settings.noise_offset
    if settings.noise_offset_random_strength:
        strength = draws.rand((1,)) * settings.noise_offset
    if settings.adaptive_noise_scale is not None:
        channel_mean = torch.abs(latents.mean(dim=(2, 3), keepdim=True))
        strength = torch.clamp(strength + settings.adaptive_noise_scale * channel_mean, min=0.0)
    return strength * draws.randn((latents.shape[0], latents.shape[1], 1, 1))


def _pyramid_noise(noise: torch.Tensor, iterations: int, discount: float, draws: _Draws) -> torch.Tensor:
    """Multi-resolution noise: add upsampled low-resolution noise levels, then rescale to unit std.

    Level i is drawn at size / r**i with r uniform in [2, 4) (level 0 is full size), weighted by
    discount**i, stopping after a level reaches 1 pixel, as kohya's pyramid_noise_like does.
    Adds in place: ``noise`` is this step's fresh tensor and keeps its dtype, like kohya's.
    """
    batch, channels, height, width = noise.shape
    factors = [2.0 + 2.0 * u for u in draws.host_uniforms(iterations)]
    for level, factor in enumerate(factors):
        level_height = max(1, int(height / (factor**level)))
        level_width = max(1, int(width / (factor**level)))
        level_noise = draws.randn((batch, channels, level_height, level_width))
        upsampled = torch.nn.functional.interpolate(level_noise, size=(height, width), mode="bilinear")
        noise += upsampled * discount**level
        if level_height == 1 or level_width == 1:
            break
    return noise / noise.std()


def _sample_timesteps(batch_size: int, settings: NoiseSettings, draws: _Draws) -> torch.Tensor:
    """Uniform integer timesteps in [min_timestep, max_timestep), or the fixed one if they are equal."""
    if settings.min_timestep < settings.max_timestep:
        return draws.randint(settings.min_timestep, settings.max_timestep, (batch_size,))
    return torch.full((batch_size,), settings.max_timestep, dtype=torch.long, device=draws.target_device)


def sample_noise_and_timesteps(
    latents: torch.Tensor,
    schedule: TrainingSchedule,
    settings: NoiseSettings,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One step of kohya's get_noise_noisy_latents_and_timesteps: returns (noisy_latents, noise, timesteps).

    Order as in kohya: Gaussian noise (latents' dtype) -> noise offset -> multires noise -> timesteps ->
    noisy latents. With --ip_noise_gamma the latents are noised with ``noise + gamma * extra_noise``
    while the returned ``noise`` (the training target) stays without the perturbation.
    """
    draws = _Draws(generator, latents.device)

    noise = draws.randn(tuple(latents.shape), dtype=latents.dtype)
    if settings.noise_offset:
        noise = noise + _noise_offset(latents, settings, draws)
    if settings.multires_noise_iterations:
        noise = _pyramid_noise(
            noise, settings.multires_noise_iterations, settings.multires_noise_discount, draws
        )

    timesteps = _sample_timesteps(latents.shape[0], settings, draws)

    noise_for_input = noise
    if settings.ip_noise_gamma:
        strength: float | torch.Tensor = settings.ip_noise_gamma
        if settings.ip_noise_gamma_random_strength:
            strength = draws.rand((1,)) * settings.ip_noise_gamma
        noise_for_input = noise + strength * draws.randn(tuple(latents.shape), dtype=latents.dtype)

    noisy_latents = add_noise(schedule, latents, noise_for_input, timesteps)
    return noisy_latents, noise, timesteps
