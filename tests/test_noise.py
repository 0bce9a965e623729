"""Tests for library/training/noise.py: kohya's noise schedule, noise options, timesteps and targets."""

from __future__ import annotations

import argparse
import logging

import pytest
import torch

from library.errors import UserError
from library.options import settings_from
from library.training.noise import (
    NoiseSettings,
    add_noise,
    add_noise_arguments,
    make_noise_scheduler,
    make_training_schedule,
    sample_noise_and_timesteps,
    snr_of,
    training_target,
)

SHAPE = (2, 4, 8, 8)


def parse(*argv: str) -> NoiseSettings:
    """Settings from a command line, as the trainer builds them (checked on construction)."""
    parser = argparse.ArgumentParser()
    add_noise_arguments(parser)
    return settings_from(NoiseSettings, parser.parse_args(list(argv)))


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def schedule():
    return make_training_schedule(v_parameterization=False, zero_terminal_snr=False)


@pytest.fixture
def latents():
    return torch.randn(SHAPE, generator=gen(123))


# --- options -----------------------------------------------------------------------------------


def test_noise_arguments_have_kohyas_names_types_and_defaults():
    parser = argparse.ArgumentParser()
    add_noise_arguments(parser)
    assert vars(parser.parse_args([])) == {
        "noise_offset": None,
        "noise_offset_random_strength": False,
        "adaptive_noise_scale": None,
        "multires_noise_iterations": None,
        "multires_noise_discount": 0.3,
        "ip_noise_gamma": None,
        "ip_noise_gamma_random_strength": False,
        "zero_terminal_snr": False,
        "min_timestep": None,
        "max_timestep": None,
    }
    assert (parse().min_timestep, parse().max_timestep) == (0, 1000)  # resolved to kohya's range
    args = parse(
        "--noise_offset",
        "0.1",
        "--multires_noise_iterations",
        "6",
        "--min_timestep",
        "5",
        "--max_timestep",
        "900",
    )
    assert (args.noise_offset, args.multires_noise_iterations, args.min_timestep, args.max_timestep) == (
        0.1,
        6,
        5,
        900,
    )


def test_adaptive_noise_scale_needs_noise_offset():
    with pytest.raises(UserError, match="--adaptive_noise_scale needs --noise_offset"):
        parse("--adaptive_noise_scale", "0.05")
    parse("--adaptive_noise_scale", "0.05", "--noise_offset", "0.1")


def test_noise_offset_with_multires_is_allowed_like_current_kohya():
    parse("--noise_offset", "0.1", "--multires_noise_iterations", "6")


@pytest.mark.parametrize(
    "argv, message",
    [
        (("--min_timestep", "600", "--max_timestep", "500"), "--min_timestep .* --max_timestep"),
        (("--min_timestep", "1000"), "--min_timestep must be between 0 and 999"),
        (("--max_timestep", "0"), "--max_timestep must be between 1 and 1000"),
        (("--max_timestep", "1001"), "--max_timestep must be between 1 and 1000"),
        (("--multires_noise_iterations", "-1"), "--multires_noise_iterations"),
    ],
)
def test_bad_noise_options_are_user_errors(argv, message):
    with pytest.raises(UserError, match=message):
        parse(*argv)


def test_options_without_effect_are_warned_about(caplog):
    with caplog.at_level(logging.WARNING):
        parse("--noise_offset_random_strength", "--ip_noise_gamma_random_strength").warn_about_unused(True)
    assert "--noise_offset_random_strength has no effect" in caplog.text
    assert "--ip_noise_gamma_random_strength has no effect" in caplog.text


# --- schedule ----------------------------------------------------------------------------------


def test_scheduler_is_kohyas_training_schedule():
    scheduler = make_noise_scheduler(v_parameterization=True, zero_terminal_snr=False)
    config = scheduler.config
    assert (config.beta_start, config.beta_end, config.beta_schedule) == (0.00085, 0.012, "scaled_linear")
    assert (config.num_train_timesteps, config.clip_sample, config.prediction_type) == (
        1000,
        False,
        "v_prediction",
    )
    assert make_noise_scheduler(False, False).config.prediction_type == "epsilon"


def reference_zero_terminal_snr_betas(betas: torch.Tensor) -> torch.Tensor:
    """Algorithm 1 of arxiv.org/abs/2305.08891, the rule kohya applies, written out independently."""
    sqrt_alpha_bar = torch.cumprod(1 - betas, dim=0).sqrt()
    first, last = sqrt_alpha_bar[0].clone(), sqrt_alpha_bar[-1].clone()
    sqrt_alpha_bar = (sqrt_alpha_bar - last) * (first / (first - last))
    alpha_bar = sqrt_alpha_bar**2
    alphas = torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1 - alphas


def test_zero_terminal_snr_matches_kohyas_rescale_rule():
    plain = make_noise_scheduler(False, False)
    rescaled = make_noise_scheduler(False, True)
    expected_betas = reference_zero_terminal_snr_betas(plain.betas.clone())
    torch.testing.assert_close(rescaled.betas, expected_betas, rtol=0, atol=0)
    torch.testing.assert_close(rescaled.alphas_cumprod, torch.cumprod(1 - expected_betas, 0), rtol=0, atol=0)
    assert rescaled.alphas_cumprod[-1] == 0
    torch.testing.assert_close(rescaled.alphas_cumprod[0], plain.alphas_cumprod[0])


def test_loss_snr_is_taken_before_zero_terminal_snr_like_kohya():
    plain = make_training_schedule(False, False)
    rescaled = make_training_schedule(False, True)
    torch.testing.assert_close(rescaled.snr, plain.snr, rtol=0, atol=0)
    assert torch.isfinite(rescaled.snr).all()
    assert rescaled.alphas_cumprod[-1] == 0  # the noise itself uses the rescaled schedule
    expected = plain.scheduler.alphas_cumprod / (1 - plain.scheduler.alphas_cumprod)
    torch.testing.assert_close(plain.snr, expected)
    torch.testing.assert_close(snr_of(torch.tensor([0.5])), torch.tensor([1.0]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_add_noise_and_velocity_match_diffusers(schedule, latents, dtype):
    noise = torch.randn(SHAPE, generator=gen(1)).to(dtype)
    x = latents.to(dtype)
    timesteps = torch.tensor([0, 999])
    reference = make_noise_scheduler(True, False)
    torch.testing.assert_close(
        add_noise(schedule, x, noise, timesteps), reference.add_noise(x, noise, timesteps), rtol=0, atol=0
    )
    velocity = training_target(schedule, x, noise, timesteps, v_parameterization=True)
    torch.testing.assert_close(velocity, reference.get_velocity(x, noise, timesteps), rtol=0, atol=0)
    assert training_target(schedule, x, noise, timesteps, v_parameterization=False) is noise


# --- sampling ----------------------------------------------------------------------------------


def test_plain_noise_is_the_generators_first_gaussian_draw(schedule, latents):
    noisy, noise, timesteps = sample_noise_and_timesteps(latents, schedule, parse(), gen(7))
    reference = gen(7)
    torch.testing.assert_close(noise, torch.randn(SHAPE, generator=reference), rtol=0, atol=0)
    torch.testing.assert_close(timesteps, torch.randint(0, 1000, (2,), generator=reference), rtol=0, atol=0)
    assert timesteps.dtype == torch.long
    torch.testing.assert_close(noisy, add_noise(schedule, latents, noise, timesteps))


def test_same_seed_same_step_and_generator_state_resumes(schedule, latents):
    settings = parse("--noise_offset", "0.1", "--ip_noise_gamma", "0.1")
    first = gen(3)
    sample_noise_and_timesteps(latents, schedule, settings, first)
    saved = first.get_state()
    expected = sample_noise_and_timesteps(latents, schedule, settings, first)

    resumed = torch.Generator()
    resumed.set_state(saved)
    again = sample_noise_and_timesteps(latents, schedule, settings, resumed)
    for a, b in zip(expected, again):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    other = sample_noise_and_timesteps(latents, schedule, settings, gen(4))
    assert not torch.equal(other[1], expected[1])


def test_global_rng_is_used_without_a_generator(schedule, latents):
    torch.manual_seed(11)
    a = sample_noise_and_timesteps(latents, schedule, parse())
    torch.manual_seed(11)
    b = sample_noise_and_timesteps(latents, schedule, parse())
    torch.testing.assert_close(a[1], b[1], rtol=0, atol=0)


def test_timestep_range_and_fixed_timestep(schedule, latents):
    big = torch.zeros(256, 4, 1, 1)
    _, _, timesteps = sample_noise_and_timesteps(
        big, schedule, parse("--min_timestep", "100", "--max_timestep", "110"), gen()
    )
    assert timesteps.min() >= 100 and timesteps.max() <= 109 and len(set(timesteps.tolist())) > 5
    _, _, fixed = sample_noise_and_timesteps(
        latents, schedule, parse("--min_timestep", "500", "--max_timestep", "500"), gen()
    )
    assert fixed.tolist() == [500, 500]


@pytest.mark.parametrize("random_strength", [False, True])
def test_noise_offset_adds_a_per_channel_constant(schedule, latents, random_strength):
    argv = ["--noise_offset", "0.2"] + (["--noise_offset_random_strength"] if random_strength else [])
    _, noise, _ = sample_noise_and_timesteps(latents, schedule, parse(*argv), gen(5))

    reference = gen(5)
    base = torch.randn(SHAPE, generator=reference)
    strength = torch.rand(1, generator=reference) * 0.2 if random_strength else 0.2
    offset = strength * torch.randn(2, 4, 1, 1, generator=reference)
    torch.testing.assert_close(noise, base + offset)
    assert (noise - base).std(dim=(2, 3)).max() < 1e-6


def test_adaptive_noise_scale_grows_the_offset_with_the_latent_mean(schedule, latents):
    shifted = latents + 3.0
    args = parse("--noise_offset", "0.1", "--adaptive_noise_scale", "0.5")
    _, noise, _ = sample_noise_and_timesteps(shifted, schedule, args, gen(5))

    reference = gen(5)
    base = torch.randn(SHAPE, generator=reference)
    strength = torch.clamp(0.1 + 0.5 * shifted.mean(dim=(2, 3), keepdim=True).abs(), min=0)
    torch.testing.assert_close(noise, base + strength * torch.randn(2, 4, 1, 1, generator=reference))


def test_negative_adaptive_scale_never_makes_the_offset_negative(schedule, latents):
    args = parse("--noise_offset", "0.1", "--adaptive_noise_scale", "-100")
    _, noise, _ = sample_noise_and_timesteps(latents + 3.0, schedule, args, gen(5))
    torch.testing.assert_close(noise, torch.randn(SHAPE, generator=gen(5)))  # strength clamped to 0


def test_multires_noise_follows_kohyas_pyramid(schedule, latents):
    args = parse("--multires_noise_iterations", "3", "--multires_noise_discount", "0.4")
    _, noise, _ = sample_noise_and_timesteps(latents, schedule, args, gen(9))

    reference = gen(9)
    expected = torch.randn(SHAPE, generator=reference)
    factors = (torch.rand(3, generator=reference) * 2 + 2).tolist()
    for level, factor in enumerate(factors):
        size = (max(1, int(8 / factor**level)), max(1, int(8 / factor**level)))
        low = torch.randn(2, 4, *size, generator=reference)
        expected += torch.nn.functional.interpolate(low, size=(8, 8), mode="bilinear") * 0.4**level
        if 1 in size:
            break
    expected = expected / expected.std()
    torch.testing.assert_close(noise, expected)
    assert noise.std().item() == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("random_strength", [False, True])
def test_ip_noise_gamma_perturbs_the_input_but_not_the_target(schedule, latents, random_strength):
    argv = ["--ip_noise_gamma", "0.1"] + (["--ip_noise_gamma_random_strength"] if random_strength else [])
    noisy, noise, timesteps = sample_noise_and_timesteps(latents, schedule, parse(*argv), gen(2))
    _, plain_noise, plain_timesteps = sample_noise_and_timesteps(latents, schedule, parse(), gen(2))
    torch.testing.assert_close(noise, plain_noise, rtol=0, atol=0)
    torch.testing.assert_close(timesteps, plain_timesteps, rtol=0, atol=0)

    reference = gen(2)
    torch.randn(SHAPE, generator=reference)
    torch.randint(0, 1000, (2,), generator=reference)
    strength = torch.rand(1, generator=reference) * 0.1 if random_strength else 0.1
    perturbed = noise + strength * torch.randn(SHAPE, generator=reference)
    torch.testing.assert_close(noisy, add_noise(schedule, latents, perturbed, timesteps))
    assert not torch.allclose(noisy, add_noise(schedule, latents, noise, timesteps))


def test_noise_keeps_the_latents_dtype(schedule):
    half = torch.randn(SHAPE, generator=gen()).half()
    noisy, noise, _ = sample_noise_and_timesteps(half, schedule, parse(), gen())
    assert noise.dtype == torch.float16 and noisy.dtype == torch.float16


def test_a_step_does_not_touch_the_cached_schedule(schedule, latents):
    cached = schedule.alphas_cumprod
    before = cached.clone()
    sample_noise_and_timesteps(latents, schedule, parse("--multires_noise_iterations", "2"), gen())
    assert schedule.alphas_cumprod is cached and torch.equal(cached, before)
