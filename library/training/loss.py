"""The training loss of one step, with kohya sd-scripts' formulas and order.

The trainer builds ``LossSettings`` from the command line once (``library.options``), then every step::

    loss = compute_loss(model_pred, target, timesteps, schedule, loss_settings, loss_weights, mask)

kohya's order: per-element loss (l1 / l2 / huber / smooth_l1) -> mask -> mean over C,H,W ->
x per-sample loss weight (prior loss weight of regularisation images) -> --min_snr_gamma ->
--scale_v_pred_loss_like_noise_pred -> --v_pred_like_loss -> --debiased_estimation_loss -> batch mean.
All per-timestep numbers come from the ``TrainingSchedule`` (already on the device), so a step has no
host syncs.
"""

from __future__ import annotations

import argparse
import logging
import math
from dataclasses import dataclass

import torch

from library.errors import UserError
from library.options import default_of
from library.training.noise import TrainingSchedule

logger = logging.getLogger(__name__)

LOSS_TYPES = ("l1", "l2", "huber", "smooth_l1")
HUBER_SCHEDULES = ("constant", "exponential", "snr")
HUBER_LOSS_TYPES = ("huber", "smooth_l1")
DEFAULT_HUBER_C = 0.1
DEFAULT_HUBER_SCALE = 1.0
# kohya caps the SNR at 1000 for the v-prediction scale and the debiased weight (SNR at t=0 is ~1175).
SNR_CAP = 1000.0


def add_loss_arguments(parser: argparse.ArgumentParser) -> None:
    """Add kohya's loss options, including --huber_c and --huber_scale (kohya's TI script has them)."""
    parser.add_argument(
        "--loss_type",
        type=str,
        default=default_of(LossSettings, "loss_type"),
        choices=list(LOSS_TYPES),
        help="loss function: l1, l2 (default), huber or smooth_l1",
    )
    parser.add_argument(
        "--huber_schedule",
        type=str,
        default=default_of(LossSettings, "huber_schedule"),
        choices=list(HUBER_SCHEDULES),
        help="how the huber/smooth_l1 threshold changes with the timestep (default snr)",
    )
    parser.add_argument(
        "--huber_c",
        type=float,
        default=default_of(LossSettings, "huber_c"),
        help="huber/smooth_l1 threshold parameter (default 0.1)",
    )
    parser.add_argument(
        "--huber_scale",
        type=float,
        default=default_of(LossSettings, "huber_scale"),
        help="huber/smooth_l1 threshold scale for the constant and exponential schedules (default 1.0)",
    )
    parser.add_argument(
        "--min_snr_gamma",
        type=float,
        default=default_of(LossSettings, "min_snr_gamma"),
        help="Min-SNR weighting gamma; lower is stronger, 5 is the paper's recommendation",
    )
    parser.add_argument(
        "--scale_v_pred_loss_like_noise_pred",
        action="store_true",
        help="scale a v-prediction loss to the magnitude of a noise-prediction loss (needs --v_parameterization)",
    )
    parser.add_argument(
        "--v_pred_like_loss",
        type=float,
        default=default_of(LossSettings, "v_pred_like_loss"),
        help="add a v-prediction-like loss multiplied by this value (not with --v_parameterization)",
    )
    parser.add_argument(
        "--debiased_estimation_loss",
        action="store_true",
        help="weight the loss by 1/sqrt(SNR) (1/(SNR+1) for v-prediction), arxiv.org/abs/2310.08442",
    )


@dataclass(frozen=True)
class LossSettings:
    """The loss options of one run, resolved once so a training step reads plain fields."""

    loss_type: str = "l2"
    huber_schedule: str = "snr"
    huber_c: float = DEFAULT_HUBER_C
    huber_scale: float = DEFAULT_HUBER_SCALE
    min_snr_gamma: float | None = None
    scale_v_pred_loss_like_noise_pred: bool = False
    v_pred_like_loss: float | None = None
    debiased_estimation_loss: bool = False
    v_parameterization: bool = False

    def __post_init__(self) -> None:
        """Reject what kohya rejects, as a one-line UserError."""
        if self.loss_type not in LOSS_TYPES:
            raise UserError(f"--loss_type must be one of {', '.join(LOSS_TYPES)}, got {self.loss_type!r}")
        if self.huber_schedule not in HUBER_SCHEDULES:
            raise UserError(
                f"--huber_schedule must be one of {', '.join(HUBER_SCHEDULES)}, got {self.huber_schedule!r}"
            )
        if self.scale_v_pred_loss_like_noise_pred and not self.v_parameterization:
            raise UserError("--scale_v_pred_loss_like_noise_pred can only be used with --v_parameterization")
        if self.v_pred_like_loss and self.v_parameterization:
            raise UserError(
                "--v_pred_like_loss cannot be used with --v_parameterization (the loss already is one)"
            )
        if self.min_snr_gamma is not None and self.min_snr_gamma < 0:
            raise UserError(f"--min_snr_gamma must be positive (5 is typical), got {self.min_snr_gamma}")
        if self.loss_type in HUBER_LOSS_TYPES and not self.huber_c > 0:
            raise UserError(f"--huber_c must be larger than 0 for --loss_type {self.loss_type}")

    def warn_about_unused(self) -> None:
        """Options that do nothing with this --loss_type or --huber_schedule."""
        if self.loss_type in HUBER_LOSS_TYPES:
            if self.huber_schedule == "snr" and self.huber_scale != DEFAULT_HUBER_SCALE:
                logger.warning("--huber_scale has no effect with --huber_schedule snr (as in kohya)")
        else:
            changed = [
                flag
                for flag, value, default in (
                    ("--huber_c", self.huber_c, DEFAULT_HUBER_C),
                    ("--huber_scale", self.huber_scale, DEFAULT_HUBER_SCALE),
                    ("--huber_schedule", self.huber_schedule, "snr"),
                )
                if value != default
            ]
            if changed:
                logger.warning(f"{', '.join(changed)} only apply to --loss_type huber or smooth_l1; ignored")


# ---------------------------------------------------------------------------------------------
# Per-element loss


def huber_c_for_timesteps(
    timesteps: torch.Tensor, schedule: TrainingSchedule, settings: LossSettings
) -> torch.Tensor | None:
    """The huber/smooth_l1 threshold per sample ([B]), or None for l1/l2 (kohya's get_huber_threshold).

    - constant:    huber_c * huber_scale
    - exponential: huber_scale * huber_c ** (t / T)   (from huber_scale at t=0 to huber_c*huber_scale at T)
    - snr:         (1 - huber_c) / (1 + sigma_t)**2 + huber_c, sigma_t = sqrt((1 - a_t) / a_t)
                   (huber_scale is not applied here, as in kohya)
    """
    if settings.loss_type not in HUBER_LOSS_TYPES:
        return None
    if settings.huber_schedule == "constant":
        return torch.full(
            (timesteps.shape[0],), settings.huber_c * settings.huber_scale, device=timesteps.device
        )
    if settings.huber_schedule == "exponential":
        decay = -math.log(settings.huber_c) / schedule.num_train_timesteps
        return torch.exp(-decay * timesteps) * settings.huber_scale
    if settings.huber_schedule == "snr":
        alphas_cumprod = schedule.alphas_cumprod[timesteps.to(schedule.device)]
        sigmas = ((1.0 - alphas_cumprod) / alphas_cumprod) ** 0.5
        return ((1 - settings.huber_c) / (1 + sigmas) ** 2 + settings.huber_c).to(timesteps.device)
    raise UserError(
        f"--huber_schedule must be one of {', '.join(HUBER_SCHEDULES)}, got {settings.huber_schedule!r}"
    )


def conditional_loss(
    pred: torch.Tensor, target: torch.Tensor, loss_type: str, huber_c: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-element loss (no reduction), kohya's formulas.

    l2: (p - t)^2;  l1: |p - t|;  huber: 2c (sqrt((p - t)^2 + c^2) - c);  smooth_l1: 2 (sqrt((p - t)^2 + c^2) - c)
    with c the per-sample threshold from ``huber_c_for_timesteps``.
    """
    if loss_type == "l2":
        return torch.nn.functional.mse_loss(pred, target, reduction="none")
    if loss_type == "l1":
        return torch.nn.functional.l1_loss(pred, target, reduction="none")
    if loss_type in HUBER_LOSS_TYPES:
        if huber_c is None:
            raise ValueError(f"loss_type {loss_type} needs huber_c (see huber_c_for_timesteps)")
        c = huber_c.reshape((-1,) + (1,) * (pred.dim() - 1)).to(pred.device)
        smooth = torch.sqrt((pred - target) ** 2 + c**2) - c
        return 2 * c * smooth if loss_type == "huber" else 2 * smooth
    raise UserError(f"--loss_type must be one of {', '.join(LOSS_TYPES)}, got {loss_type!r}")


def apply_mask(loss: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Multiply the per-element loss by a 0..1 mask resized to the loss' H, W with area averaging.

    ``mask`` is [B, H, W] or [B, 1, H, W] in 0..1 (kohya's alpha masks). Masked-out pixels count as zero
    in the following mean over C, H, W (the mean is not renormalised by the mask area, as in kohya).
    """
    if mask.dim() == 3:
        mask = mask.unsqueeze(1)
    mask = mask.to(device=loss.device, dtype=loss.dtype)
    mask = torch.nn.functional.interpolate(mask, size=loss.shape[2:], mode="area")
    return loss * mask


def mask_from_conditioning_image(images: torch.Tensor) -> torch.Tensor:
    """kohya's --masked_loss with conditioning images: the red channel, mapped from -1..1 to 0..1."""
    return images[:, 0].unsqueeze(1) / 2 + 0.5


# ---------------------------------------------------------------------------------------------
# Per-sample weighting (kohya's custom_train_functions)


def snr_for_timesteps(schedule: TrainingSchedule, timesteps: torch.Tensor) -> torch.Tensor:
    return schedule.snr[timesteps.to(schedule.device)]


def min_snr_weight(snr: torch.Tensor, gamma: float, v_parameterization: bool) -> torch.Tensor:
    """Min-SNR-gamma: min(SNR, gamma) / SNR, or / (SNR + 1) for v-prediction (arxiv.org/abs/2303.09556)."""
    clipped = torch.minimum(snr, torch.full_like(snr, gamma))
    return clipped / (snr + 1) if v_parameterization else clipped / snr


def v_pred_scale(snr: torch.Tensor) -> torch.Tensor:
    """SNR / (SNR + 1) with SNR capped at 1000: how a v-loss relates to a noise-prediction loss."""
    capped = torch.minimum(snr, torch.full_like(snr, SNR_CAP))
    return capped / (capped + 1)


def debiased_weight(snr: torch.Tensor, v_parameterization: bool) -> torch.Tensor:
    """1 / sqrt(SNR), or 1 / (SNR + 1) for v-prediction, with SNR capped at 1000."""
    capped = torch.minimum(snr, torch.full_like(snr, SNR_CAP))
    return 1 / (capped + 1) if v_parameterization else 1 / torch.sqrt(capped)


def weight_per_sample_loss(
    loss: torch.Tensor, timesteps: torch.Tensor, schedule: TrainingSchedule, settings: LossSettings
) -> torch.Tensor:
    """Apply the SNR-based options to a [B] loss, each in kohya's order and with kohya's truthiness."""
    needs_snr = (
        settings.min_snr_gamma
        or settings.scale_v_pred_loss_like_noise_pred
        or settings.v_pred_like_loss
        or settings.debiased_estimation_loss
    )
    if not needs_snr:
        return loss
    snr = snr_for_timesteps(schedule, timesteps).to(loss.device)
    if settings.min_snr_gamma:
        loss = loss * min_snr_weight(snr, settings.min_snr_gamma, settings.v_parameterization).float()
    if settings.scale_v_pred_loss_like_noise_pred:
        loss = loss * v_pred_scale(snr)
    if settings.v_pred_like_loss:
        loss = loss + loss / v_pred_scale(snr) * settings.v_pred_like_loss
    if settings.debiased_estimation_loss:
        loss = loss * debiased_weight(snr, settings.v_parameterization)
    return loss


def compute_loss(
    model_pred: torch.Tensor,
    target: torch.Tensor,
    timesteps: torch.Tensor,
    schedule: TrainingSchedule,
    settings: LossSettings,
    loss_weights: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The scalar loss of one step, computed in float32 like kohya (see the module docstring for the order).

    ``loss_weights`` is the per-sample weight [B] (kohya's batch["loss_weights"]: 1, or --prior_loss_weight
    for regularisation images); ``mask`` is an optional 0..1 loss mask (see ``apply_mask``).
    """
    huber_c = huber_c_for_timesteps(timesteps, schedule, settings)
    loss = conditional_loss(model_pred.float(), target.float(), settings.loss_type, huber_c)
    if mask is not None:
        loss = apply_mask(loss, mask)
    loss = loss.mean(dim=tuple(range(1, loss.dim())))
    if loss_weights is not None:
        loss = loss * loss_weights.to(device=loss.device, dtype=loss.dtype)
    loss = weight_per_sample_loss(loss, timesteps, schedule, settings)
    return loss.mean()
