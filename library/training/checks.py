"""Guardrails: stop early with a clear message when a run cannot learn or has gone wrong."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path

import torch

from library.errors import UserError

logger = logging.getLogger(__name__)

FROZEN_CHECK_STEP = 10  # after this many steps, vectors that have not moved mean nothing is learned


class FiniteGuard:
    """Stop a run whose loss or vectors stop being finite, keeping the newest vectors known to be good.

    The loss of step t is computed with the vectors from before step t. So a finite loss at step t
    vouches for the vectors of step t - 1, not for the ones the optimizer then writes; those are
    checked at the next step, or (for the last step) by ``check_vectors``. Loss and vectors are read
    in one transfer, so a GPU step waits for the device once (for the loss the progress bar shows).
    """

    def __init__(self, vectors: torch.Tensor, save: Callable[[str, torch.Tensor, int], Path]):
        self.save = save  # (file name, vectors, step) -> the path written
        self.before = vectors.detach().clone()  # the vectors the current step's loss was computed with
        self.good: torch.Tensor | None = None
        self.good_step = 0

    def before_step(self, vectors: torch.Tensor) -> None:
        """Call before the optimizer step: remember the vectors this step's loss was computed with."""
        self.before.copy_(vectors.detach())

    def after_step(self, loss: torch.Tensor, vectors: torch.Tensor, step: int) -> float:
        """The loss as a float; on NaN/inf in the loss or the new vectors, save the last good vectors and stop."""
        value, vectors_finite = torch.stack(
            [loss.detach().float().reshape(()), torch.isfinite(vectors.detach()).all().float()]
        ).tolist()
        if not math.isfinite(value):
            self.stop(f"the loss became {value} at step {step}")
        self.good = self.before.clone() if self.good is None else self.good.copy_(self.before)
        self.good_step = step - 1
        if not vectors_finite:
            self.stop(
                f"the vectors became {_non_finite_kind(vectors)} at step {step} (the loss was {value:.4g})"
            )
        return value

    def check_vectors(self, vectors: torch.Tensor, step: int) -> None:
        """Before the final save: vectors the last step made non-finite are not saved."""
        if not torch.isfinite(vectors.detach()).all():
            self.stop(f"the vectors became {_non_finite_kind(vectors)} at step {step}")

    def stop(self, what: str) -> None:
        advice = "Try a lower --learning_rate, --max_grad_norm 1.0, or --mixed_precision bf16 or no instead of fp16"
        if self.good is None:
            raise UserError(f"{what}, with the starting vectors; nothing was saved. {advice}")
        path = self.save(f"last-good-step{self.good_step:08d}", self.good, self.good_step)
        raise UserError(
            f"{what}; the last good vectors (step {self.good_step}) are saved as {path}. {advice}"
        )


def _non_finite_kind(vectors: torch.Tensor) -> str:
    return "nan" if torch.isnan(vectors).any() else "inf"


def warn_if_vectors_frozen(step: int, start: torch.Tensor, vectors: torch.Tensor) -> None:
    """After ``FROZEN_CHECK_STEP`` steps, vectors identical to their start mean nothing is learned."""
    if step == FROZEN_CHECK_STEP and torch.equal(start, vectors.detach()):
        logger.warning(
            "after %d steps the vectors have not changed at all: check that the captions contain the token "
            "string and that --learning_rate is not 0",
            step,
        )


def warn_if_resume_is_done(resumed_step: int, max_train_steps: int) -> None:
    """A state saved at or past --max_train_steps resumes into a run with nothing left to do."""
    if resumed_step >= max_train_steps:
        logger.warning(
            "the resumed state is at step %d and --max_train_steps is %d: no step is left, the embedding is "
            "saved as it is; raise --max_train_steps (or --max_train_epochs) to train on",
            resumed_step,
            max_train_steps,
        )
