"""Tests for library/training/loss.py: kohya's loss formulas, weighting options and their order."""

from __future__ import annotations

import argparse
import logging
import math

import pytest
import torch

from library.errors import UserError
from library.options import settings_from
from library.training.loss import (
    LossSettings,
    add_loss_arguments,
    apply_mask,
    compute_loss,
    conditional_loss,
    huber_c_for_timesteps,
    mask_from_conditioning_image,
)
from library.training.noise import make_training_schedule

TIMESTEPS = torch.tensor([0, 250, 999])


def parse(*argv: str, v_parameterization: bool = False) -> LossSettings:
    """Settings from a command line, as the trainer builds them (checked on construction)."""
    parser = argparse.ArgumentParser()
    add_loss_arguments(parser)
    return settings_from(LossSettings, parser.parse_args(list(argv)), v_parameterization=v_parameterization)


@pytest.fixture(scope="module")
def schedule():
    return make_training_schedule(v_parameterization=False, zero_terminal_snr=False)


@pytest.fixture
def pred_and_target():
    g = torch.Generator().manual_seed(0)
    return torch.randn(3, 4, 6, 6, generator=g), torch.randn(3, 4, 6, 6, generator=g)


def per_sample_l2(pred, target):
    return ((pred - target) ** 2).mean(dim=(1, 2, 3))


# --- options -----------------------------------------------------------------------------------


def test_loss_arguments_have_kohyas_names_types_and_defaults():
    parser = argparse.ArgumentParser()
    add_loss_arguments(parser)
    assert vars(parser.parse_args([])) == {
        "loss_type": "l2",
        "huber_schedule": "snr",
        "huber_c": 0.1,
        "huber_scale": 1.0,
        "min_snr_gamma": None,
        "scale_v_pred_loss_like_noise_pred": False,
        "v_pred_like_loss": None,
        "debiased_estimation_loss": False,
    }
    with pytest.raises(SystemExit):
        parser.parse_args(["--loss_type", "l3"])


@pytest.mark.parametrize(
    "argv, v_param, message",
    [
        (
            ("--scale_v_pred_loss_like_noise_pred",),
            False,
            "--scale_v_pred_loss_like_noise_pred .*--v_parameterization",
        ),
        (("--v_pred_like_loss", "0.1"), True, "--v_pred_like_loss cannot be used with --v_parameterization"),
        (("--loss_type", "huber", "--huber_c", "0"), False, "--huber_c must be larger than 0"),
        (("--min_snr_gamma", "-1"), False, "--min_snr_gamma"),
    ],
)
def test_combinations_kohya_rejects_are_user_errors(argv, v_param, message):
    with pytest.raises(UserError, match=message):
        parse(*argv, v_parameterization=v_param)


def test_valid_combinations_pass_and_ignored_huber_options_are_warned(caplog):
    parse("--scale_v_pred_loss_like_noise_pred", v_parameterization=True)
    parse("--v_pred_like_loss", "0.1")
    with caplog.at_level(logging.WARNING):
        parse("--huber_c", "0.3").warn_about_unused()
        parse("--loss_type", "huber", "--huber_scale", "2").warn_about_unused()
    assert "--huber_c only apply to --loss_type huber" in caplog.text
    assert "--huber_scale has no effect with --huber_schedule snr" in caplog.text


# --- per-element loss --------------------------------------------------------------------------


def test_conditional_loss_formulas(pred_and_target):
    pred, target = pred_and_target
    diff = pred - target
    c = torch.tensor([0.1, 0.5, 1.0])
    cb = c.view(-1, 1, 1, 1)
    torch.testing.assert_close(conditional_loss(pred, target, "l2"), diff**2)
    torch.testing.assert_close(conditional_loss(pred, target, "l1"), diff.abs())
    torch.testing.assert_close(
        conditional_loss(pred, target, "huber", c), 2 * cb * (torch.sqrt(diff**2 + cb**2) - cb)
    )
    torch.testing.assert_close(
        conditional_loss(pred, target, "smooth_l1", c), 2 * (torch.sqrt(diff**2 + cb**2) - cb)
    )
    assert conditional_loss(pred, target, "l2").shape == pred.shape


def test_huber_threshold_schedules(schedule):
    timesteps = torch.tensor([0, 500, 999])
    constant = huber_c_for_timesteps(
        timesteps,
        schedule,
        parse(
            "--loss_type", "huber", "--huber_schedule", "constant", "--huber_c", "0.2", "--huber_scale", "3"
        ),
    )
    torch.testing.assert_close(constant, torch.full((3,), 0.6))

    exponential = huber_c_for_timesteps(
        timesteps,
        schedule,
        parse(
            "--loss_type",
            "huber",
            "--huber_schedule",
            "exponential",
            "--huber_c",
            "0.2",
            "--huber_scale",
            "3",
        ),
    )
    torch.testing.assert_close(exponential, torch.tensor([3.0, 3 * 0.2**0.5, 3 * 0.2**0.999]))

    snr = huber_c_for_timesteps(
        timesteps, schedule, parse("--loss_type", "smooth_l1", "--huber_c", "0.2", "--huber_scale", "3")
    )
    alpha_bar = schedule.scheduler.alphas_cumprod[timesteps]
    sigma = ((1 - alpha_bar) / alpha_bar).sqrt()
    torch.testing.assert_close(snr, 0.8 / (1 + sigma) ** 2 + 0.2)  # huber_scale is not applied, as in kohya
    assert huber_c_for_timesteps(timesteps, schedule, parse()) is None


def test_mask_is_area_resized_and_multiplied():
    loss = torch.ones(1, 4, 2, 2)
    mask = torch.tensor(
        [[[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]]
    )
    masked = apply_mask(loss, mask)
    torch.testing.assert_close(masked[0, 0], torch.tensor([[1.0, 0.0], [0.25, 0.0]]))
    torch.testing.assert_close(apply_mask(loss, mask.unsqueeze(1)), masked)
    conditioning = torch.stack([mask * 2 - 1, torch.zeros_like(mask), torch.zeros_like(mask)], dim=1)
    torch.testing.assert_close(mask_from_conditioning_image(conditioning), mask.unsqueeze(1))


# --- the whole loss ----------------------------------------------------------------------------


def test_plain_l2_is_the_mean_squared_error(schedule, pred_and_target):
    pred, target = pred_and_target
    loss = compute_loss(pred, target, TIMESTEPS, schedule, parse())
    torch.testing.assert_close(loss, torch.nn.functional.mse_loss(pred, target))
    assert loss.dim() == 0 and loss.dtype == torch.float32


def test_half_precision_inputs_give_a_float32_loss(schedule, pred_and_target):
    pred, target = pred_and_target
    loss = compute_loss(pred.half(), target.half(), TIMESTEPS, schedule, parse())
    assert loss.dtype == torch.float32


def test_mask_and_loss_weights_act_per_sample_before_the_mean(schedule, pred_and_target):
    pred, target = pred_and_target
    mask = torch.zeros(3, 6, 6)
    mask[:, :3] = 1.0
    weights = torch.tensor([1.0, 0.5, 0.0])
    loss = compute_loss(pred, target, TIMESTEPS, schedule, parse(), weights, mask)
    top_half = ((pred - target) ** 2)[:, :, :3].sum(dim=(1, 2, 3)) / (4 * 6 * 6)
    torch.testing.assert_close(loss, (top_half * weights).mean())


def test_min_snr_gamma_weights(schedule, pred_and_target):
    pred, target = pred_and_target
    snr = schedule.snr[TIMESTEPS]
    base = per_sample_l2(pred, target)
    eps = compute_loss(pred, target, TIMESTEPS, schedule, parse("--min_snr_gamma", "5"))
    torch.testing.assert_close(eps, (base * torch.clamp(snr, max=5) / snr).mean())
    v = compute_loss(
        pred, target, TIMESTEPS, schedule, parse("--min_snr_gamma", "5", v_parameterization=True)
    )
    torch.testing.assert_close(v, (base * torch.clamp(snr, max=5) / (snr + 1)).mean())
    # kohya tests the option for truthiness: 0 disables it
    zero = compute_loss(pred, target, TIMESTEPS, schedule, parse("--min_snr_gamma", "0"))
    torch.testing.assert_close(zero, base.mean())


def test_v_prediction_scale_v_like_loss_and_debiased_estimation(schedule, pred_and_target):
    pred, target = pred_and_target
    snr = schedule.snr[TIMESTEPS]
    capped = torch.clamp(snr, max=1000)
    scale = capped / (capped + 1)
    base = per_sample_l2(pred, target)

    scaled = compute_loss(
        pred,
        target,
        TIMESTEPS,
        schedule,
        parse("--scale_v_pred_loss_like_noise_pred", v_parameterization=True),
    )
    torch.testing.assert_close(scaled, (base * scale).mean())
    v_like = compute_loss(pred, target, TIMESTEPS, schedule, parse("--v_pred_like_loss", "0.2"))
    torch.testing.assert_close(v_like, (base + base / scale * 0.2).mean())
    debiased = compute_loss(pred, target, TIMESTEPS, schedule, parse("--debiased_estimation_loss"))
    torch.testing.assert_close(debiased, (base / capped.sqrt()).mean())
    debiased_v = compute_loss(
        pred, target, TIMESTEPS, schedule, parse("--debiased_estimation_loss", v_parameterization=True)
    )
    torch.testing.assert_close(debiased_v, (base / (capped + 1)).mean())


def test_options_are_applied_in_kohyas_order(schedule, pred_and_target):
    pred, target = pred_and_target
    weights = torch.tensor([1.0, 2.0, 0.5])
    settings = LossSettings(
        loss_type="huber",
        huber_schedule="exponential",
        min_snr_gamma=5.0,
        v_pred_like_loss=0.3,
        debiased_estimation_loss=True,
    )
    snr = schedule.snr[TIMESTEPS]
    capped = torch.clamp(snr, max=1000)
    c = (0.1 ** (TIMESTEPS / 1000)).float().view(-1, 1, 1, 1)
    loss = (2 * c * (torch.sqrt((pred - target) ** 2 + c**2) - c)).mean(dim=(1, 2, 3))
    loss = loss * weights
    loss = loss * torch.clamp(snr, max=5) / snr
    loss = loss + loss / (capped / (capped + 1)) * 0.3
    loss = loss / capped.sqrt()
    torch.testing.assert_close(
        compute_loss(pred, target, TIMESTEPS, schedule, settings, weights), loss.mean()
    )


def test_zero_terminal_snr_keeps_snr_weights_finite(pred_and_target):
    pred, target = pred_and_target
    schedule = make_training_schedule(v_parameterization=True, zero_terminal_snr=True)
    args = parse("--min_snr_gamma", "5", "--debiased_estimation_loss", v_parameterization=True)
    loss = compute_loss(pred, target, torch.tensor([999, 999, 999]), schedule, args)
    assert math.isfinite(loss.item())
