"""library.generation.generator: kohya's samplers, prompt embeddings, seeds, img2img/inpaint/highres, negative scale."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from library.errors import UserError
from library.generation.generator import (
    SAMPLERS,
    GenerationRequest,
    HighresFix,
    ImageGenerator,
    _NegativeScaleUNet,
    make_scheduler,
)
from library.generation.prompts import SAMPLERS as PROMPT_SAMPLERS
from library.generation.prompts import PromptSpec
from library.models.loading import load_sd_model
from library.text.conditioning import Conditioning

SIZE = {"width": 64, "height": 64, "steps": 2}


@pytest.fixture(scope="module")
def sd1(tiny_sd1_safetensors):
    return load_sd_model(tiny_sd1_safetensors)


@pytest.fixture(scope="module")
def generator(sd1):
    return ImageGenerator(sd1, clip_skip=None, max_embeddings_multiples=3)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


# --- samplers ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(SAMPLERS))
@pytest.mark.parametrize("v_parameterization", [False, True])
def test_every_kohya_sampler_constructs_a_scheduler(sd1, name, v_parameterization):
    scheduler = make_scheduler(name, sd1.scheduler_config, v_parameterization)
    assert type(scheduler) is SAMPLERS[name][0]
    assert scheduler.config.prediction_type == ("v_prediction" if v_parameterization else "epsilon")
    assert scheduler.config.beta_schedule == "scaled_linear"
    assert scheduler.config.beta_start == pytest.approx(0.00085)
    scheduler.set_timesteps(4)  # usable, not only constructible


def test_sampler_names_are_kohyas_and_match_the_prompt_parser():
    assert set(SAMPLERS) == set(PROMPT_SAMPLERS)
    assert SAMPLERS["k_euler_a"][0] is SAMPLERS["euler_a"][0]
    assert SAMPLERS["dpmsolver"][1]["algorithm_type"] == "dpmsolver"
    assert SAMPLERS["dpmsolver++"][1]["algorithm_type"] == "dpmsolver++"


def test_unknown_sampler_is_a_user_error_listing_the_valid_ones(sd1):
    with pytest.raises(UserError, match="unknown sampler 'ddpm'.*euler_a.*k_dpm_2_a"):
        make_scheduler("ddpm", sd1.scheduler_config, False)


# --- prompt embeddings ------------------------------------------------------------------------


def test_attention_weights_change_the_embeddings_and_weight_one_does_not(generator):
    plain, weighted, neutral = generator.encode(["a cat", "a (cat:1.5)", "a (cat:1.0)"]).hidden
    assert not torch.allclose(plain, weighted)
    assert torch.equal(plain, neutral)


def test_long_prompts_use_chunks_and_prompt_and_negative_get_one_length(generator):
    long_prompt = ", ".join(["a red cat"] * 25)  # 99 tokens: two chunks
    embeds = generator.encode([long_prompt, "blurry"]).hidden
    assert embeds.shape[:2] == (2, 2 + 75 * 2)
    short = generator.encode(["blurry"]).hidden
    assert short.shape[1] == 77


def test_clip_skip_changes_the_embeddings(sd1):
    last = ImageGenerator(sd1).encode(["a cat"]).hidden
    skipped = ImageGenerator(sd1, clip_skip=2).encode(["a cat"]).hidden
    assert not torch.allclose(last, skipped)


def test_placeholder_words_expand_to_all_their_vectors(tiny_sd1_safetensors):
    model = load_sd_model(tiny_sd1_safetensors)
    model.tokenizer.add_tokens(["mychar", "mychar1", "mychar2"])
    model.text_encoder.resize_token_embeddings(len(model.tokenizer))
    expanded = ImageGenerator(model, placeholder_vectors={"mychar": 3}).encode(["a mychar cat"]).hidden
    spelled_out = ImageGenerator(model).encode(["a mychar mychar1 mychar2 cat"]).hidden
    one_vector = ImageGenerator(model).encode(["a mychar cat"]).hidden
    assert torch.equal(expanded, spelled_out)
    assert not torch.allclose(expanded, one_vector)


@pytest.mark.parametrize("value", [0, 4])
def test_max_embeddings_multiples_outside_1_to_3_is_a_user_error(sd1, value):
    with pytest.raises(UserError, match="--max_embeddings_multiples"):
        ImageGenerator(sd1, max_embeddings_multiples=value)


# --- seeds ------------------------------------------------------------------------------------


def test_same_seed_gives_the_same_image_and_other_seeds_differ(generator):
    first = generator.generate(GenerationRequest("a cat", seeds=[11, 12], **SIZE))
    again = generator.generate(GenerationRequest("a cat", seeds=[11, 12], **SIZE))
    assert np.array_equal(pixels(first[0]), pixels(again[0]))
    assert not np.array_equal(pixels(first[0]), pixels(first[1]))


def test_an_image_depends_on_its_seed_not_on_its_place_in_the_batch(generator):
    alone = generator.generate(GenerationRequest("a cat", seeds=[5], output_type="latent", **SIZE))
    second = generator.generate(GenerationRequest("a cat", seeds=[9, 5], output_type="latent", **SIZE))
    torch.testing.assert_close(alone[0], second[1], atol=1e-4, rtol=1e-4)


def test_generation_leaves_the_global_rng_alone(generator):
    state = torch.get_rng_state()
    generator.generate(GenerationRequest("a cat", seeds=None, sampler="euler_a", **SIZE))
    assert torch.equal(state, torch.get_rng_state())


def test_ancestral_sampler_is_reproducible_with_a_seed(generator):
    request = GenerationRequest("a cat", seeds=[3], sampler="k_euler_a", **SIZE)
    assert np.array_equal(pixels(generator.generate(request)[0]), pixels(generator.generate(request)[0]))


@pytest.mark.parametrize(("sampler", "noises_per_step"), [("euler_a", 1), ("dpm_2_a", 2)])
def test_an_ancestral_sampler_draws_its_noise_as_kohyas_generator_does(
    sd1, generator, sampler, noises_per_step
):
    """kohya's generator: manual_seed(seed); start = randn; one randn per step (two for dpm_2_a) it never
    uses (its hook misses diffusers' randn_tensor); the sampler then draws its step noise from the
    global generator. Rebuilt here with the global generator and the pipeline itself; our image must
    be the same (checked against kohya's gen_img.py itself in docs/generation.md)."""
    seed, steps, size = 647892279, 4, {"width": 64, "height": 64}
    ours = generator.generate(GenerationRequest("a cat", seeds=[seed], sampler=sampler, steps=steps, **size))[
        0
    ]
    pipe = generator.txt2img
    pipe.scheduler = make_scheduler(sampler, sd1.scheduler_config, False)
    embeds = generator.encode(["a cat", ""]).hidden
    saved = torch.get_rng_state()
    try:
        torch.manual_seed(seed)
        shape = (1, 4, size["height"] // 8, size["width"] // 8)
        start = torch.randn(shape)
        for _ in range(steps * noises_per_step):
            torch.randn(shape)
        kohya = pipe(
            prompt_embeds=embeds[:1],
            negative_prompt_embeds=embeds[1:],
            latents=start,
            generator=None,
            num_inference_steps=steps,
            guidance_scale=7.5,
            **size,
        ).images[0]
    finally:
        torch.set_rng_state(saved)
    assert np.array_equal(pixels(ours), pixels(kohya))


def test_samplers_are_built_as_kohya_builds_them(sd1):
    """kohya: the scheduler class's own defaults with SD's betas, steps_offset 1 and clip_sample off; for
    DDIM that keeps set_alpha_to_one on (the model's own config says off), so the last step lands
    on the clean image as in kohya's pictures."""
    ddim = make_scheduler("ddim", sd1.scheduler_config, False)
    assert ddim.config.set_alpha_to_one is True and ddim.config.steps_offset == 1
    assert ddim.config.clip_sample is False and ddim.config.beta_schedule == "scaled_linear"


# --- guidance ---------------------------------------------------------------------------------


class _LinearUNet(torch.nn.Module):
    """Stands in for a UNet: the prediction is the mean of the text embedding, per sample."""

    config = None

    def forward(self, sample, timestep, encoder_hidden_states, return_dict=True):
        return (sample * 0 + encoder_hidden_states.mean(dim=(1, 2))[:, None, None, None],)


def test_negative_scale_wrapper_gives_kohyas_three_way_guidance():
    u, g, t = torch.tensor(0.3), torch.tensor(-0.7), torch.tensor(1.9)
    embeds = {name: torch.full((1, 4, 2), float(v)) for name, v in (("u", u), ("g", g), ("t", t))}
    scale, negative_scale = 7.5, 3.0
    wrapper = _NegativeScaleUNet(_LinearUNet(), Conditioning(embeds["u"]), scale, negative_scale)
    sample = torch.zeros(2, 4, 2, 2)
    out = wrapper(sample, torch.tensor(10), encoder_hidden_states=torch.cat([embeds["g"], embeds["t"]]))[0]
    first, second = out.chunk(2)
    diffusers_cfg = first + scale * (second - first)  # what the pipeline does with the two halves
    kohya = u + scale * (t - u) - negative_scale * (g - u)
    torch.testing.assert_close(diffusers_cfg, torch.full_like(diffusers_cfg, float(kohya)))


def test_negative_scale_changes_the_image_and_the_unet_is_restored(generator):
    base = GenerationRequest("a cat", negative_prompt="a dog", seeds=[4], **SIZE)
    plain = generator.generate(base)[0]
    scaled = generator.generate(GenerationRequest(**{**base.__dict__, "negative_scale": 3.0}))[0]
    assert not np.array_equal(pixels(plain), pixels(scaled))
    assert generator.txt2img.unet is generator.unet


# --- img2img, inpainting, highres fix ---------------------------------------------------------


@pytest.fixture(scope="module")
def source_image(generator):
    return generator.generate(GenerationRequest("a house", seeds=[1], **SIZE))[0]


def test_img2img_depends_on_the_source_image_and_on_strength(generator, source_image):
    # the tiny VAE is random, so "close to the source" means nothing; dependence does
    request = GenerationRequest("a house", seeds=[2], init_image=source_image, strength=0.5, **SIZE)
    result = generator.generate(request)[0]
    other_source = generator.generate(
        GenerationRequest(**{**request.__dict__, "init_image": source_image.rotate(90)})
    )
    stronger = generator.generate(GenerationRequest(**{**request.__dict__, "strength": 1.0}))[0]
    assert result.size == (64, 64)
    assert not np.array_equal(pixels(result), pixels(other_source[0]))
    assert not np.array_equal(pixels(result), pixels(stronger))
    too_weak = generator.generate(GenerationRequest(**{**request.__dict__, "strength": 0.1}))[0]
    assert too_weak.size == (64, 64)  # 0.1 x 2 steps: still one step, not a crash


def test_inpainting_repaints_only_the_masked_area(generator, source_image):
    def inpaint(mask: Image.Image) -> np.ndarray:
        request = GenerationRequest(
            "a tree", seeds=[2], init_image=source_image, mask_image=mask, strength=1.0, **SIZE
        )
        return pixels(generator.generate(request)[0])

    left_half = Image.new("L", (64, 64), 0)
    left_half.paste(255, (0, 0, 32, 64))  # white = repaint
    everything = Image.new("L", (64, 64), 255)
    difference = np.abs(inpaint(left_half) - inpaint(everything)).mean(axis=(0, 2))  # per column
    # where both repaint (left) the results agree more than where one kept the source (right)
    assert difference[:16].mean() < difference[48:].mean()


def test_img2img_resizes_the_source_to_the_requested_size(generator, source_image):
    big = source_image.resize((96, 80))
    out = generator.generate(GenerationRequest("x", seeds=[1], init_image=big, strength=0.5, **SIZE))[0]
    assert out.size == (64, 64)


@pytest.mark.parametrize("latents_upscaling", [False, True])
def test_highres_fix_renders_small_then_refines_at_full_size(generator, latents_upscaling):
    fix = HighresFix(scale=0.5, steps=2, latents_upscaling=latents_upscaling, keep_first=True)
    result = generator.generate_highres(GenerationRequest("a cat", seeds=[8], **SIZE), fix)
    assert [image.size for image in result.first_pass] == [(32, 32)]
    assert [image.size for image in result.images] == [(64, 64)]


def test_vae_batch_size_decodes_in_slices_with_the_same_result(sd1):
    whole = ImageGenerator(sd1).generate(GenerationRequest("a cat", seeds=[1, 2, 3], **SIZE))
    sliced = ImageGenerator(sd1, vae_batch_size=2).generate(
        GenerationRequest("a cat", seeds=[1, 2, 3], **SIZE)
    )
    for a, b in zip(whole, sliced):
        assert np.abs(pixels(a) - pixels(b)).max() <= 1


def test_width_not_a_multiple_of_8_is_rounded_down_with_a_warning(generator, caplog):
    images = generator.generate(GenerationRequest("a cat", seeds=[1], width=70, height=64, steps=2))
    assert images[0].size == (64, 64)
    assert "width 70 is not a multiple of 8" in caplog.text


# --- how the trainer calls it -----------------------------------------------------------------


def test_trainer_style_call_with_a_prompt_spec(tiny_sd1_safetensors):
    model = load_sd_model(tiny_sd1_safetensors)
    tokenizer = model.tokenizer
    tokenizer.add_tokens(["tok", "tok1"])
    model.text_encoder.resize_token_embeddings(len(tokenizer))
    generator = ImageGenerator(
        model,
        tokenizers=[tokenizer],
        clip_skip=2,
        max_embeddings_multiples=2,
        device="cpu",
        dtype=torch.float32,
        placeholder_vectors={"tok": 2},
    )
    spec = PromptSpec(
        "a photo of tok --n blurry",
        negative_prompt="blurry",
        width=64,
        height=64,
        steps=2,
        seeds=[21],
        scale=7.5,
        sampler="euler_a",
    )
    with torch.no_grad():
        images = generator.generate(spec)
        again = generator.generate(spec)
    assert len(images) == 1 and images[0].size == (64, 64)
    assert np.array_equal(pixels(images[0]), pixels(again[0]))


def test_dtype_casts_unet_and_vae_but_not_the_text_encoder_and_close_restores(tiny_sd1_safetensors):
    model = load_sd_model(tiny_sd1_safetensors)
    with ImageGenerator(model, dtype=torch.bfloat16) as generator:
        assert model.unet.dtype == torch.bfloat16 and model.vae.dtype == torch.bfloat16
        assert model.text_encoder.dtype == torch.float32
        assert generator.txt2img.unet is model.unet  # the pipelines share the modules
        assert generator.img2img.vae is model.vae and generator.inpaint.unet is model.unet
    assert model.unet.dtype == torch.float32 and model.vae.dtype == torch.float32
