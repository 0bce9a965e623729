"""Memory of a training run: with cached latents the VAE is read alone, used, and freed before
the text encoder and the UNet are read, and that changes nothing in what is learned."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from safetensors.torch import load_file
from test_train_cli import ROOT, common, make_images, run_train

# Runs the trainer in a fresh process, recording each model load and whether the VAE read alone
# is still alive when the rest of the model is read.
LOAD_ORDER = """
import json, sys, weakref
import train_textual_inversion as trainer

events, vaes = [], []
read_vae, read_model = trainer.load_sd_vae, trainer.load_sd_model

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

trainer.load_sd_vae, trainer.load_sd_model = load_sd_vae, load_sd_model
trainer.main(sys.argv[2:])
with open(sys.argv[1], "w") as f:
    json.dump(events, f)
"""


def load_events(tmp_path, *args: str) -> list[dict]:
    record = tmp_path / "events.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", LOAD_ORDER, str(record), *args], cwd=ROOT, capture_output=True,
                            text=True, timeout=600, env=env)  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(record.read_text())


def test_cached_latents_are_encoded_by_the_vae_alone_which_is_freed_before_the_unet_is_read(
    tiny_sd1, tmp_path
):
    make_images(tmp_path / "data" / "1_mychar4 toy", 2, caption="a photo of mychar4")
    args = [*common(tmp_path / "data", tmp_path / "out", tiny_sd1 / "model.safetensors"), "--token_string=mychar4",
            "--init_word=toy", "--max_train_steps=1"]  # fmt: skip
    assert load_events(tmp_path, *args, "--cache_latents") == [
        {"load": "vae"},
        {"load": "model", "with_vae": False, "vae_alone_alive": False},
    ]
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


def test_the_vae_read_first_caches_the_same_latents_and_learns_the_same_vectors(tiny_sd1, tmp_path):
    """The same run with the VAE read alone first and with it loaded in the model (kept because
    sample prompts are given, though no sample falls within the run) ends with the same vectors."""
    make_images(tmp_path / "data" / "2_mychar4 toy", 3, caption="a photo of mychar4 toy, number {i}")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of mychar4\n")
    vectors = {}
    for name, extra in (
        ("alone", []),
        ("kept", [f"--sample_prompts={prompts}", "--sample_every_n_steps=1000"]),
    ):
        out = tmp_path / name
        run_train(*common(tmp_path / "data", out, tiny_sd1 / "model.safetensors"), "--token_string=mychar4",
                  "--init_word=toy", "--max_train_steps=3", "--learning_rate=1e-2", "--cache_latents",
                  "--save_model_as=safetensors", *extra)  # fmt: skip
        vectors[name] = load_file(str(out / "mychar4.safetensors"))["emb_params"]
    assert vectors["alone"].equal(vectors["kept"])
