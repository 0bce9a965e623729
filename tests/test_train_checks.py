"""The NaN guard: a non-finite loss or vector stops the run and keeps the newest vectors known to be good."""

from __future__ import annotations

import pytest
import torch

from library.errors import UserError
from library.training.checks import FiniteGuard


class Run:
    """Drives a FiniteGuard the way the trainer's loop does: before_step, the update, after_step."""

    def __init__(self):
        self.vectors = torch.zeros(2, 4)
        self.saved: list[tuple[str, torch.Tensor, int]] = []
        self.guard = FiniteGuard(
            {"emb_params": self.vectors},
            lambda label, v, step, lora: self.saved.append((label, v["emb_params"].clone(), step)),
        )

    def step(self, step: int, loss: float, new_value: float) -> float:
        self.guard.before_step({"emb_params": self.vectors})
        self.vectors.fill_(new_value)  # the optimizer's update
        return self.guard.after_step(torch.tensor(loss), {"emb_params": self.vectors}, step)


def test_finite_steps_give_the_loss_and_save_nothing():
    run = Run()
    assert run.step(1, 0.25, 1.0) == pytest.approx(0.25)
    assert run.saved == []


def test_a_nan_loss_saves_the_vectors_from_before_the_step_that_produced_it():
    """The loss of step 3 was computed with the vectors of step 2: those are bad, step 1's are kept."""
    run = Run()
    run.step(1, 0.5, 1.0)
    run.step(2, 0.5, 2.0)
    with pytest.raises(UserError, match=r"the loss became nan at step 3; the last good vectors \(step 1\)"):
        run.step(3, float("nan"), 3.0)
    ((label, vectors, step),) = run.saved
    assert label == "last-good-step00000001" and step == 1 and torch.equal(vectors, torch.full((2, 4), 1.0))


def test_vectors_made_infinite_by_a_step_are_named_not_the_loss():
    """--learning_rate inf: the loss is still finite, the update is not."""
    run = Run()
    with pytest.raises(UserError, match=r"the vectors became inf at step 1 \(the loss was 0.5\)"):
        run.step(1, 0.5, float("inf"))
    ((label, vectors, step),) = run.saved
    assert step == 0 and torch.equal(vectors, torch.zeros(2, 4))  # the starting vectors gave a finite loss


def test_a_nan_at_the_first_step_saves_nothing():
    run = Run()
    with pytest.raises(UserError, match="with the starting vectors; nothing was saved"):
        run.step(1, float("nan"), 1.0)
    assert run.saved == []


def test_a_lora_weight_made_nan_by_a_step_is_named_and_the_good_lora_is_kept():
    vectors, lora = torch.zeros(2, 4), torch.zeros(3)
    saved = []
    guard = FiniteGuard(
        {"emb_params": vectors},
        lambda label, v, step, weights: saved.append((step, [w.clone() for w in weights])) or "files",
        [lora],
    )
    for step, value in ((1, 1.0), (2, float("nan"))):
        guard.before_step({"emb_params": vectors})
        lora.fill_(value)
        if step == 2:
            with pytest.raises(
                UserError,
                match=r"the LoRA's weights became nan at step 2 .*LoRA \(step 1\) are saved as files",
            ):
                guard.after_step(torch.tensor(0.5), {"emb_params": vectors}, step)
        else:
            guard.after_step(torch.tensor(0.5), {"emb_params": vectors}, step)
    ((step, (weights,)),) = saved
    assert step == 1 and torch.equal(weights, torch.ones(3))


def test_the_final_vectors_are_checked_before_the_final_save():
    run = Run()
    run.step(1, 0.5, 1.0)
    run.vectors[0, 0] = float("nan")
    with pytest.raises(UserError, match="the vectors became nan at step 1"):
        run.guard.check_vectors({"emb_params": run.vectors}, 1)
