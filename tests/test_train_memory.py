"""Memory of a training run: with cached latents the VAE is read alone, used, and freed before
the text encoder and the UNet are read, and that changes nothing in what is learned."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from cli_helpers import ROOT, common, make_images
from safetensors.torch import load_file

from library.host_memory import glibc_version

# Runs the trainer in a fresh process, recording each model load and whether the VAE read alone
# is still alive when the rest of the model is read.
LOAD_ORDER = """
import json, sys, weakref
import train_textual_inversion as trainer

events, vaes = [], []
read_vae, read_model = trainer.load_model_vae, trainer.load_model

def load_sd_vae(*args, **kwargs):
    vae = read_vae(*args, **kwargs)
    vaes.append(weakref.ref(vae))
    events.append({"load": "vae"})
    return vae

def load_sd_model(*args, **kwargs):
    alive = any(ref() is not None for ref in vaes)  # no gc.collect(): freed means freed at once
    model = read_model(*args, **kwargs)
    events.append({"load": "model", "with_vae": model.vae is not None, "vae_alone_alive": alive})
    return model

trainer.load_model_vae, trainer.load_model = load_sd_vae, load_sd_model
trainer.main(sys.argv[2:])
with open(sys.argv[1], "w") as f:
    json.dump(events, f)
"""


def load_events(tmp_path, *args: str) -> list[dict]:
    record = tmp_path / "events.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", LOAD_ORDER, str(record), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(record.read_text())


def test_cached_latents_are_encoded_by_the_vae_alone_which_is_freed_before_the_unet_is_read(
    tiny_sd1, tmp_path
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
    assert load_events(tmp_path, *args, "--cache_latents") == [
        {"load": "vae"},
        {"load": "model", "with_vae": False, "vae_alone_alive": False},
    ]
    vae_alone = load_file(str(tmp_path / "out" / "mychar4.safetensors"))["emb_params"]
    # without a cache every batch needs the VAE: one load, with it
    assert load_events(tmp_path, *args) == [{"load": "model", "with_vae": True, "vae_alone_alive": False}]
    # sample images are decoded by the VAE, so it is loaded with the model and stays
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of mychar4 --w 64 --h 64 --s 2\n")
    sampled = load_events(
        tmp_path, *args, "--cache_latents", f"--sample_prompts={prompts}", "--sample_every_n_steps=1"
    )
    assert sampled == [{"load": "model", "with_vae": True, "vae_alone_alive": False}]
    assert list((tmp_path / "out" / "sample").glob("*.png"))
    # the VAE read alone first caches the same latents: the run learns the same vectors
    assert load_file(str(tmp_path / "out" / "mychar4.safetensors"))["emb_params"].equal(vae_alone)


# Runs the trainer and records how many layers of each loaded model keep a half-precision weight,
# and how many times the trainer handed freed memory back to the kernel.
HALF_STORAGE = """
import json, sys
import train_textual_inversion as trainer
from library.models import exact_half_weights
from library.models.exact_half_weights import HalfStoredConv2d, HalfStoredLinear

exact_half_weights.MIN_NARROWED_ELEMENTS = 0  # the tiny model's layers are below the useful size
loaded = []
read_model = trainer.load_model
def load_sd_model(*args, **kwargs):
    model = read_model(*args, **kwargs)
    loaded.append(sum(isinstance(m, (HalfStoredConv2d, HalfStoredLinear))
                      for part in (model.unet, model.text_encoder) for m in part.modules()))
    return model
hand_backs = []
def count_hand_back():
    hand_backs.append(1)
    return True
trainer.load_model, trainer.hand_back_what_the_step_freed = load_sd_model, count_hand_back
trainer.main(sys.argv[2:])
with open(sys.argv[1], "w") as f:
    json.dump({"half_layers": loaded, "hand_backs": len(hand_backs)}, f)
"""


def _run_recording_half_layers(tmp_path, run: str, *args: str) -> dict:
    record = tmp_path / f"{run}.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", HALF_STORAGE, str(record), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(record.read_text())


def test_half_stored_frozen_weights_learn_the_same_vectors_as_highvram_fp32_weights(tiny_sd1, tmp_path):
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
        stored[run] = _run_recording_half_layers(
            tmp_path,
            run,
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
    compiled = _run_recording_half_layers(
        tmp_path,
        "compiled",
        *common(tmp_path / "data", tmp_path / "compiled", fp16),
        "--token_string=mychar4",
        "--max_train_steps=1",
        "--torch_compile",
        "--dynamo_backend=eager",
    )
    assert compiled["half_layers"] == [0]
