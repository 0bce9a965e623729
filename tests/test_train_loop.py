"""The training loop on accelerate's mechanisms: gradient accumulation across epoch ends and exact
resume from every kind of save point (real CLI runs). Several processes: test_train_cli.py."""

from __future__ import annotations

import re
from pathlib import Path

from cli_helpers import common, picture_folder, run_train
from safetensors.torch import load_file

data = picture_folder(3)  # an odd number of batches per epoch


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
