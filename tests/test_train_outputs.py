"""The files a kohya command line gives: names, rotation, logs and metadata as kohya's trainer writes them.

Each test runs the real trainer CLI on the tiny SD1 model (``cli_helpers.run_train``).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from cli_helpers import ROOT, common, make_images, picture_folder, run_train
from client_rules import CLIENTS, READS_EXTENSION
from safetensors import safe_open
from safetensors.torch import load_file

from library import IMPLEMENTATION
from library.models.loading import load_sd_model

data = picture_folder(2)


def test_files_are_named_after_the_token_string_without_output_name(data, tiny_sd1, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("mychar4 --w 64 --h 64 --s 1 --d 3\n")
    out = tmp_path / "o"
    run_train(
        *common(data, out, tiny_sd1 / "model.safetensors"),
        "--token_string=mychar4",
        "--init_word=toy",
        "--max_train_steps=4",
        "--save_every_n_epochs=1",
        "--save_model_as=safetensors",
        "--save_state",
        f"--sample_prompts={prompts}",
        "--sample_every_n_epochs=1",
    )
    assert {p.name for p in out.iterdir()} == {
        "mychar4-000001.safetensors",
        "mychar4-000001-state",
        "mychar4.safetensors",
        "mychar4-state",
        "sample",
    }
    samples = sorted(p.name for p in (out / "sample").glob("*.png"))
    assert samples and all(re.match(r"mychar4_e00000[12]_00_\d{14}_3\.png$", s) for s in samples), samples
    with safe_open(str(out / "mychar4.safetensors"), "pt") as f:
        metadata = f.metadata()
    assert metadata["modelspec.title"] == "mychar4"
    assert metadata["modelspec.implementation_version"] == IMPLEMENTATION


@pytest.mark.parametrize("mode", [None, "spread", "mean"])
def test_a_phrase_init_word_is_laid_over_the_vectors_as_the_mode_says(data, tiny_sd1, tmp_path, mode):
    """Without --init_word_mode the phrase is cycled as kohya does; spread keeps it in order; mean averages it."""
    out = tmp_path / "o"
    result = run_train(
        *common(data, out, tiny_sd1 / "model.safetensors"),
        "--token_string=mychar4",
        "--init_word=hello world",
        "--num_vectors_per_token=3",
        "--max_train_steps=1",
        "--learning_rate=0",
        "--save_model_as=safetensors",
        *([f"--init_word_mode={mode}"] if mode else []),
    )
    model = load_sd_model(tiny_sd1 / "model.safetensors")
    hello, world = model.tokenizer("hello world", add_special_tokens=False).input_ids
    table = model.text_encoder.get_input_embeddings().weight
    vectors = load_file(str(out / "mychar4.safetensors"))["emb_params"]
    if mode is None:
        assert "init words are repeated" in result.stderr
        assert torch.equal(vectors, table[[hello, world, hello]])
    elif mode == "spread":
        assert torch.equal(vectors, table[[hello, hello, world]])
    else:
        expected = table[[hello, world]].mean(dim=0).expand(3, -1)
        torch.testing.assert_close(vectors, expected.to(vectors.dtype))


def test_save_model_as_ckpt_writes_name_ckpt(data, tiny_sd1, tmp_path, monkeypatch):
    out = tmp_path / "o"
    result = run_train(
        *common(data, out, tiny_sd1 / "model.safetensors"),
        "--token_string=mychar4",
        "--init_word=toy",
        "--max_train_steps=1",
        "--save_model_as=ckpt",
    )
    assert sorted(p.name for p in out.iterdir()) == ["mychar4.ckpt"]
    assert "do not load .ckpt embeddings" in result.stderr  # the WebUI family and SD.Next skip them
    import client_rules

    monkeypatch.setattr(client_rules, "WEBUI_WIDTHS", (32,))  # the tiny model's width, where clients
    monkeypatch.setattr(client_rules, "INVOKE_BASES", {32: "tiny"})  # accept only the real ones
    for client, load in CLIENTS.items():
        if ".ckpt" in READS_EXTENSION[client]:
            assert load(out / "mychar4.ckpt", 32).vectors.shape == (1, 32), client


def test_step_saves_and_states_rotate_as_kohya(data, tiny_sd1, tmp_path):
    """--save_last_n_steps counts steps: with one save per step and N=1, the last two saves stay."""
    out = tmp_path / "o"
    run_train(
        *common(data, out, tiny_sd1 / "model.safetensors"),
        "--token_string=mychar4",
        "--init_word=toy",
        "--output_name=foo",
        "--max_train_steps=3",
        "--save_every_n_steps=1",
        "--save_last_n_steps=1",
        "--save_state",
    )
    assert sorted(p.name for p in out.iterdir()) == [
        "foo-state",
        "foo-step00000002-state",
        "foo-step00000002.pt",
        "foo-step00000003-state",
        "foo-step00000003.pt",
        "foo.pt",
    ]


def test_epoch_saves_and_states_rotate_as_kohya(data, tiny_sd1, tmp_path):
    """Two pictures, batch 1: two steps an epoch. --save_last_n_epochs counts saves and
    --save_last_n_epochs_state keeps its own count; the last epoch's save is the final file."""
    out = tmp_path / "o"
    run_train(
        *common(data, out, tiny_sd1 / "model.safetensors"),
        "--token_string=mychar4",
        "--output_name=foo",
        "--max_train_epochs=4",
        "--save_every_n_epochs=1",
        "--save_last_n_epochs=2",
        "--save_state",
        "--save_last_n_epochs_state=1",
    )
    assert sorted(p.name for p in out.iterdir()) == [
        "foo-000002.pt",
        "foo-000003-state",
        "foo-000003.pt",
        "foo-state",
        "foo.pt",
    ]


def test_an_epoch_ratio_a_state_at_the_end_and_step_states_kept_apart(data, tiny_sd1, tmp_path):
    """--save_n_epoch_ratio=2 over 4 epochs saves every second epoch; --save_state_on_train_end
    writes only the final state; --save_last_n_steps_state keeps fewer states than files."""
    ratio = tmp_path / "ratio"
    run_train(
        *common(data, ratio, tiny_sd1 / "model.safetensors"),
        "--token_string=mychar4",
        "--output_name=foo",
        "--max_train_epochs=4",
        "--save_n_epoch_ratio=2",
        "--save_state_on_train_end",
    )
    assert sorted(p.name for p in ratio.iterdir()) == ["foo-000002.pt", "foo-state", "foo.pt"]
    steps = tmp_path / "steps"
    run_train(
        *common(data, steps, tiny_sd1 / "model.safetensors"),
        "--token_string=mychar4",
        "--output_name=foo",
        "--max_train_steps=3",
        "--save_every_n_steps=1",
        "--save_last_n_steps=2",
        "--save_state",
        "--save_last_n_steps_state=1",
    )
    assert sorted(p.name for p in steps.iterdir()) == [
        "foo-state",
        "foo-step00000001.pt",
        "foo-step00000002-state",
        "foo-step00000002.pt",
        "foo-step00000003-state",
        "foo-step00000003.pt",
        "foo.pt",
    ]


def test_logs_go_to_a_folder_per_run_with_kohyas_tags(data, tiny_sd1, tmp_path):
    """Each run logs into its own folder with kohya's tags; like kohya, no hparams run is written
    unless --log_config asks for the config, which then holds no secret. --log_tracker_name names
    the tracker's folder, and --log_tracker_config gives TensorBoard's writer its arguments."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logs = tmp_path / "logs"
    secret = "sekrit-4711"
    trackers = tmp_path / "trackers.toml"
    trackers.write_text('[tensorboard]\nfilename_suffix = ".mine"\n')
    named = ["--log_tracker_name=mine", f"--log_tracker_config={trackers}"]
    for extra in ([], ["--log_config", f"--wandb_api_key={secret}", *named]):
        run_train(
            *common(data, tmp_path / "o", tiny_sd1 / "model.safetensors"),
            "--token_string=mychar4",
            "--init_word=toy",
            "--max_train_steps=4",
            f"--logging_dir={logs}",
            "--log_prefix=run_",
            *extra,
        )
        time.sleep(1.1)  # kohya names a run's folder by the second it starts
    runs = sorted(logs.iterdir())
    assert len(runs) == 2  # one folder per run
    assert all(re.fullmatch(r"run_\d{14}", run.name) for run in runs)
    plain = [p.relative_to(runs[0]) for p in runs[0].rglob("*") if p.is_file()]
    assert len(plain) == 1 and plain[0].parent == Path("textual_inversion")  # no hparams run
    events = sorted((runs[-1] / "mine").glob("events.out.tfevents.*.mine"))
    assert events
    accumulator = EventAccumulator(str(events[-1]))
    accumulator.Reload()
    tags = set(accumulator.Tags()["scalars"])
    assert {"loss", "lr", "loss/epoch", "loss/average", "norm/vector0"} <= tags
    assert [e.step for e in accumulator.Scalars("loss/epoch")] == [1, 2]  # 2 batches per epoch, 4 steps
    logged = b"".join(p.read_bytes() for p in runs[1].rglob("*") if p.is_file())
    assert b"token_string" in logged and b"mychar4" in logged  # the config is recorded
    assert secret.encode() not in logged and str(tiny_sd1).encode() not in logged  # no secret, no path


def test_metadata_records_every_metadata_option_and_the_timestep_range(data, tiny_sd1, tmp_path):
    """Each of kohya's --metadata_* options becomes modelspec.<name>; the thumbnail is embedded."""
    from PIL import Image

    from library.training.state import METADATA_OPTIONS

    thumbnail = tmp_path / "thumb.png"
    Image.new("RGB", (2, 2), "red").save(thumbnail)
    given = {name: f"my {name}" for name in METADATA_OPTIONS if name != "thumbnail"}
    out = tmp_path / "o"
    run_train(
        *common(data, out, tiny_sd1 / "model.safetensors"),
        "--token_string=mychar4",
        "--init_word=toy",
        "--max_train_steps=1",
        "--min_timestep=100",
        "--save_model_as=safetensors",
        *[f"--metadata_{name}={value}" for name, value in given.items()],
        f"--metadata_thumbnail={thumbnail}",
    )
    with safe_open(str(out / "mychar4.safetensors"), "pt") as f:
        metadata = f.metadata()
    assert metadata["modelspec.timestep_range"] == "100,1000"
    assert {name: metadata.get(f"modelspec.{name}") for name in given} == given
    assert metadata["modelspec.thumbnail"].startswith("data:image/png;base64,")


def readme_commands() -> list[list[str]]:
    """The README's example: the training command, then the generation command."""
    text = (ROOT / "README.md").read_text()
    block = text.split("kohya setups work unchanged:", 1)[1].split("```sh", 1)[1].split("```", 1)[0]
    commands = [c.strip() for c in block.replace("\\\n", " ").split("\n\n") if c.strip()]
    return [shlex.split(c) for c in commands]


def test_the_readme_example_chain_runs_as_written(tiny_sd1, tmp_path):
    """The README's two commands, with its paths pointed at a tiny model and folder, fewer steps and a
    smaller size: the file the trainer writes is the one the generator is told to load, and its
    word works in the prompt. Both run as a user's would on Linux, restarted under a preloaded library
    (``TI_ALLOCATOR``; the C math library stands in for tcmalloc, which a test machine may lack)."""
    train, generate = readme_commands()
    assert train[:2] == ["accelerate", "launch"] and generate[:2] == ["python", "gen_img_diffusers.py"]
    work = tmp_path / "work"
    make_images(tmp_path / "data/db/char1/10_mychar4", 2)  # kohya folder: the class tokens are the caption
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "model.safetensors").symlink_to(tiny_sd1 / "model.safetensors")
    work.mkdir()
    faster = {"--resolution=448,640": "--resolution=64,64", "--max_train_steps=400": "--max_train_steps=2"}
    train = [faster.get(arg, arg) for arg in train]
    train = [sys.executable, "-m", "accelerate.commands.launch", *train[2:]]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    preloaded = loaded_library_path("libm.so")
    if preloaded is not None:
        env["TI_ALLOCATOR"] = preloaded
    script = str(ROOT / "train_textual_inversion.py")
    train = [script if arg == "train_textual_inversion.py" else arg for arg in train]
    result = subprocess.run(
        train + ["--max_data_loader_n_workers=0"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    trained = result
    generate = [
        sys.executable,
        str(ROOT / "gen_img_diffusers.py"),
        *generate[2:],
        "--W=64",
        "--H=64",
        "--steps=2",
    ]
    result = subprocess.run(generate, cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "word 'mychar4'" in result.stderr and len(list((work / "out").glob("*.png"))) == 1
    if preloaded is not None:
        assert f"memory allocator: {preloaded}, preloaded at start" in trained.stderr
        assert f"memory allocator: {preloaded}, preloaded at start" in result.stderr


def loaded_library_path(name: str) -> str | None:
    """Where the library ``name`` this process has loaded lies (Linux), or None."""
    maps = Path("/proc/self/maps")
    if not maps.exists():
        return None
    paths = [line.split()[-1] for line in maps.read_text().splitlines() if "/" in line]
    return next((path for path in paths if Path(path).name.startswith(name)), None)
