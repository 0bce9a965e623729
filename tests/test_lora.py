"""kohya LoRA files: layer names, the adapters' arithmetic, and gen_img_diffusers applying them
(with the embeddings they bundle) on the tiny models."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

import gen_img_diffusers as gen_img
from library.errors import UserError
from library.generation import args as generation_args
from library.generation.run import AppliedLoRA, GenerationSettings, Run
from library.models.loading import load_sd_model
from library.networks.lora import (
    LoRAAdapter,
    LoRANetwork,
    default_unet_layers,
    layer_names,
    network_from_file,
    read_lora_file,
)

FAST = ["--W", "64", "--H", "64", "--steps", "2", "--seed", "3", "--sampler", "ddim"]


@pytest.fixture(scope="module")
def sd1_model(tiny_sd1_safetensors):
    return load_sd_model(tiny_sd1_safetensors)


@pytest.fixture(scope="module")
def sdxl_model(tiny_sdxl):
    return load_sd_model(tiny_sdxl / "model.safetensors")


def random_lora(model, dim: int = 4, alpha: float = 2.0, seed: int = 0) -> LoRANetwork:
    """kohya's default UNet layers plus every text-encoder layer, with random up and down weights."""
    torch.manual_seed(seed)
    names = layer_names(model)
    layers = {
        **default_unet_layers(model),
        **{n: m for n, m in names.items() if not n.startswith("lora_unet")},
    }
    network = LoRANetwork.create(layers, dim, alpha)
    with torch.no_grad():
        for adapter in network.adapters.values():
            adapter.lora_up.weight.normal_(std=0.5)
    return network


# --- names -----------------------------------------------------------------------------------


def test_sd1_names_are_kohyas(sd1_model):
    unet = default_unet_layers(sd1_model)
    for name in (
        "lora_unet_down_blocks_0_attentions_0_proj_in",
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_out_0",
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_0_proj",
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_2",
        "lora_unet_mid_block_attentions_0_proj_out",
        "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k",
    ):
        assert name in unet, name
    assert not any("resnets" in name or "conv_in" in name for name in unet)  # transformer blocks only
    text = [n for n in layer_names(sd1_model) if n.startswith("lora_te_")]
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in text
    assert "lora_te_text_model_encoder_layers_0_mlp_fc2" in text


def test_sdxl_names_are_the_ldm_paths_of_the_single_file(sdxl_model, tiny_sdxl):
    """kohya's SDXL UNet keeps the original names: each LoRA layer is a weight of the SAI file."""
    file_layers = {
        key.removeprefix("model.diffusion_model.").removesuffix(".weight").replace(".", "_")
        for key in load_file(tiny_sdxl / "model.safetensors")
        if key.startswith("model.diffusion_model.") and key.endswith(".weight")
    }
    names = layer_names(sdxl_model)
    unet = [n.removeprefix("lora_unet_") for n in names if n.startswith("lora_unet_")]
    assert unet and set(unet) <= file_layers
    defaults = default_unet_layers(sdxl_model)
    # one layer per level here (a real SDXL has two: its first attention is input_blocks_4_1)
    assert "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q" in defaults
    assert "lora_unet_middle_block_1_proj_in" in defaults
    assert "lora_unet_output_blocks_0_1_transformer_blocks_0_ff_net_2" in defaults
    assert any(n.startswith("lora_te1_text_model_encoder_layers_0_") for n in names)
    assert "lora_te2_text_model_encoder_layers_0_self_attn_v_proj" in names


# --- arithmetic ------------------------------------------------------------------------------


@pytest.mark.parametrize("layer", [nn.Linear(6, 5), nn.Conv2d(6, 5, 3, padding=1), nn.Conv2d(6, 5, 1)])
def test_an_adapter_adds_multiplier_times_alpha_over_dim_times_up_down(layer):
    torch.manual_seed(0)
    adapter = LoRAAdapter(layer, dim=3, alpha=1.5)
    assert torch.count_nonzero(adapter.lora_up.weight) == 0  # a new adapter changes nothing
    nn.init.normal_(adapter.lora_up.weight)
    adapter.multiplier = 0.8
    x = torch.randn(2, 6) if isinstance(layer, nn.Linear) else torch.randn(2, 6, 4, 4)
    network = LoRANetwork({"layer": adapter}, {"layer": layer}).attach()
    with torch.no_grad():
        hooked = layer(x)
        network.detach()
        plain = layer(x)
        if isinstance(layer, nn.Linear):
            delta = x @ adapter.lora_down.weight.T @ adapter.lora_up.weight.T
        else:
            delta = nn.functional.conv2d(
                nn.functional.conv2d(x, adapter.lora_down.weight, padding=layer.padding),
                adapter.lora_up.weight,
            )
    torch.testing.assert_close(hooked, plain + 0.8 * 1.5 / 3 * delta)


def test_a_file_round_trips_in_kohyas_keys(sd1_model, tmp_path):
    network = random_lora(sd1_model)
    state = network.kohya_state_dict()
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert {f"{name}.lora_down.weight", f"{name}.lora_up.weight", f"{name}.alpha"} <= set(state)
    assert state[f"{name}.alpha"].ndim == 0 and float(state[f"{name}.alpha"]) == 2.0
    save_file(state, tmp_path / "x.safetensors")
    again = network_from_file(read_lora_file(tmp_path / "x.safetensors"), sd1_model)
    for key, value in again.kohya_state_dict().items():
        torch.testing.assert_close(value, state[key])


# --- refusals --------------------------------------------------------------------------------


def test_files_for_another_model_or_network_are_refused_in_one_line(
    sd1_model, sdxl_model, tiny_sd2_safetensors, tmp_path
):
    xl = tmp_path / "xl.safetensors"
    save_file(random_lora(sdxl_model).kohya_state_dict(), xl)
    with pytest.raises(UserError, match=r"xl.safetensors: a LoRA for SDXL, but the model is SD 1.x;"):
        network_from_file(read_lora_file(xl), sd1_model)
    sd1 = tmp_path / "sd1.safetensors"
    save_file(random_lora(sd1_model).kohya_state_dict(), sd1)
    with pytest.raises(UserError, match=r"a LoRA for SD 1.x/2.x, but the model is SDXL"):
        network_from_file(read_lora_file(sd1), sdxl_model)
    sd2_model = load_sd_model(tiny_sd2_safetensors)  # the same names, other widths
    with pytest.raises(
        UserError, match=r"sd1.safetensors: .* needs .*: a LoRA for another model \(dimension mismatch\)"
    ):
        network_from_file(read_lora_file(sd1), sd2_model)
    loha = tmp_path / "loha.safetensors"
    save_file({"lora_unet_x.hada_w1_a": torch.zeros(2, 2)}, loha)
    with pytest.raises(UserError, match=r"a LyCORIS LoHa network; only kohya's networks.lora"):
        read_lora_file(loha)
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match=r"damaged.safetensors: not a readable .safetensors file"):
        read_lora_file(damaged)
    half = tmp_path / "half.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, half)
    with pytest.raises(UserError, match=r"layer lora_unet_x lacks lora_down or lora_up; the file is damaged"):
        read_lora_file(half)
    pickled = tmp_path / "sd1.pt"
    torch.save(random_lora(sd1_model).kohya_state_dict(), pickled)  # kohya also writes .ckpt/.pt
    assert len(network_from_file(read_lora_file(pickled), sd1_model).adapters) > 0
    unknown = tmp_path / "unknown.safetensors"
    save_file(
        {"lora_vae_x.lora_down.weight": torch.zeros(2, 2), "lora_vae_x.lora_up.weight": torch.zeros(2, 2)},
        unknown,
    )
    with pytest.raises(UserError, match=r"layer lora_vae_x is not in this model: a LoRA for another model"):
        network_from_file(read_lora_file(unknown), sd1_model)
    empty = tmp_path / "emb.safetensors"
    save_file({"emb_params": torch.zeros(1, 32)}, empty)
    with pytest.raises(UserError, match=r"emb.safetensors: not a LoRA file"):
        read_lora_file(empty)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--network_weights", "a.safetensors"], "--network_module names 0 module"),
        (
            ["--network_module", "lycoris.kohya", "--network_weights", "a.safetensors"],
            "--network_module lycoris.kohya: only",
        ),
        (
            ["--network_module", "networks.lora", "--network_weights", "missing.safetensors"],
            "missing.safetensors: file not found",
        ),
        (["--network_mul", "0.5"], "--network_mul: give the LoRA files"),
        (["--network_args", "conv_dim=4"], "--network_args: this network option is not supported"),
    ],
)
def test_network_options_are_checked_before_the_model_loads(argv, message):
    with pytest.raises(UserError, match=message):
        generation_args.settings_from_command_line(["--ckpt", "unused", "--prompt", "x", *argv])


def test_kohyas_lora_speed_options_are_accepted_and_named_in_the_log(monkeypatch, caplog):
    monkeypatch.setattr(generation_args, "setup_console_logging", lambda settings: None)
    with caplog.at_level(logging.INFO):
        generation_args.settings_from_command_line(["--ckpt", "m", "--prompt", "x", "--network_merge"])
    assert (
        "--network_merge: LoRA files are applied beside the weights; the images are the same" in caplog.text
    )


# --- generation ------------------------------------------------------------------------------


def test_a_prompts_strengths_follow_kohyas_rule(caplog):
    two = Run(
        GenerationSettings(), None, None, {}, loras=[AppliedLoRA("a", None, 0.7), AppliedLoRA("b", None, 1)]
    )
    assert two.lora_strengths(None) == (0.7, 1.0)  # --network_mul
    assert two.lora_strengths([0.2]) == (0.2, 0.2)  # the last strength repeats
    assert two.lora_strengths([0.2, -1, 3]) == (0.2, -1.0)
    assert "--am gives 3 strengths for 2 LoRA file(s)" in caplog.text
    assert Run(GenerationSettings(), None, None, {}).lora_strengths([0.5]) == ()
    assert "--am: no LoRA file is applied" in caplog.text


def test_the_generator_applies_a_lora_at_its_strength_and_reads_its_bundled_embedding(
    sd1_model, tiny_sd1_safetensors, tmp_path, monkeypatch, caplog
):
    monkeypatch.setattr(generation_args, "setup_console_logging", lambda settings: None)
    state = random_lora(sd1_model).kohya_state_dict()
    torch.manual_seed(1)
    state["bundle_emb.glyph.string_to_param.*"] = torch.randn(2, sd1_model.text_dim)  # as the WebUI reads it
    lora = tmp_path / "style.safetensors"
    save_file(state, lora, metadata={"ss_network_module": "networks.lora", "ss_network_dim": "4"})

    def generate(name: str, prompt: str, *network: str) -> np.ndarray:
        out = tmp_path / name
        gen_img.main(
            ["--ckpt", str(tiny_sd1_safetensors), "--prompt", prompt, "--outdir", str(out), *FAST, *network]
        )
        (png,) = sorted(out.glob("*.png"))
        with Image.open(png) as image:
            return np.asarray(image).astype(int)

    with_lora = ["--network_module", "networks.lora", "--network_weights", str(lora)]
    plain = generate("plain", "a cat --d 5")
    with caplog.at_level(logging.INFO):
        at_one = generate("one", "a cat --d 5", *with_lora, "--network_show_meta")
        glyph = generate("glyph", "a glyph", *with_lora)
    assert np.abs(plain - at_one).mean() > 1
    # --network_mul 0 for the run; a prompt's --am overrides it for that prompt only
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat --d 5\na cat --d 5 --am 1\na cat --d 5 --am 0,2\n")
    out = tmp_path / "am"
    run = ["--ckpt", str(tiny_sd1_safetensors), "--from_file", str(prompts), "--outdir", str(out)]
    gen_img.main([*run, "--sequential_file_name", *FAST, *with_lora, "--network_mul", "0"])
    pngs = sorted(out.glob("*.png"))
    images = []
    for png in pngs:
        with Image.open(png) as image:
            images.append((np.asarray(image).astype(int), image.text["networks"]))
    assert np.array_equal(images[0][0], plain) and images[0][1] == "style.safetensors:0"  # adds nothing
    assert np.array_equal(images[1][0], at_one) and images[1][1] == "style.safetensors:1"
    assert np.array_equal(images[2][0], plain)  # the first strength is the file's; the extra warns
    assert "--am gives 2 strengths for 1 LoRA file(s)" in caplog.text
    assert "ss_network_dim: 4" in caplog.text
    assert "layers at strength 1" in caplog.text
    assert "word 'glyph', 2 vector(s)" in caplog.text  # the bundled word is a word of the prompt
    del state["bundle_emb.glyph.string_to_param.*"]
    unbundled = tmp_path / "unbundled.safetensors"
    save_file(state, unbundled)
    glyph_as_text = generate(
        "text", "a glyph", "--network_module", "networks.lora", "--network_weights", str(unbundled)
    )
    assert not np.array_equal(glyph, glyph_as_text)


def test_an_sdxl_lora_and_its_bundled_pair_are_applied(sdxl_model, tiny_sdxl, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(generation_args, "setup_console_logging", lambda settings: None)
    state = random_lora(sdxl_model).kohya_state_dict()
    torch.manual_seed(2)
    state["bundle_emb.glyph.clip_l"] = torch.randn(1, 32)  # the WebUI's SDXL keys
    state["bundle_emb.glyph.clip_g"] = torch.randn(1, 64)
    lora = tmp_path / "xl.safetensors"
    save_file(state, lora)
    outputs = []
    for name, network in (
        ("plain", []),
        ("lora", ["--network_module", "networks.lora", "--network_weights", str(lora)]),
    ):
        out = tmp_path / name
        with caplog.at_level(logging.INFO):
            gen_img.main(
                [
                    "--ckpt",
                    str(tiny_sdxl / "model.safetensors"),
                    "--prompt",
                    "a glyph",
                    "--outdir",
                    str(out),
                    *FAST,
                    *network,
                ]
            )
        (png,) = sorted(out.glob("*.png"))
        with Image.open(png) as image:
            outputs.append(np.asarray(image).astype(int))
    assert np.abs(outputs[0] - outputs[1]).mean() > 1
    assert "word 'glyph', 1 vector(s) (sdxl layout)" in caplog.text
