"""Hostile input through the real CLIs: one clear line (exit 2), nothing already written lost.

Each case here once ended in a traceback, a silently wrong result or a lost file.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import ROOT, common, error_line, make_images, picture_folder, run_train
from PIL import Image
from safetensors.torch import load_file

WORD = ["--token_string=mychar4", "--init_word=toy"]


data = picture_folder(2)


def test_a_diverging_run_keeps_vectors_a_finite_loss_vouched_for(data, tiny_sd1, tmp_path):
    """--learning_rate 1e30 used to save the 1e30 vectors as 'last good'; the generator then drew black."""
    out = tmp_path / "o"
    result = run_train(
        *common(data, out, tiny_sd1 / "model.safetensors"),
        *WORD,
        "--learning_rate=1e30",
        "--max_train_steps=10",
        "--max_grad_norm=0",
        "--optimizer_type=SGDNesterov",
        "--save_model_as=safetensors",
        check=False,
    )
    line = error_line(result)
    assert result.stderr.rstrip().splitlines()[-1] == line  # no progress bar printed after the error
    (saved,) = out.glob("mychar4-last-good-step*.safetensors")
    vectors = load_file(str(saved))["emb_params"]
    assert torch.isfinite(vectors).all() and vectors.abs().max() < 10, vectors.abs().max()
    assert "became" in line and str(saved) in line


def test_a_learning_rate_beyond_float32_is_refused_before_the_model_loads(data, tiny_sd1, tmp_path):
    """1e39 is a finite number but not an fp32 one: it used to end in a traceback inside the optimizer
    (a non-finite update is caught by the NaN guard, tests/test_train_checks.py)."""
    result = run_train(
        *common(data, tmp_path / "o", tiny_sd1 / "model.safetensors"),
        *WORD,
        "--learning_rate=1e39",
        check=False,
    )
    assert "--learning_rate 1e+39: must be a finite number" in error_line(result)
    assert "loading" not in result.stderr.lower()


def damage(state: Path, how: str) -> str:
    """Damage one file of a state folder the way the issue did; returns the file's name."""
    if how == "half vectors":
        data = (state / "vectors.safetensors").read_bytes()
        (state / "vectors.safetensors").write_bytes(data[: len(data) // 2])
        return "vectors.safetensors"
    if how == "broken progress":
        (state / "progress.json").write_text('{"format": 1, "seed": ')
        return "progress.json"
    if how == "empty scheduler":
        (state / "lr_scheduler.pt").write_bytes(b"")
        return "lr_scheduler.pt"
    if how == "half optimizer":
        data = (state / "optimizer.pt").read_bytes()
        (state / "optimizer.pt").write_bytes(data[: len(data) // 2])
        return "optimizer.pt"
    if how == "code in optimizer":

        class Payload:
            def __reduce__(self):
                return (os.system, ("echo pwned > /tmp/pwned-by-state",))

        (state / "optimizer.pt").write_bytes(pickle.dumps(Payload()))
        return "optimizer.pt"
    raise ValueError(how)


@pytest.fixture(scope="module")
def state(data, tiny_sd1, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("state")
    run_train(
        *common(data, out, tiny_sd1 / "model.safetensors"), *WORD, "--max_train_steps=1", "--save_state"
    )
    return out / "mychar4-state"


@pytest.mark.parametrize(
    "how", ["half vectors", "broken progress", "empty scheduler", "half optimizer", "code in optimizer"]
)
def test_a_damaged_state_folder_is_named_in_one_line(how, state, data, tiny_sd1, tmp_path):
    copy = tmp_path / "state"
    subprocess.run(["cp", "-r", str(state), str(copy)], check=True)
    name = damage(copy, how)
    result = run_train(
        *common(data, tmp_path / "o", tiny_sd1 / "model.safetensors"),
        *WORD,
        "--max_train_steps=2",
        f"--resume={copy}",
        check=False,
    )
    line = error_line(result)
    assert str(copy / name) in line and "weights_only" not in result.stderr
    assert not Path("/tmp/pwned-by-state").exists()


def test_resuming_a_finished_state_says_nothing_is_left(state, data, tiny_sd1, tmp_path):
    result = run_train(
        *common(data, tmp_path / "o", tiny_sd1 / "model.safetensors"),
        *WORD,
        "--max_train_steps=1",
        f"--resume={state}",
    )
    assert "no step is left" in result.stderr


def test_unwritable_outputs_are_found_before_the_model_loads(data, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    model = tmp_path / "no-model-needed.safetensors"  # never reached: the folder check comes first
    for out, words in ((a_file, "this is a file"), (a_file / "sub", "cannot create the folder")):
        result = run_train(*common(data, out, model), *WORD, check=False)
        assert words in error_line(result) and "--output_dir" in error_line(result)
    generate = subprocess.run(
        [
            sys.executable,
            str(ROOT / "gen_img_diffusers.py"),
            "--ckpt",
            str(model),
            "--outdir",
            str(a_file),
            "--prompt",
            "x",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert generate.returncode == 2 and "--outdir" in generate.stderr and "this is a file" in generate.stderr


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_output_folder_is_found_before_the_model_loads(data, tmp_path):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    result = run_train(*common(data, out, tmp_path / "none.safetensors"), *WORD, check=False)
    assert "cannot write into this folder" in error_line(result)


def test_a_second_run_keeps_the_first_result_and_removes_only_leftovers_of_dead_writers(
    data, tiny_sd1, tmp_path
):
    out = tmp_path / "o"
    args = [
        *common(data, out, tiny_sd1 / "model.safetensors"),
        *WORD,
        "--max_train_steps=1",
        "--learning_rate=1e-2",
    ]
    run_train(*args)
    first = (out / "mychar4.pt").read_bytes()
    dead, alive = _dead_pid(), os.getpid()
    (out / f".mychar4.pt.p{dead}.0123abcd.tmp").write_bytes(b"half")  # what a killed save leaves
    (out / f".mychar4-state-p{dead}-0123abcd").mkdir()
    (out / f".other.pt.p{alive}.0123abcd.tmp").write_bytes(b"being written")  # another run's save, now
    (out / f".other-state-p{alive}-0123abcd").mkdir()
    old_file, young_file = out / ".mychar4.pt.0123abcd.tmp", out / ".x.pt.4567cdef.tmp"  # older versions'
    old_file.write_bytes(b"half")
    young_file.write_bytes(b"half")
    os.utime(old_file, (time.time() - 7200, time.time() - 7200))
    second = run_train(*args, "--seed=7")
    assert "exists from an earlier run" in second.stderr
    assert (out / "mychar4.pt.bak").read_bytes() == first and (out / "mychar4.pt").read_bytes() != first
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [
            "mychar4.pt",
            "mychar4.pt.bak",
            young_file.name,
            f".other.pt.p{alive}.0123abcd.tmp",
            f".other-state-p{alive}-0123abcd",
        ]
    )


def _dead_pid() -> int:
    """The id of a process that has ended."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_two_runs_saving_into_one_folder_leave_each_other_alone(data, tiny_sd1, tmp_path):
    """Two real trainers in one --output_dir, one saving every step while the other starts (and
    cleans up leftovers): both finish, and every file of each is there."""
    out = tmp_path / "o"
    base = [*common(data, out, tiny_sd1 / "model.safetensors"), *WORD, "--learning_rate=1e-2"]
    long_run = [
        *base,
        "--max_train_steps=40",
        "--save_every_n_steps=1",
        "--save_state",
        "--output_name=first",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(
        [sys.executable, str(ROOT / "train_textual_inversion.py"), *long_run],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    seconds = 0.0
    while not list(out.glob("first-step*")) and seconds < 120:  # the first run is saving
        time.sleep(0.05)
        seconds += 0.05
    run_train(*base, "--max_train_steps=2", "--output_name=second")
    _, errors = first.communicate(timeout=600)
    assert first.returncode == 0, errors[-3000:]
    steps = sorted(p.name for p in out.glob("first-step*.pt"))
    assert len(steps) == 40 and (out / "first.pt").is_file() and (out / "second.pt").is_file()


def test_odd_pictures_and_captions_are_reported(tiny_sd1, tmp_path):
    data = tmp_path / "data"
    folder = data / "1_mychar4 toy"
    make_images(folder, 1, caption="mychar4 " + " ".join(["word"] * 80))
    Image.new("RGB", (1, 1), (200, 10, 10)).save(folder / "dot.png")
    (folder / "dot.txt").write_text("a mychar4 dot")
    out = tmp_path / "o"
    result = run_train(
        *common(data, out, tiny_sd1 / "model.safetensors"),
        *WORD,
        "--num_vectors_per_token=2",
        "--debug_dataset",
    )
    log = result.stdout + result.stderr
    assert "enlarged more than 4x" in log and "dot.png: 1x1" in log
    assert "longer than the 75-token window" in log


def test_a_16_bit_picture_trains_as_it_looks_not_white(tiny_sd1, tmp_path):
    folder = tmp_path / "data" / "1_mychar4"
    folder.mkdir(parents=True)
    Image.fromarray((np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16)).save(
        folder / "grey16.png"
    )
    out = tmp_path / "o"
    run_train(*common(tmp_path / "data", out, tiny_sd1 / "model.safetensors"), *WORD, "--debug_dataset")
    sheet = np.asarray(Image.open(next(out.glob("*.png"))).convert("L"))
    mid_grey = ((sheet > 60) & (sheet < 190)).mean()  # the ramp's middle; clipped, it was all white
    assert mid_grey > 0.1, mid_grey


def test_the_word_inside_other_words_is_left_alone_in_training_captions(tiny_sd1, tmp_path):
    data = tmp_path / "data"
    make_images(data / "1_x", 1, caption="supermychar4 mychar4x and mychar4, 1girl")
    result = run_train(
        *common(data, tmp_path / "o", tiny_sd1 / "model.safetensors"), *WORD, "--debug_dataset"
    )
    ids_line = next(line for line in (result.stdout + result.stderr).splitlines() if "input ids" in line)
    assert ids_line.count("49408") == 1, ids_line


def test_json_state_with_extra_fields_is_named(state, data, tiny_sd1, tmp_path):
    copy = tmp_path / "state"
    subprocess.run(["cp", "-r", str(state), str(copy)], check=True)
    info = json.loads((copy / "progress.json").read_text())
    info["global_step"] = "many"
    (copy / "progress.json").write_text(json.dumps(info))
    result = run_train(
        *common(data, tmp_path / "o", tiny_sd1 / "model.safetensors"), *WORD, f"--resume={copy}", check=False
    )
    assert "progress.json does not hold the counters" in error_line(result)


@pytest.fixture
def tiny_disk(tmp_path):
    """A 256 KB tmpfs, where this machine lets the tests mount one (root in a sandbox); else skipped."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip("cannot mount a tmpfs here: " + mounted.stderr.decode(errors="replace").strip())
    yield disk
    subprocess.run(["umount", str(disk)], check=False)


def test_a_full_disk_at_the_final_save_keeps_the_earlier_result_and_says_so(data, tiny_sd1, tiny_disk):
    out = tiny_disk / "o"
    args = [*common(data, out, tiny_sd1 / "model.safetensors"), *WORD, "--max_train_steps=1"]
    run_train(*args)
    earlier = (out / "mychar4.pt").read_bytes()
    filler = tiny_disk / "filler"
    with filler.open("wb", buffering=0) as f:  # fill the disk to the last block
        try:
            while True:
                f.write(b"\0" * 4096)
                f.flush()
        except OSError:
            pass
    result = run_train(*args, "--seed=7", check=False)
    line = error_line(result)
    assert "No space left on device" in line and "the earlier run's mychar4.pt is untouched" in line
    assert (out / "mychar4.pt").read_bytes() == earlier
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no half-written temporary left
