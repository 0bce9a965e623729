"""The training loop on accelerate's mechanisms: LR schedule on several processes, gradient
accumulation across epoch ends, and exact resume from every kind of save point (real CLI runs)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from cli_helpers import common, launch_two, picture_folder, run_train
from safetensors.torch import load_file

data = picture_folder(3)  # an odd number of batches per epoch


def learning_rates(stderr: str) -> dict[int, float]:
    return {int(s): float(lr) for s, lr in re.findall(r"step (\d+): loss [^,]+, lr ([^,\s]+)", stderr)}


def final_vectors(folder: Path):
    return load_file(str(folder / "mychar4.safetensors"))["emb_params"]


TRAIN = [
    "--token_string=mychar4",
    "--init_word=toy",
    "--learning_rate=1e-2",
    "--save_model_as=safetensors",
    "--console_log_level=DEBUG",
    "--optimizer_type=AdamW",
]


@pytest.mark.parametrize("scheduler", ["cosine_with_restarts"])  # warm-up, cycles and restarts
def test_the_learning_rate_follows_the_same_course_on_one_and_two_processes(
    scheduler, data, tiny_sd1, tmp_path
):
    """kohya's single-GPU trajectory, whatever the number of processes (it used to stop at 1/N of its course)."""
    args = [*TRAIN, "--max_train_steps=4", f"--lr_scheduler={scheduler}", "--lr_scheduler_num_cycles=2"]
    model = tiny_sd1 / "model.safetensors"
    one = learning_rates(run_train(*common(data, tmp_path / "one", model), *args).stderr)
    port = 29531 if scheduler == "linear" else 29532
    two = learning_rates(run_train(*common(data, tmp_path / "two", model), *args, **launch_two(port)).stderr)
    assert sorted(one) == [1, 2, 3, 4] and one == pytest.approx(two)
    if scheduler == "linear":
        assert [one[s] for s in (1, 2, 3, 4)] == pytest.approx([7.5e-3, 5e-3, 2.5e-3, 0.0])


def test_accumulation_steps_at_each_epoch_end_and_resumes_exactly_from_every_save(data, tiny_sd1, tmp_path):
    """3 batches, 2 per step: each epoch has 2 optimizer steps (2 batches, then 1). A run resumed from an
    epoch save and one resumed from a step save end with the uninterrupted run's vectors."""
    model = tiny_sd1 / "model.safetensors"
    args = [*TRAIN, "--max_train_steps=6", "--gradient_accumulation_steps=2", "--lr_scheduler=cosine"]
    whole = run_train(
        *common(data, tmp_path / "whole", model),
        *args,
        "--save_every_n_epochs=1",
        "--save_every_n_steps=3",
        "--save_state",
    )
    assert "6 steps (3 epochs, 2 steps each)" in whole.stderr
    steps = [(int(s), int(e)) for s, e in re.findall(r"step (\d+), epoch (\d+): \[", whole.stderr)]
    assert [e for _, e in steps] == [0, 0, 0, 1, 1, 1, 2, 2, 2]  # every batch of every epoch is used
    assert [s for s, _ in steps] == [0, 0, 1, 2, 2, 3, 4, 4, 5]  # 2 batches, then 1, per epoch
    expected = final_vectors(tmp_path / "whole")
    for state in ("mychar4-000001-state", "mychar4-step00000003-state"):
        out = tmp_path / state
        run_train(*common(data, out, model), *args, f"--resume={tmp_path / 'whole' / state}")
        assert (final_vectors(out) - expected).abs().max().item() <= 1e-6, state
