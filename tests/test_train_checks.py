"""The NaN guard: a non-finite loss or vector stops the run and keeps the last good vectors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from library.errors import UserError
from library.train_checks import check_finite


def _check(loss: float, vectors: torch.Tensor, last_good: torch.Tensor, saved: list):
    return check_finite(
        torch.tensor(loss), vectors, 7, last_good, Path("out"), "emb", lambda name, step: saved.append(name)
    )


def test_finite_loss_and_vectors_give_the_loss_value():
    saved: list = []
    assert _check(0.25, torch.ones(2, 4), torch.zeros(2, 4), saved) == pytest.approx(0.25)
    assert saved == []


@pytest.mark.parametrize("loss, bad_vector", [(float("nan"), 0.0), (float("inf"), 0.0), (0.5, float("nan"))])
def test_non_finite_loss_or_vectors_restore_the_last_good_ones_and_stop(loss, bad_vector):
    vectors, last_good, saved = torch.ones(2, 4), torch.full((2, 4), 3.0), []
    vectors[1, 2] = vectors[1, 2] + bad_vector
    with pytest.raises(UserError, match="at step 7"):
        _check(loss, vectors, last_good, saved)
    assert torch.equal(vectors, last_good)
    assert saved == ["emb-last-good-step00000006.safetensors"]
