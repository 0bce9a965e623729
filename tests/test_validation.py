"""Validation loss, early stopping, the best checkpoint and norm control (issue: know when to stop)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from cli_helpers import common, make_images, picture_folder, run_train
from safetensors import safe_open
from safetensors.torch import load_file

from library.errors import UserError
from library.models.loading import load_sd_model
from library.training.validation import EarlyStopping, ValidationSettings, validation_timesteps

# --- rules ---------------------------------------------------------------------------------------


def test_early_stopping_stops_on_a_flat_loss_and_not_on_a_falling_one():
    flat = EarlyStopping(window=20, threshold=0.15)
    rng = np.random.default_rng(0)
    values = list(np.linspace(1.0, 0.2, 30)) + list(0.2 + rng.normal(0, 1e-3, 40))  # falls, then flattens
    stops = [flat.should_stop(flat.update(v)) for v in values]
    assert not any(stops[:30]) and any(stops[30:])
    falling = EarlyStopping(window=20, threshold=0.15)
    assert not any(falling.should_stop(falling.update(v)) for v in np.linspace(1.0, 0.1, 40))


def test_validation_timesteps_are_kohyas():
    assert validation_timesteps(0, 1000) == [200, 400, 600, 800]
    assert validation_timesteps(500, 1000) == [600, 700, 800, 900]


def test_cadence_defaults():
    held_out = ValidationSettings()
    assert held_out.wanted(held_out=True) and not held_out.wanted(held_out=False)
    assert held_out.due_at_epoch(1) and not held_out.due_at_step(1)  # kohya: every epoch
    stopping = ValidationSettings(early_stopping=True)
    assert stopping.wanted(held_out=False) and stopping.due_at_step(7) and not stopping.due_at_epoch(1)
    assert ValidationSettings(validate_every_n_steps=5).due_at_step(10)
    with pytest.raises(UserError, match="--early_stopping_threshold 1.5"):
        ValidationSettings(early_stopping_threshold=1.5)


# --- through the CLI -----------------------------------------------------------------------------


data = picture_folder(3)


def validation_losses(stderr: str) -> dict[int, str]:
    return {int(s): v for s, v in re.findall(r"step (\d+): validation loss (\S+)", stderr)}


ARGS = [
    "--token_string=mychar4",
    "--init_word=toy",
    "--learning_rate=5e-2",
    "--save_model_as=safetensors",
    "--max_train_steps=4",
    "--validation_split=0.34",
    "--validate_every_n_steps=1",
]


def test_validation_losses_repeat_across_runs_and_resume_and_the_best_is_kept(data, tiny_sd1, tmp_path):
    model = tiny_sd1 / "model.safetensors"
    first = run_train(*common(data, tmp_path / "a", model), *ARGS, "--save_every_n_steps=2", "--save_state")
    losses = validation_losses(first.stderr)
    assert sorted(losses) == [1, 2, 3, 4] and len(set(losses.values())) > 1
    assert "1 images held out for validation" in first.stderr
    second = run_train(*common(data, tmp_path / "b", model), *ARGS)
    assert validation_losses(second.stderr) == losses
    resumed = run_train(
        *common(data, tmp_path / "c", model),
        *ARGS,
        f"--resume={tmp_path / 'a' / 'mychar4-step00000002-state'}",
    )
    assert validation_losses(resumed.stderr) == {3: losses[3], 4: losses[4]}
    best_step = min(losses, key=lambda s: float(losses[s]))
    with safe_open(str(tmp_path / "a" / "mychar4-best.safetensors"), "pt") as f:
        assert f.metadata()["ti_trainer.step"] == str(best_step)
    if best_step == 4:
        assert torch.equal(
            load_file(str(tmp_path / "a" / "mychar4-best.safetensors"))["emb_params"],
            load_file(str(tmp_path / "a" / "mychar4.safetensors"))["emb_params"],
        )


def test_early_stopping_ends_a_run_whose_loss_is_flat(data, tiny_sd1, tmp_path):
    """With a learning rate of 0 the fixed-batch loss never changes: DVAR's ratio is 0 once the window is full."""
    out = tmp_path / "o"
    result = run_train(
        *common(data, out, tiny_sd1 / "model.safetensors"),
        "--token_string=mychar4",
        "--init_word=toy",
        "--learning_rate=0",
        "--max_train_steps=20",
        "--early_stopping",
        "--early_stopping_window=3",
        "--save_model_as=pt",
    )
    assert "early stopping at step 3" in result.stderr
    assert "fixed training batch" in result.stderr
    assert torch.load(out / "mychar4.pt", weights_only=True)["step"] == 3


def test_preserved_norms_stay_at_the_init_words(data, tiny_sd1, tmp_path):
    out = tmp_path / "o"
    run_train(
        *common(data, out, tiny_sd1 / "model.safetensors"),
        "--token_string=mychar4",
        "--init_word=toy",
        "--learning_rate=0.5",
        "--max_train_steps=3",
        "--preserve_embedding_norm",
        "--num_vectors_per_token=2",
        "--save_model_as=safetensors",
    )
    model = load_sd_model(tiny_sd1 / "model.safetensors")
    toy = model.tokenizer("toy", add_special_tokens=False).input_ids[0]
    start = model.text_encoder.get_input_embeddings().weight[toy]
    vectors = load_file(str(out / "mychar4.safetensors"))["emb_params"]
    assert not torch.allclose(vectors[0], start)  # it trained
    assert torch.allclose(vectors.norm(dim=1), start.norm().expand(2), atol=1e-5)


@pytest.mark.parametrize(
    "flag, words",
    [
        ("--validate_every_n_steps=0", "must be 1"),
        ("--early_stopping_threshold=0", "between 0 and 1"),
        ("--early_stopping_window=1", "2 or more"),
        ("--max_validation_steps=0", "must be 1"),
    ],
)
def test_hostile_validation_options_are_refused_by_name(flag, words, tmp_path):
    """The options become settings once, at the command line: a bad value stops there, with its flag.

    (``--validation_split`` is checked with the dataset, which also reads it from a TOML: below.)
    """
    from library.errors import UserError
    from library.training.args import parse_args, run_settings

    args = parse_args(
        [
            "--pretrained_model_name_or_path=m",
            f"--train_data_dir={tmp_path}",
            "--output_dir=o",
            "--token_string=mychar4",
            flag,
        ]
    )
    with pytest.raises(UserError, match=re.escape(words)):
        run_settings(args)


def test_hostile_validation_options_end_in_one_line_or_a_warning(data, tiny_sd1, tmp_path):
    from cli_helpers import error_line

    model = tiny_sd1 / "model.safetensors"
    base = [
        *common(data, tmp_path / "o", model),
        "--token_string=mychar4",
        "--init_word=toy",
        "--max_train_steps=2",
    ]
    assert "validation_split 1.5" in error_line(run_train(*base, "--validation_split=1.5", check=False))
    alone = tmp_path / "alone"
    make_images(alone / "1_mychar4", 1, caption="mychar4")
    result = run_train(
        *common(alone, tmp_path / "p", model),
        "--token_string=mychar4",
        "--max_train_steps=2",
        "--validation_split=0.5",
        "--early_stopping",
    )
    assert "holds out no image" in result.stderr and "cannot stop early" in result.stderr
