"""The trackers' settings: --log_tracker_config and --wandb_run_name reach the trackers' init
arguments, and a file that cannot serve is one line before the model loads."""

from __future__ import annotations

import pytest
from cli_helpers import common, error_line, run_train

from library.training.tracking import TrackerSettings, TrainLogger


class RecordingAccelerator:
    log_with = ["tensorboard"]

    def init_trackers(self, project_name, config=None, init_kwargs=None):
        self.project_name, self.init_kwargs = project_name, init_kwargs


@pytest.mark.parametrize(
    "name, text",
    [
        ("trackers.toml", '[tensorboard]\nfilename_suffix = ".mine"\n[wandb]\ntags = ["a"]\n'),
        ("trackers.json", '{"tensorboard": {"filename_suffix": ".mine"}, "wandb": {"tags": ["a"]}}'),
    ],
)
def test_the_tracker_config_and_the_wandb_run_name_reach_the_trackers(tmp_path, name, text):
    (tmp_path / name).write_text(text)
    settings = TrackerSettings(
        logging_dir=str(tmp_path),
        log_tracker_name="mine",
        log_tracker_config=str(tmp_path / name),
        wandb_run_name="r1",
    )
    accelerator = RecordingAccelerator()
    TrainLogger(accelerator, settings, None, "AdamW")
    assert accelerator.project_name == "mine"
    assert accelerator.init_kwargs == {
        "tensorboard": {"filename_suffix": ".mine"},
        "wandb": {"tags": ["a"], "name": "r1"},
    }
    accelerator = RecordingAccelerator()
    TrainLogger(accelerator, TrackerSettings(logging_dir=str(tmp_path)), None, "AdamW")
    assert (accelerator.project_name, accelerator.init_kwargs) == ("textual_inversion", {})


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("missing.toml", None, "cannot read"),
        ("broken.toml", "[tensorboard\n", "cannot parse"),
        ("broken.json", "{", "cannot parse"),
        ("flat.toml", 'filename_suffix = ".mine"\n', "expected one table of init arguments per tracker"),
        ("latin1.toml", b"[tensorboard]\ncomment = '\xe9'\n", "not UTF-8 text"),
    ],
)
def test_a_tracker_config_that_cannot_serve_is_one_line_before_the_model(tmp_path, name, text, message):
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    elif text is not None:
        path.write_text(text)
    result = run_train(
        *common(tmp_path, tmp_path / "o", tmp_path / "never-read.safetensors"),
        "--token_string=mychar4",
        f"--log_tracker_config={path}",
        check=False,
    )
    assert error_line(result).startswith(f"error: --log_tracker_config {path}: {message}")
