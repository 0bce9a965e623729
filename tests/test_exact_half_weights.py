"""Frozen layers keep exact half-precision weights and compute in fp32: the same numbers, less memory."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from library.models import exact_half_weights
from library.models.exact_half_weights import (
    HalfStoredConv2d,
    HalfStoredLinear,
    exact_storage_dtype,
    store_weights_in_exact_half,
)
from library.models.loading import load_sd_model
from library.training.new_word import splice_new_vectors


@pytest.fixture(autouse=True)
def narrow_small_layers_too(monkeypatch):
    """The tiny test models' layers are all below the size worth narrowing; narrow them anyway."""
    monkeypatch.setattr(exact_half_weights, "MIN_NARROWED_ELEMENTS", 0)


def _half_exact(module: nn.Module) -> nn.Module:
    """``module`` with every floating parameter rounded to fp16 values (as an fp16 file gives)."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(p.half().float())
    return module.requires_grad_(False)


def _in_a_model(layer: nn.Module) -> nn.Module:
    """``layer`` inside a model whose first parameter is another (the first one is never narrowed)."""
    model = nn.Module()
    model.scale = nn.Parameter(torch.ones(1), requires_grad=False)
    model.layer = layer
    return model


def _output_and_input_grad(module: nn.Module, x: torch.Tensor, grad_out_seed: int = 1):
    x = x.clone().requires_grad_(True)
    y = module(x)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(grad_out_seed))
    y.backward(g)
    return y.detach(), x.grad


@pytest.mark.parametrize(
    "layer, shape",
    [
        (nn.Conv2d(8, 16, 3, padding=1), (2, 8, 9, 7)),
        (nn.Conv2d(8, 8, 3, stride=2, padding=1), (1, 8, 10, 10)),
        (nn.Conv2d(8, 16, 1), (2, 8, 5, 5)),
        (nn.Conv2d(8, 16, 3, padding=1, groups=4, bias=False), (1, 8, 6, 6)),
        (nn.Linear(24, 40), (3, 7, 24)),
        (nn.Linear(24, 40, bias=False), (5, 24)),
    ],
)
def test_a_half_stored_layer_computes_the_same_output_and_input_gradient(layer, shape):
    torch.manual_seed(0)
    plain = _half_exact(layer)
    stored = copy.deepcopy(plain)
    assert store_weights_in_exact_half(_in_a_model(stored)) == stored.weight.numel() * 2
    assert isinstance(stored, (HalfStoredConv2d, HalfStoredLinear))
    assert stored.weight.dtype == torch.float16 and not stored.weight.requires_grad
    x = torch.randn(shape)
    want, want_grad = _output_and_input_grad(plain, x)
    got, got_grad = _output_and_input_grad(stored, x)
    assert got.dtype == torch.float32
    assert got.equal(want) and got_grad.equal(want_grad)


def test_only_exact_weights_are_narrowed():
    assert exact_storage_dtype(torch.tensor([0.5, -3.0, 1024.0])) == torch.float16
    assert exact_storage_dtype(torch.tensor([1.0, 2.0**-30])) == torch.bfloat16  # below fp16's range
    assert exact_storage_dtype(torch.tensor([131072.0, 1.0])) == torch.bfloat16  # above fp16's range
    assert exact_storage_dtype(torch.tensor([0.1])) is None
    assert exact_storage_dtype(torch.tensor([1.0, float("nan")])) is None
    assert exact_storage_dtype(torch.tensor([1.0], dtype=torch.float16)) == torch.float16

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), _half_exact(nn.Linear(4, 4)), nn.Linear(4, 4)).requires_grad_(
        False
    )
    before = model[2].weight.clone()
    saved = store_weights_in_exact_half(model)
    assert type(model[0]) is nn.Linear and model[0].weight.dtype == torch.float32  # the first stays
    assert isinstance(model[1], HalfStoredLinear) and saved == 16 * 2
    assert type(model[2]) is nn.Linear and model[2].weight.equal(before)  # random fp32: not exact
    assert store_weights_in_exact_half(model, torch.bfloat16) == 0  # a half-precision run: no saving


def test_small_layers_stay_fp32_where_the_call_would_cost_more_than_the_memory(monkeypatch):
    monkeypatch.setattr(exact_half_weights, "MIN_NARROWED_ELEMENTS", 1 << 18)
    model = nn.Sequential(nn.Linear(4, 4), _half_exact(nn.Linear(512, 511)), _half_exact(nn.Linear(512, 512)))
    assert store_weights_in_exact_half(model.requires_grad_(False)) == 512 * 512 * 2
    assert type(model[1]) is nn.Linear and isinstance(model[2], HalfStoredLinear)


def test_a_half_stored_weight_cannot_be_trained_silently():
    torch.manual_seed(0)
    layer = _half_exact(nn.Linear(4, 4))
    store_weights_in_exact_half(_in_a_model(layer))
    assert isinstance(layer, HalfStoredLinear)
    layer.weight.requires_grad_(True)
    with pytest.raises(RuntimeError, match="frozen"):
        layer(torch.randn(2, 4))


def _fp16_copy(source, tmp_path):
    path = tmp_path / "fp16.safetensors"
    save_file({k: v.half() for k, v in load_file(str(source)).items()}, str(path))
    return path


def _fp16_layouts(tiny: Path, tmp_path: Path) -> dict[str, Path]:
    """The tiny model as users have SD checkpoints: fp16 single files and an fp16 diffusers folder."""
    single = _fp16_copy(tiny / "model.safetensors", tmp_path)
    ckpt = tmp_path / "fp16.ckpt"
    torch.save({"state_dict": load_file(str(single))}, ckpt)
    folder = tmp_path / "fp16-diffusers"
    shutil.copytree(tiny / "diffusers", folder)
    for weights in folder.rglob("*.safetensors"):
        save_file({k: v.half() for k, v in load_file(str(weights)).items()}, str(weights))
    return {"safetensors": single, "ckpt": ckpt, "diffusers": folder}


def _weights(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.float() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_every_layout_loads_narrowed_to_the_same_values(family, request, tmp_path):
    """Narrowed while read: the same values as the plain fp32 load, half the bytes in the layers,
    the rest (norms, embeddings, biases, the first layer) untouched in fp32."""
    for layout, path in _fp16_layouts(request.getfixturevalue(f"tiny_{family}"), tmp_path).items():
        plain = load_sd_model(path, with_vae=False)
        narrowed = load_sd_model(path, with_vae=False, exact_half_storage=True)
        for part in ("unet", "text_encoder"):
            want, got = getattr(plain, part), getattr(narrowed, part)
            assert _weights(got).keys() == _weights(want).keys()
            assert all(_weights(got)[k].equal(v) for k, v in _weights(want).items()), (layout, part)
            halves = {n for n, p in got.named_parameters() if p.dtype == torch.float16}
            assert halves == {
                f"{n}.weight"
                for n, m in got.named_modules()
                if isinstance(m, HalfStoredConv2d | HalfStoredLinear)
            }
            assert len(halves) > 0.5 * sum(isinstance(m, nn.Conv2d | nn.Linear) for m in got.modules()), (
                layout
            )
            assert {p.dtype for n, p in got.named_parameters() if n not in halves} == {torch.float32}


def test_an_fp32_file_is_narrowed_only_where_exact(tiny_sd1, tmp_path):
    """The tiny model's own file is fp32 with random values: nothing fits fp16, nothing changes."""
    model = load_sd_model(tiny_sd1 / "model.safetensors", with_vae=False, exact_half_storage=True)
    assert {p.dtype for p in [*model.unet.parameters(), *model.text_encoder.parameters()]} == {torch.float32}
    half_run = load_sd_model(
        _fp16_copy(tiny_sd1 / "model.safetensors", tmp_path),
        with_vae=False,
        dtype=torch.bfloat16,
        exact_half_storage=True,
    )
    assert {p.dtype for p in half_run.unet.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("family", ["sd1", "sd2"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_a_narrowed_model_gives_the_same_prediction_and_gradient(family, checkpointing, request, tmp_path):
    """The text encoder and the UNet read from an fp16 file, with and without narrowed weights, as
    the trainer runs them: the same noise prediction and the same gradient on new token vectors."""
    path = _fp16_copy(request.getfixturevalue(f"tiny_{family}") / "model.safetensors", tmp_path)
    results = []
    for narrow in (False, True):
        model = load_sd_model(path, with_vae=False, exact_half_storage=narrow)
        unet, text_encoder = model.unet.requires_grad_(False), model.text_encoder.requires_grad_(False)
        layers = [*unet.modules(), *text_encoder.modules()]
        assert any(isinstance(m, HalfStoredConv2d | HalfStoredLinear) for m in layers) == narrow
        assert unet.dtype == text_encoder.dtype == torch.float32
        if checkpointing:
            unet.enable_gradient_checkpointing()
            unet.train()
        first_new = text_encoder.get_input_embeddings().num_embeddings
        new_rows = splice_new_vectors(
            text_encoder, torch.randn(2, text_encoder.config.hidden_size, generator=seeded())
        )
        ids = torch.randint(0, first_new, (2, 77), generator=seeded())
        ids[:, 3:5] = torch.tensor([first_new, first_new + 1])
        hidden = text_encoder(ids).last_hidden_state
        noise = unet(torch.randn(2, 4, 8, 8, generator=seeded()), torch.tensor([10, 900]), hidden).sample
        noise.square().mean().backward()
        results.append((noise.detach(), new_rows.vectors.grad))
    (want, want_grad), (got, got_grad) = results
    assert want_grad.abs().sum() > 0
    assert got.equal(want) and got_grad.equal(want_grad)


def seeded() -> torch.Generator:
    return torch.Generator().manual_seed(0)
