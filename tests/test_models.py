"""Model loading: every layout loads to the same weights; architecture comes from shapes; bad files fail clearly."""

from __future__ import annotations

import logging
import pickle
import zipfile

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

from library.errors import UserError
from library.models.checkpoint_io import strip_prefix
from library.models.ldm_export import sd1_text_to_ldm, sd2_text_to_ldm, unet_to_ldm, vae_to_ldm
from library.models.loading import (
    _sd1_text_weights,
    _sd2_text_weights,
    base_config,
    infer_text_config,
    infer_unet_config,
    infer_vae_config,
    load_sd_model,
    load_sd_vae,
    text_family,
)


def _outputs(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, 4, 8, 8, generator=gen)
    ids = torch.randint(0, 49407, (1, 77), generator=gen)
    image = torch.rand(1, 3, 64, 64, generator=gen) * 2 - 1
    with torch.no_grad():
        hidden = model.text_encoder(ids)[0]
        noise_pred = model.unet(latents, 500, encoder_hidden_states=hidden).sample
        encoded = model.vae.encode(image).latent_dist.mean
        decoded = model.vae.decode(encoded).sample
    return hidden, noise_pred, encoded, decoded


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_single_files_load_the_same_weights_as_the_diffusers_folder(family, request):
    root = request.getfixturevalue(f"tiny_{family}")
    reference = load_sd_model(root / "diffusers")
    assert reference.family.name == family
    expected = _outputs(reference)
    for name in ("model.safetensors", "model.ckpt"):
        model = load_sd_model(root / name)
        assert model.family.name == family
        assert model.text_dim == reference.text_dim
        for got, want in zip(_outputs(model), expected):
            assert (got - want).abs().max().item() <= 1e-5, name


def test_sd2_detected_and_uses_its_tokenizer(tiny_sd2_safetensors, tiny_sd2_dir):
    for path in (tiny_sd2_safetensors, tiny_sd2_dir):
        model = load_sd_model(path)
        assert model.v2
        assert model.tokenizer.pad_token == "!" and model.tokenizer.pad_token_id == 0


def test_sd2_single_file_drops_the_last_text_layer(tiny_sd2_safetensors):
    # the fixture file has 3 OpenCLIP layers; SD2 uses the penultimate output, so 2 are loaded
    model = load_sd_model(tiny_sd2_safetensors)
    assert model.text_encoder.config.num_hidden_layers == 2


def test_fp16_checkpoint_loads_as_fp32(tiny_sd1_safetensors, tmp_path):
    from safetensors.torch import load_file

    half = {k: v.half() for k, v in load_file(str(tiny_sd1_safetensors)).items()}
    path = tmp_path / "half.safetensors"
    save_file(half, str(path))
    model = load_sd_model(path)
    assert model.unet.dtype == torch.float32
    assert model.text_encoder.dtype == torch.float32


def test_v2_flag_disagreeing_with_file_warns(tiny_sd1_safetensors, tiny_sd2_safetensors, caplog):
    with caplog.at_level(logging.WARNING):
        model = load_sd_model(tiny_sd1_safetensors, v2=True)
    assert model.family.name == "sd1"
    assert "SD 1.x" in caplog.text and "--v2" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        model = load_sd_model(tiny_sd2_safetensors, v2=False)
    assert model.family.name == "sd2"
    assert "SD 2.x" in caplog.text


def test_v_parameterization_sets_prediction_type(tiny_sd2_safetensors):
    model = load_sd_model(tiny_sd2_safetensors, v_parameterization=True)
    assert model.scheduler_config["prediction_type"] == "v_prediction"
    assert load_sd_model(tiny_sd2_safetensors).scheduler_config["prediction_type"] == "epsilon"


def test_vae_override_from_ldm_file_diffusers_file_and_folder(tiny_sd1, tmp_path):
    model = load_sd_model(tiny_sd1 / "model.safetensors")
    reference = model.vae.state_dict()
    # an LDM-named VAE file (as distributed, e.g. vae-ft-mse.safetensors) without the prefix
    vae_only = strip_prefix(vae_to_ldm(model.vae), "first_stage_model.")
    save_file({k: v.contiguous() for k, v in vae_only.items()}, str(tmp_path / "vae.safetensors"))
    # a diffusers-named VAE file
    save_file({k: v.contiguous() for k, v in reference.items()}, str(tmp_path / "vae_diffusers.safetensors"))
    for vae_path in (
        tmp_path / "vae.safetensors",
        tmp_path / "vae_diffusers.safetensors",
        tiny_sd1 / "diffusers",
    ):
        loaded = load_sd_model(tiny_sd1 / "model.safetensors", vae=vae_path).vae.state_dict()
        assert all(torch.equal(loaded[k], reference[k]) for k in reference), vae_path


# ---------------------------------------------------------------------------------------------
# full-size layouts on the meta device: the inferred configs are the real SD1.5 / SD2.1 ones


def _full_size_ldm_state(family: str) -> dict[str, torch.Tensor]:
    base = base_config(family)
    with init_empty_weights():
        unet = UNet2DConditionModel(**base["unet"])
        vae = AutoencoderKL(**base["vae"])
        text_config = dict(base["text_encoder"])
        if family == "sd2":
            text_config["num_hidden_layers"] = 23
        text = CLIPTextModel(CLIPTextConfig(**text_config))
    state = {**unet_to_ldm(unet), **vae_to_ldm(vae)}
    if family == "sd1":
        state.update(sd1_text_to_ldm(text))
    else:
        state.update(sd2_text_to_ldm(text))
    return state


@pytest.mark.parametrize(
    ("family", "cross", "width", "layers", "heads"),
    [("sd1", 768, 768, 12, 8), ("sd2", 1024, 1024, 23, [5, 10, 20, 20])],
)
def test_full_size_layout_gives_the_real_configs(family, cross, width, layers, heads):
    state = _full_size_ldm_state(family)
    assert all(v.is_meta for v in state.values())  # no memory used
    assert text_family(state) == family
    unet = infer_unet_config(strip_prefix(state, "model.diffusion_model."), family)
    assert unet["block_out_channels"] == [320, 640, 1280, 1280]
    assert unet["layers_per_block"] == 2
    assert unet["cross_attention_dim"] == cross
    assert unet["attention_head_dim"] == heads
    assert unet["down_block_types"] == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    assert unet["use_linear_projection"] == (family == "sd2")
    vae = infer_vae_config(strip_prefix(state, "first_stage_model."), family)
    assert vae["block_out_channels"] == [128, 256, 512, 512] and vae["layers_per_block"] == 2
    text_sd = _sd1_text_weights(state) if family == "sd1" else _sd2_text_weights(state, None)
    text = infer_text_config(text_sd, family)
    assert (text.hidden_size, text.num_hidden_layers) == (width, layers)
    assert text.num_attention_heads == width // 64


# ---------------------------------------------------------------------------------------------
# errors: one clear line each


def _error(path, **kwargs) -> str:
    with pytest.raises(UserError) as info:
        load_sd_model(path, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_path(tmp_path):
    assert "not found" in _error(tmp_path / "nope.safetensors")


def test_empty_file(tmp_path):
    (tmp_path / "empty.ckpt").write_bytes(b"")
    assert "empty" in _error(tmp_path / "empty.ckpt")


def test_lora_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "lora.safetensors"
    save_file(
        {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32)}, str(path)
    )
    assert "LoRA" in _error(path)


def test_embedding_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "emb.safetensors"
    save_file({"emb_params": torch.zeros(2, 768)}, str(path))
    assert "embedding" in _error(path)


def test_truncated_safetensors(tiny_sd1_safetensors, tmp_path):
    path = tmp_path / "cut.safetensors"
    path.write_bytes(tiny_sd1_safetensors.read_bytes()[:5000])
    message = _error(path)
    assert "cut.safetensors" in message and "corrupt" in message


def test_truncated_ckpt(tiny_sd1_ckpt, tmp_path):
    path = tmp_path / "cut.ckpt"
    path.write_bytes(tiny_sd1_ckpt.read_bytes()[:5000])
    assert "corrupt" in _error(path)


def test_an_sdxl_checkpoint_without_its_second_text_encoder_is_named(tmp_path):
    path = tmp_path / "sdxl.safetensors"
    save_file(
        {
            "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3),
            "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": torch.zeros(
                2, 2
            ),
        },
        str(path),
    )
    assert "an SDXL checkpoint without its text encoder 2 (conditioner.embedders.1.model.*)" in _error(path)


class _Payload:
    def __reduce__(self):
        import os

        return (os.system, ("touch PWNED_BY_CHECKPOINT",))


def test_ckpt_with_pickled_code_is_refused_and_not_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": _Payload()}}, path)
    assert zipfile.is_zipfile(path)
    message = _error(path)
    assert "pickled code" in message
    assert not (tmp_path / "PWNED_BY_CHECKPOINT").exists()


def test_legacy_pickle_with_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil_legacy.ckpt"
    path.write_bytes(pickle.dumps({"state_dict": _Payload()}))
    _error(path)
    assert not (tmp_path / "PWNED_BY_CHECKPOINT").exists()


def test_a_text_file_named_ckpt_is_not_called_code(tmp_path):
    """A web page saved as model.ckpt used to be reported as 'pickled code'."""
    path = tmp_path / "model.ckpt"
    path.write_text("<html>404 Not Found</html>\n")
    message = _error(path)
    assert "not a checkpoint" in message and "code" not in message


def test_folder_that_is_not_a_model(tmp_path):
    assert "not a diffusers model folder" in _error(tmp_path)


def test_missing_vae_path(tiny_sd1_safetensors, tmp_path):
    assert "--vae" in _error(tiny_sd1_safetensors, vae=tmp_path / "missing_vae.pt")


# ---------------------------------------------------------------------------------------------
# Loading a part at a time, cast as it is read (memory)


def _weights(model) -> dict[str, torch.Tensor]:
    return {
        f"{part}.{k}": v
        for part in ("unet", "text_encoder", "vae")
        for k, v in getattr(model, part).state_dict().items()
    }


@pytest.mark.parametrize("layout", ["model.safetensors", "model.ckpt", "diffusers"])
@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_casting_while_loading_gives_the_same_weights_as_casting_after(request, family, layout):
    root = request.getfixturevalue(f"tiny_{family}")
    full = _weights(load_sd_model(root / layout))
    assert all(v.dtype == torch.float32 for v in full.values())
    for dtype in (torch.bfloat16, torch.float16):
        cast = _weights(load_sd_model(root / layout, dtype=dtype, vae_dtype=torch.float32))
        for key, value in full.items():
            wanted = torch.float32 if key.startswith("vae.") else dtype
            assert cast[key].dtype == wanted and torch.equal(cast[key], value.to(wanted)), key


def test_the_single_file_loader_matches_diffusers_conversion_of_the_whole_file(tiny_sd1):
    """Bit-identical to what converting the whole file at once (the earlier loader) gives."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    from safetensors.torch import load_file

    model = load_sd_model(tiny_sd1 / "model.safetensors")
    whole = load_file(str(tiny_sd1 / "model.safetensors"))
    reference = convert_ldm_unet_checkpoint(whole, dict(model.unet.config))
    loaded = model.unet.state_dict()
    assert set(reference) == set(loaded)
    assert all(torch.equal(reference[k].float(), loaded[k]) for k in reference)


def test_a_vae_given_apart_is_the_only_vae_read(tiny_sd1, monkeypatch):
    from library.models import checkpoint_io

    read: list[str] = []
    original = checkpoint_io.Checkpoint.read
    monkeypatch.setattr(
        checkpoint_io.Checkpoint,
        "read",
        lambda self, keys: original(self, [read.append(k) or k for k in keys]),
    )
    load_sd_model(tiny_sd1 / "model.safetensors", vae=tiny_sd1 / "diffusers")
    assert read and not any(key.startswith("first_stage_model.") for key in read)


@pytest.mark.parametrize("layout", ["model.safetensors", "model.ckpt", "diffusers"])
@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_the_vae_read_alone_is_the_models_vae(request, family, layout):
    """``load_sd_vae`` (the trainer caches latents with it before the UNet is read) gives the
    whole model's VAE bit for bit, in every layout, cast as asked."""
    root = request.getfixturevalue(f"tiny_{family}")
    for dtype in (torch.float32, torch.bfloat16):
        whole = load_sd_model(root / layout, dtype=dtype).vae.state_dict()
        alone = load_sd_vae(root / layout, dtype=dtype)
        assert not alone.training
        alone = alone.state_dict()
        assert alone.keys() == whole.keys()
        assert all(alone[k].dtype == dtype and torch.equal(alone[k], whole[k]) for k in whole), (
            layout,
            dtype,
        )


def _record_reads(monkeypatch) -> list[str]:
    from library.models import checkpoint_io

    read: list[str] = []
    original = checkpoint_io.Checkpoint.read
    monkeypatch.setattr(
        checkpoint_io.Checkpoint,
        "read",
        lambda self, keys: original(self, [read.append(k) or k for k in keys]),
    )
    return read


def test_the_vae_alone_reads_only_vae_weights_and_honours_vae(tiny_sd1, monkeypatch):
    read = _record_reads(monkeypatch)
    load_sd_vae(tiny_sd1 / "model.safetensors")
    assert read and all(key.startswith("first_stage_model.") for key in read)
    read.clear()
    given = load_sd_vae(tiny_sd1 / "model.safetensors", vae=tiny_sd1 / "diffusers").state_dict()
    assert not read  # the checkpoint's keys are looked at (its family), none of its tensors
    expected = load_sd_model(tiny_sd1 / "model.safetensors", vae=tiny_sd1 / "diffusers").vae.state_dict()
    assert all(torch.equal(given[k], expected[k]) for k in expected)


def test_a_model_without_its_vae_reads_no_vae_weights(tiny_sd1, monkeypatch):
    read = _record_reads(monkeypatch)
    model = load_sd_model(tiny_sd1 / "model.safetensors", with_vae=False)
    assert model.vae is None and model.unet is not None
    assert read and not any(key.startswith("first_stage_model.") for key in read)
    assert load_sd_model(tiny_sd1 / "diffusers", with_vae=False).vae is None
    assert (
        load_sd_model(tiny_sd1 / "model.safetensors", vae=tiny_sd1 / "diffusers", with_vae=False).vae is None
    )


def test_the_vae_alone_refuses_what_the_whole_load_refuses(tmp_path):
    lora = tmp_path / "lora.safetensors"
    save_file(
        {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32)}, str(lora)
    )
    (tmp_path / "folder").mkdir()
    for path in (lora, tmp_path / "folder", tmp_path / "nope.safetensors"):
        with pytest.raises(UserError) as info:
            load_sd_vae(path)
        assert str(info.value) == _error(path)


@pytest.mark.parametrize(
    "dtype, narrow", [(torch.float32, False), (torch.bfloat16, False), (torch.float32, True)]
)
def test_the_load_never_holds_more_than_the_model_and_one_tensor(
    tiny_sd1, tmp_path, monkeypatch, dtype, narrow
):
    """Counted on the tensors themselves: every tensor the file reader hands out and every weight the
    model holds, by storage, at each step of the load. The peak must stay under the final model's
    size plus its largest tensor (reading the whole file first used to hold file and model at once).
    The file is fp16, as SD checkpoints are, so file and model copies are distinct. Narrowed
    (exact half storage), the model is smaller and the bound is the smaller model's."""
    import weakref

    from safetensors.torch import load_file

    from library.models import checkpoint_io
    from library.models import loading as models

    fp16_file = tmp_path / "fp16.safetensors"
    file_tensors = {k: v.half() for k, v in load_file(str(tiny_sd1 / "model.safetensors")).items()}
    save_file(file_tensors, str(fp16_file))
    largest = max(t.nbytes for t in file_tensors.values())  # the one extra tensor: a file copy
    del file_tensors

    alive: dict[int, int] = {}  # file tensors still referenced: storage pointer -> bytes
    built: list[torch.nn.Module] = []
    peak = 0

    original_read = checkpoint_io.Checkpoint.read

    def read(self, keys):
        tensors = original_read(self, keys)
        for tensor in tensors.values():
            pointer = tensor.untyped_storage().data_ptr()
            alive[pointer] = tensor.untyped_storage().nbytes()
            weakref.finalize(tensor.untyped_storage(), alive.pop, pointer, None)
        return tensors

    original_assign = models._assign

    def assign(model, key, tensor, path, **kwargs):
        nonlocal peak
        original_assign(model, key, tensor, path, **kwargs)
        if model not in built:
            built.append(model)
        held = {
            p.untyped_storage().data_ptr(): p.untyped_storage().nbytes()
            for m in built
            for p in [*m.parameters(), *m.buffers()]
            if p.device.type != "meta"
        }
        peak = max(peak, sum({**alive, **held}.values()))

    monkeypatch.setattr(checkpoint_io.Checkpoint, "read", read)
    monkeypatch.setattr(models, "_assign", assign)
    monkeypatch.setattr(
        "library.models.exact_half_weights.MIN_NARROWED_ELEMENTS", 0
    )  # the tiny model's layers are small
    model = load_sd_model(fp16_file, dtype=dtype, exact_half_storage=narrow)
    weights = [t for part in (model.unet, model.text_encoder, model.vae) for t in part.state_dict().values()]
    assert any(t.dtype == torch.float16 for t in weights) == narrow
    model_bytes = sum(t.nbytes for t in weights)
    assert peak <= model_bytes + largest, (peak, model_bytes, largest)
