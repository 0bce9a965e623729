"""Memory of a training run: with cached latents the VAE is read alone, used, and freed before
the text encoder and the UNet are read, and that changes nothing in what is learned."""

from __future__ import annotations

import weakref

import pytest
from cli_helpers import common, make_images, run_train
from safetensors.torch import load_file

import train_textual_inversion as trainer
from library.host_memory import glibc_version


@pytest.fixture
def load_events(monkeypatch):
    """Runs the trainer, recording each model load and whether the VAE read alone is still alive
    when the rest of the model is read (no gc.collect(): freed means freed at once)."""
    events, vaes = [], []
    read_vae, read_model = trainer.load_model_vae, trainer.load_model

    def load_vae(*args, **kwargs):
        vae = read_vae(*args, **kwargs)
        vaes.append(weakref.ref(vae))
        events.append({"load": "vae"})
        return vae

    def load_model(*args, **kwargs):
        alive = any(ref() is not None for ref in vaes)
        model = read_model(*args, **kwargs)
        events.append({"load": "model", "with_vae": model.vae is not None, "vae_alone_alive": alive})
        return model

    monkeypatch.setattr(trainer, "load_model_vae", load_vae)
    monkeypatch.setattr(trainer, "load_model", load_model)

    def run(*args: str) -> list[dict]:
        events.clear()
        vaes.clear()
        run_train(*args)
        return list(events)

    return run


def test_cached_latents_are_encoded_by_the_vae_alone_which_is_freed_before_the_unet_is_read(
    tiny_sd1, tmp_path, load_events
):
    """With cached latents and no samples the VAE is read alone and freed first; with samples it is
    loaded with the model and kept. Both runs learn the same vectors (the same latents)."""
    make_images(tmp_path / "data" / "1_mychar4 toy", 2, caption="a photo of mychar4")
    args = [
        *common(tmp_path / "data", tmp_path / "out", tiny_sd1 / "model.safetensors"),
        "--token_string=mychar4",
        "--init_word=toy",
        "--max_train_steps=2",
        "--learning_rate=1e-2",
        "--save_model_as=safetensors",
    ]
    assert load_events(*args, "--cache_latents") == [
        {"load": "vae"},
        {"load": "model", "with_vae": False, "vae_alone_alive": False},
    ]
    vae_alone = load_file(str(tmp_path / "out" / "mychar4.safetensors"))["emb_params"]
    # without a cache every batch needs the VAE: one load, with it
    assert load_events(*args) == [{"load": "model", "with_vae": True, "vae_alone_alive": False}]
    # sample images are decoded by the VAE, so it is loaded with the model and stays
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of mychar4 --w 64 --h 64 --s 2\n")
    sampled = load_events(*args, "--cache_latents", f"--sample_prompts={prompts}", "--sample_every_n_steps=1")
    assert sampled == [{"load": "model", "with_vae": True, "vae_alone_alive": False}]
    assert list((tmp_path / "out" / "sample").glob("*.png"))
    # the VAE read alone first caches the same latents: the run learns the same vectors
    assert load_file(str(tmp_path / "out" / "mychar4.safetensors"))["emb_params"].equal(vae_alone)


@pytest.fixture
def run_recording_half_layers(monkeypatch):
    """Runs the trainer, recording how many layers of each loaded model keep a half-precision weight,
    and how many times the trainer handed freed memory back to the kernel."""
    from library.models import exact_half_weights
    from library.models.exact_half_weights import HalfStoredConv2d, HalfStoredLinear

    monkeypatch.setattr(exact_half_weights, "MIN_NARROWED_ELEMENTS", 0)  # the tiny model's are smaller
    loaded, hand_backs = [], []
    read_model = trainer.load_model

    def load_model(*args, **kwargs):
        model = read_model(*args, **kwargs)
        parts = (model.unet, model.text_encoder)
        loaded.append(
            sum(isinstance(m, (HalfStoredConv2d, HalfStoredLinear)) for p in parts for m in p.modules())
        )
        return model

    def count_hand_back() -> bool:
        hand_backs.append(1)
        return True

    monkeypatch.setattr(trainer, "load_model", load_model)
    monkeypatch.setattr(trainer, "hand_back_what_the_step_freed", count_hand_back)

    def run(*args: str) -> dict:
        loaded.clear()
        hand_backs.clear()
        run_train(*args)
        return {"half_layers": list(loaded), "hand_backs": len(hand_backs)}

    return run


def test_half_stored_frozen_weights_learn_the_same_vectors_as_highvram_fp32_weights(
    tiny_sd1, tmp_path, run_recording_half_layers
):
    """An fp16 checkpoint trained in fp32 (with gradient checkpointing and a sample): by default the
    frozen layers keep the file's fp16 weights (memory); ``--highvram`` keeps them in fp32 (speed).
    Both runs end with the same vectors and render the same sample. On a glibc CPU the default hands
    what each step freed back to the kernel; ``--highvram`` keeps it for speed. Under
    ``--torch_compile`` the weights stay fp32: the compiler traces the layers itself, and the shared
    cast buffer would overwrite the tensors it keeps for the backward (that run failed before)."""
    from safetensors.torch import save_file

    fp16 = tmp_path / "fp16.safetensors"
    save_file({k: v.half() for k, v in load_file(str(tiny_sd1 / "model.safetensors")).items()}, str(fp16))
    make_images(tmp_path / "data" / "2_mychar4 toy", 3, caption="a photo of mychar4 toy, number {i}")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of mychar4 --w 64 --h 64 --s 2 --d 1\n")
    vectors, stored, samples = {}, {}, {}
    for run, extra in (("default", []), ("highvram", ["--highvram"])):
        out = tmp_path / run
        stored[run] = run_recording_half_layers(
            *common(tmp_path / "data", out, fp16),
            "--token_string=mychar4",
            "--init_word=toy",
            "--max_train_steps=2",
            "--learning_rate=1e-2",
            "--save_model_as=safetensors",
            "--gradient_checkpointing",
            f"--sample_prompts={prompts}",
            "--sample_every_n_steps=2",
            *extra,
        )
        vectors[run] = load_file(str(out / "mychar4.safetensors"))["emb_params"]
        samples[run] = [p.read_bytes() for p in sorted((out / "sample").glob("*.png"))]
    assert stored["highvram"]["half_layers"] == [0] and stored["default"]["half_layers"][0] > 10
    assert stored["default"]["hand_backs"] == (2 if glibc_version() else 0)  # after each of the 2 steps
    assert stored["highvram"]["hand_backs"] == 0
    assert vectors["default"].equal(vectors["highvram"])
    assert samples["default"] and samples["default"] == samples["highvram"]  # the same pixels
    compiled = run_recording_half_layers(
        *common(tmp_path / "data", tmp_path / "compiled", fp16),
        "--token_string=mychar4",
        "--max_train_steps=1",
        "--torch_compile",
        "--dynamo_backend=eager",
    )
    assert compiled["half_layers"] == [0]
