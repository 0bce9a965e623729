"""Pivotal tuning through the real trainer CLIs: a UNet LoRA trained beside the word, its kohya
file (layers, ss_* metadata, the word bundled), the pivot, continuing, refusals, and every
client's rule for finding the layers (diffusers' own conversion run). Two processes and resume:
the lock-step test in test_train_cli.py."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate import init_empty_weights
from cli_helpers import common, picture_folder, run_train
from diffusers import UNet2DConditionModel
from lora_client_rules import (
    comfyui_key_map,
    diffusers_loadable,
    fits,
    ldm_unet_modules,
    webui_module,
)
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from library.errors import UserError
from library.models.family import SD1
from library.models.ldm_export import unet_key_to_ldm
from library.models.loading import base_config, load_sd_model
from library.networks.lora import default_unet_layers, network_from_file, read_lora_file
from library.training.args import settings_from_command_line
from library.training.pivotal import UNetLoRA
from library.training.state import check_resume

data = picture_folder(4)

PIVOTAL = [
    "--token_string=mychar4",
    "--init_word=toy",
    "--learning_rate=1e-2",
    "--save_model_as=safetensors",
    "--network_module=networks.lora",
    "--network_dim=4",
    "--network_alpha=2",
    "--unet_lr=1e-3",
]


def lora_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}, dict(f.metadata())


CONV = ["--network_args", "conv_dim=2", "conv_alpha=1"]  # kohya's 3x3 convolutions, at their own rank


@pytest.fixture(scope="module")
def sd1_run(data, tiny_sd1, tmp_path_factory) -> Path:
    """6 steps, saved every 3 with states; the vectors train for the first half; the 3x3
    convolutions adapted too."""
    out = tmp_path_factory.mktemp("pivotal")
    run_train(
        *common(data, out, tiny_sd1 / "model.safetensors"),
        *PIVOTAL,
        *CONV,
        "--max_train_steps=6",
        "--save_every_n_steps=3",
        "--save_state",
        "--train_vectors_fraction=0.5",
    )
    return out


@pytest.fixture(scope="module")
def sdxl_run(data, tiny_sdxl, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pivotal-sdxl")
    run_train(*common(data, out, tiny_sdxl / "model.safetensors"), *PIVOTAL, "--max_train_steps=2", sdxl=True)
    return out


@pytest.fixture(scope="module")
def sd1_model(tiny_sd1):
    return load_sd_model(tiny_sd1 / "model.safetensors")


def test_a_pivotal_run_writes_a_kohya_lora_with_the_word_bundled(sd1_run, sd1_model):
    names = sorted(p.name for p in sd1_run.glob("*.safetensors"))
    assert names == [
        "mychar4-step00000003.safetensors",
        "mychar4-step00000006.safetensors",
        "mychar4.safetensors",
        "mychar4_lora-step00000003.safetensors",
        "mychar4_lora-step00000006.safetensors",
        "mychar4_lora.safetensors",
    ]
    tensors, metadata = lora_file(sd1_run / "mychar4_lora.safetensors")
    layers = default_unet_layers(sd1_model, with_convs=True)
    expected = {
        f"{name}.{part}" for name in layers for part in ("lora_down.weight", "lora_up.weight", "alpha")
    }
    assert set(tensors) == expected | {"bundle_emb.mychar4.emb_params"}
    assert len(layers) > len(default_unet_layers(sd1_model))
    assert "lora_unet_down_blocks_0_resnets_0_conv1" in layers  # kohya's name for a ResNet 3x3 conv
    for name, layer in layers.items():
        wide = isinstance(layer, torch.nn.Conv2d) and layer.kernel_size != (1, 1)
        rank_and_alpha = (tensors[f"{name}.lora_down.weight"].shape[0], float(tensors[f"{name}.alpha"]))
        assert rank_and_alpha == ((2, 1.0) if wide else (4, 2.0)), name
    assert max(tensors[key].abs().max() for key in expected if "lora_up" in key) > 0  # it learned
    plain = load_file(str(sd1_run / "mychar4.safetensors"))
    assert set(plain) == {"emb_params"} and torch.equal(
        plain["emb_params"], tensors["bundle_emb.mychar4.emb_params"]
    )
    assert {
        key: metadata[key]
        for key in (
            "ss_network_module",
            "ss_network_dim",
            "ss_network_alpha",
            "ss_base_model_version",
            "ss_v2",
            "ss_output_name",
            "ss_unet_lr",
            "ss_learning_rate",
            "ss_steps",
            "ss_epoch",
            "modelspec.architecture",
            "modelspec.implementation",
        )
    } == {
        "ss_network_module": "networks.lora",
        "ss_network_dim": "4",
        "ss_network_alpha": "2",
        "ss_base_model_version": "sd_v1",
        "ss_v2": "False",
        "ss_output_name": "mychar4",
        "ss_unet_lr": "0.001",
        "ss_learning_rate": "0.01",
        "ss_steps": "6",
        "ss_epoch": "2",
        "modelspec.architecture": "stable-diffusion-v1/lora",
        "modelspec.implementation": "diffusers",
    }
    assert json.loads(metadata["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "1"}
    assert json.loads(metadata["ss_training_comment"])["train_vectors_fraction"] == 0.5
    assert re.fullmatch(r"[0-9a-f]{64}", metadata["sshs_model_hash"])
    _, embedding_metadata = lora_file(sd1_run / "mychar4.safetensors")
    assert embedding_metadata["modelspec.architecture"] == "stable-diffusion-v1/textual-inversion"


def test_the_vectors_stop_at_the_pivot_and_the_lora_trains_on(sd1_run):
    at_pivot = load_file(str(sd1_run / "mychar4-step00000003.safetensors"))["emb_params"]
    assert torch.equal(at_pivot, load_file(str(sd1_run / "mychar4.safetensors"))["emb_params"])
    lora_at_pivot = load_file(str(sd1_run / "mychar4_lora-step00000003.safetensors"))
    lora_end = load_file(str(sd1_run / "mychar4_lora.safetensors"))
    assert any(not torch.equal(lora_at_pivot[k], lora_end[k]) for k in lora_end if "lora_up" in k)


def test_network_weights_continue_from_a_lora_file(sd1_run, tiny_sd1, tmp_path):
    """The continued network is the file's, rank, alpha and 3x3 convolutions taken from it."""
    start = sd1_run / "mychar4_lora.safetensors"
    model = load_sd_model(tiny_sd1 / "model.safetensors")
    continued = settings(tmp_path, "--network_module=networks.lora", f"--network_weights={start}").lora
    lora = UNetLoRA.for_run(model, continued, 10, torch.device("cpu"), seed=0)
    saved = load_file(str(start))
    state = lora.network.kohya_state_dict()
    assert set(state) == {k for k in saved if not k.startswith("bundle_emb.")}
    assert all(torch.equal(state[k], saved[k]) for k in state)
    assert (lora.dim, lora.alpha, lora.conv) == (4, 2.0, (2, 1.0))


def test_an_sdxl_pivotal_run_names_layers_the_ldm_way_and_bundles_both_encoders(sdxl_run, tiny_sdxl):
    tensors, metadata = lora_file(sdxl_run / "mychar4_lora.safetensors")
    plain = load_file(str(sdxl_run / "mychar4.safetensors"))
    assert {k for k in tensors if k.startswith("bundle_emb.")} == {
        "bundle_emb.mychar4.clip_l",
        "bundle_emb.mychar4.clip_g",
    }
    assert all(torch.equal(plain[key], tensors[f"bundle_emb.mychar4.{key}"]) for key in ("clip_l", "clip_g"))
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    # the WebUI, ComfyUI and Forge find every layer in the SDXL single file, with fitting shapes
    ldm = load_file(str(tiny_sdxl / "model.safetensors"))
    modules = ldm_unet_modules(ldm)
    diffusers_unet = load_file(str(tiny_sdxl / "diffusers" / "unet" / "diffusion_pytorch_model.safetensors"))
    comfy = comfyui_key_map(list(ldm), list(diffusers_unet))
    names = {k.split(".")[0] for k in tensors if not k.startswith("bundle_emb.")}
    diffusers_style = ("lora_unet_down_blocks", "lora_unet_mid_block", "lora_unet_up_blocks")
    assert names and not any(n.startswith(diffusers_style) for n in names)
    for name in names:
        target = webui_module(name, set(modules))
        assert target is not None and name in comfy, name
        assert fits(tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"], modules[target])


def test_comfyui_finds_every_sd1_layer(sd1_run, tiny_sd1):
    tensors, _ = lora_file(sd1_run / "mychar4_lora.safetensors")
    ldm = load_file(str(tiny_sd1 / "model.safetensors"))
    diffusers_unet = load_file(str(tiny_sd1 / "diffusers" / "unet" / "diffusion_pytorch_model.safetensors"))
    comfy = comfyui_key_map(list(ldm), list(diffusers_unet))
    names = {k.split(".")[0] for k in tensors if not k.startswith("bundle_emb.")}
    assert names <= comfy


@pytest.mark.parametrize("with_convs", [False, True])
def test_the_webui_finds_every_sd1_layer_of_a_full_size_model(with_convs):
    """The WebUI's block arithmetic assumes SD 1.5's real UNet (2 layers per block): our names,
    translated by its rule, are the LDM names of the same layers (ResNet, down- and upsampling
    convolutions too)."""
    config = base_config("sd1")["unet"]
    with init_empty_weights():
        unet = UNet2DConditionModel(**config)
    model = SimpleNamespace(unet=unet, family=SD1, text_encoders=[])
    paths = {id(module): path for path, module in unet.named_modules()}
    layers = default_unet_layers(model, with_convs=with_convs)
    assert len(layers) > (200 if with_convs else 100)  # every attention projection, feed-forward, proj_in/out
    ldm_names = {}
    for name, module in layers.items():
        ldm = unet_key_to_ldm(paths[id(module)] + ".weight", unet.config).removesuffix(".weight")
        ldm_names[name] = "diffusion_model_" + ldm.replace(".", "_")
    for name in layers:
        assert webui_module(name, set(ldm_names.values())) == ldm_names[name], name


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_diffusers_reads_every_layer_onto_the_layer_our_adapters_use(family, request):
    """The real library's reading (``lora_state_dict`` and ``convert_unet_state_dict_to_peft``,
    what ``load_lora_weights`` does before peft injects the layers): the file without its bundle
    passes its every-key-says-lora check (the whole file does not), and each kohya layer lands on
    the same UNet layer as our adapter, with the same down and up weights, at our alphas."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.utils import convert_unet_state_dict_to_peft

    root = request.getfixturevalue("tiny_sdxl" if family == "sdxl" else "tiny_sd1")
    path = request.getfixturevalue("sdxl_run" if family == "sdxl" else "sd1_run") / "mychar4_lora.safetensors"
    pipeline = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    ours = load_sd_model(root / "model.safetensors")
    network = network_from_file(read_lora_file(path), ours)

    def diffusers_reading(state):
        return pipeline.lora_state_dict(dict(state), unet_config=ours.unet.config)

    whole, _ = diffusers_reading(load_file(str(path)))
    assert not all("lora" in key for key in whole)  # load_lora_weights refuses the bundled file
    converted, alphas = diffusers_reading(diffusers_loadable(load_file(str(path))))
    assert all("lora" in key for key in converted)
    unet = {k.removeprefix("unet."): v for k, v in converted.items() if k.startswith("unet.")}
    peft_keys = convert_unet_state_dict_to_peft(unet)
    by_layer = {id(layer): name for name, layer in network._layers.items()}
    downs = [key for key in peft_keys if key.endswith(".lora_A.weight")]
    assert len(downs) == len(network.adapters) and len(peft_keys) == 2 * len(downs)
    for key in downs:
        module_path = key.removesuffix(".lora_A.weight")
        adapter = network.adapters[by_layer[id(ours.unet.get_submodule(module_path))]]  # the same layer
        assert torch.equal(peft_keys[key], adapter.lora_down.weight.detach())
        assert torch.equal(peft_keys[f"{module_path}.lora_B.weight"], adapter.lora_up.weight.detach())
    assert set(alphas.values()) == {float(a.alpha) for a in network.adapters.values()}


# --- refusals ----------------------------------------------------------------------------------


def settings(tmp_path, *extra: str):
    base = ["--pretrained_model_name_or_path=m.safetensors", f"--train_data_dir={tmp_path}"]
    return settings_from_command_line(
        [*base, f"--output_dir={tmp_path / 'out'}", "--token_string=mychar4", *extra]
    )


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["--network_dim=8"],
            "--network_dim is an option of the LoRA trained beside the word: add --network_module",
        ),
        (["--train_vectors_fraction=0.5"], "--train_vectors_fraction is an option of the LoRA"),
        (["--network_train_unet_only"], "--network_train_unet_only is an option of the LoRA"),
        (
            ["--network_module=networks.lora", "--network_alpha=-1"],
            "--network_alpha -1.0: must be a finite number",
        ),
        (["--network_module=lycoris.kohya"], "only networks.lora"),
        (["--network_module=networks.lora", "--network_dim=0"], "--network_dim 0: must be at least 1"),
        (["--network_module=networks.lora", "--unet_lr=-1"], "--unet_lr -1.0: must be a finite number"),
        (["--network_module=networks.lora", "--train_vectors_fraction=0"], "must be above 0 and at most 1"),
        (["--network_module=networks.lora", "--network_weights=missing.safetensors"], "file not found"),
        (["--network_module=networks.lora", "--output_name=my.word"], "the WebUI cuts at the first dot"),
        (
            ["--network_module=networks.lora", "--network_args", "dropout=0.1"],
            "only conv_dim=N and conv_alpha=A",
        ),
        (["--network_module=networks.lora", "--network_args", "conv_alpha=2"], "conv_alpha needs conv_dim"),
        (
            ["--network_module=networks.lora", "--network_args", "conv_dim=x"],
            "conv_dim must be a whole number",
        ),
    ],
)
def test_lora_options_that_cannot_work_are_refused_in_one_line(tmp_path, extra, message):
    with pytest.raises(UserError, match=re.escape(message)):
        settings(tmp_path, *extra)


def test_a_network_weights_file_of_another_rank_or_with_text_layers_is_refused(sd1_run, tmp_path):
    start = sd1_run / "mychar4_lora.safetensors"
    with pytest.raises(UserError, match="has dim 4, but --network_dim is 8: remove it"):
        settings(tmp_path, "--network_module=networks.lora", f"--network_weights={start}", "--network_dim=8")
    with_text = load_file(str(start))
    with_text["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = torch.zeros(4, 32)
    with_text["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"] = torch.zeros(37, 4)
    save_file(with_text, str(tmp_path / "te.safetensors"))
    with pytest.raises(UserError, match="adapts text-encoder layers"):
        settings(
            tmp_path, "--network_module=networks.lora", f"--network_weights={tmp_path / 'te.safetensors'}"
        )


def test_a_state_resumes_only_with_what_it_was_saved_with(sd1_run, tmp_path):
    """Checked before the model loads (train_textual_inversion.run_seed): a LoRA state without
    --network_module, and a plain state with it."""
    state = sd1_run / "mychar4-step00000003-state"
    with pytest.raises(UserError, match="saved with a LoRA; resume with the same --network_module options"):
        check_resume(state, settings(tmp_path).optimizer, with_lora=False)
    plain = tmp_path / "plain-state"
    shutil.copytree(state, plain)
    (plain / "lora.safetensors").unlink()
    with pytest.raises(UserError, match="saved without a LoRA; resume without --network_module"):
        check_resume(plain, settings(tmp_path).optimizer, with_lora=True)
