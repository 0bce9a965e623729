"""Guardrails: stop early with a clear message when a run cannot learn or has gone wrong."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from library.errors import UserError

logger = logging.getLogger(__name__)

FROZEN_CHECK_STEP = 10  # after this many steps, vectors that have not moved mean nothing is learned


Vectors = Mapping[str, torch.Tensor]  # each text encoder's rows of the new word (``NewWord.vectors``)


class FiniteGuard:
    """Stop a run whose loss or vectors stop being finite, keeping the newest vectors known to be good.

    The loss of step t is computed with the vectors from before step t. So a finite loss at step t
    vouches for the vectors of step t - 1, not for the ones the optimizer then writes; those are
    checked at the next step, or (for the last step) by ``check_vectors``. Loss and vectors are read
    in one transfer, so a GPU step waits for the device once (for the loss the progress bar shows).
    """

    def __init__(self, vectors: Vectors, save: Callable[[str, Vectors, int], Path]):
        self.save = save  # (file name, vectors, step) -> the path written
        self.before = _copy(vectors)  # the vectors the current step's loss was computed with
        self.good: dict[str, torch.Tensor] | None = None
        self.good_step = 0

    def before_step(self, vectors: Vectors) -> None:
        """Call before the optimizer step: remember the vectors this step's loss was computed with."""
        for key, value in vectors.items():
            self.before[key].copy_(value.detach())

    def after_step(self, loss: torch.Tensor, vectors: Vectors, step: int) -> float:
        """The loss as a float; on NaN/inf in the loss or the new vectors, save the last good vectors and stop."""
        value, vectors_finite = torch.stack(
            [loss.detach().float().reshape(()), _all_finite(vectors)]
        ).tolist()
        if not math.isfinite(value):
            self.stop(f"the loss became {value} at step {step}")
        self.good = _copy(self.before)
        self.good_step = step - 1
        if not vectors_finite:
            self.stop(
                f"the vectors became {_non_finite_kind(vectors)} at step {step} (the loss was {value:.4g})"
            )
        return value

    def check_vectors(self, vectors: Vectors, step: int) -> None:
        """Before the final save: vectors the last step made non-finite are not saved."""
        if not bool(_all_finite(vectors)):
            self.stop(f"the vectors became {_non_finite_kind(vectors)} at step {step}")

    def stop(self, what: str) -> None:
        advice = "Try a lower --learning_rate, --max_grad_norm 1.0, or --mixed_precision bf16 or no instead of fp16"
        if self.good is None:
            raise UserError(f"{what}, with the starting vectors; nothing was saved. {advice}")
        path = self.save(f"last-good-step{self.good_step:08d}", self.good, self.good_step)
        raise UserError(
            f"{what}; the last good vectors (step {self.good_step}) are saved as {path}. {advice}"
        )


def _copy(vectors: Vectors) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in vectors.items()}


def _all_finite(vectors: Vectors) -> torch.Tensor:
    return torch.stack([torch.isfinite(value.detach()).all() for value in vectors.values()]).all().float()


def _non_finite_kind(vectors: Vectors) -> str:
    return "nan" if any(bool(torch.isnan(value).any()) for value in vectors.values()) else "inf"


def warn_if_vectors_frozen(step: int, start: Vectors, vectors: Vectors) -> None:
    """After ``FROZEN_CHECK_STEP`` steps, vectors identical to their start mean nothing is learned."""
    if step == FROZEN_CHECK_STEP and all(
        torch.equal(start[key], value.detach()) for key, value in vectors.items()
    ):
        logger.warning(
            "after %d steps the vectors have not changed at all: check that the captions contain the token "
            "string and that --learning_rate is not 0",
            step,
        )
