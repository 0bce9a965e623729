"""Guardrails: stop early with a clear message when a run cannot learn or has gone wrong."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch

from library.errors import UserError

logger = logging.getLogger(__name__)

FROZEN_CHECK_STEP = 10  # after this many steps, vectors that have not moved mean nothing is learned


Vectors = Mapping[str, torch.Tensor]  # each text encoder's rows of the new word (``NewWord.vectors``)


class FiniteGuard:
    """Stop a run whose loss or trained weights stop being finite, keeping the newest ones known to be good.

    The loss of step t is computed with the weights from before step t. So a finite loss at step t
    vouches for the weights of step t - 1, not for the ones the optimizer then writes; those are
    checked at the next step, or (for the last step) by ``check_vectors``. The weights are the new
    word's vectors and, in pivotal tuning, the LoRA's. Loss and finiteness are read in one
    transfer, so a GPU step waits for the device once (for the loss the progress bar shows).
    """

    def __init__(
        self,
        vectors: Vectors,
        save: Callable[[str, Vectors, int, list[torch.Tensor]], object],
        lora_weights: Sequence[torch.Tensor] = (),
    ):
        self.save = save  # (file label, vectors, step, LoRA weights) -> what was written, for the message
        self.lora_weights = list(lora_weights)
        self.before = _copy(vectors)  # the vectors the current step's loss was computed with
        self.lora_before = [weight.detach().clone() for weight in self.lora_weights]
        self.good: dict[str, torch.Tensor] | None = None
        self.good_lora = [kept.clone() for kept in self.lora_before]  # two buffers, swapped each step
        self.good_step = 0

    def before_step(self, vectors: Vectors) -> None:
        """Call before the optimizer step: remember the weights this step's loss was computed with."""
        for key, value in vectors.items():
            self.before[key].copy_(value.detach())
        for kept, weight in zip(self.lora_before, self.lora_weights):
            kept.copy_(weight.detach())

    def after_step(self, loss: torch.Tensor, vectors: Vectors, step: int) -> float:
        """The loss as a float; on NaN/inf in the loss or the new weights, save the last good ones and stop."""
        flags = [_all_finite(vectors.values())] + (
            [_all_finite(self.lora_weights)] if self.lora_weights else []
        )
        value, vectors_finite, *lora_finite = torch.stack(
            [loss.detach().float().reshape(()), *flags]
        ).tolist()
        if not math.isfinite(value):
            self.stop(f"the loss became {value} at step {step}")
        self.good = _copy(self.before)
        self.good_lora, self.lora_before = self.lora_before, self.good_lora  # no copy of the LoRA per step
        self.good_step = step - 1
        if not vectors_finite:
            self.stop(
                f"the vectors became {_non_finite_kind(vectors.values())} at step {step} (the loss was {value:.4g})"
            )
        if lora_finite and not lora_finite[0]:
            self.stop(
                f"the LoRA's weights became {_non_finite_kind(self.lora_weights)} at step {step} "
                f"(the loss was {value:.4g})"
            )
        return value

    def check_vectors(self, vectors: Vectors, step: int) -> None:
        """Before the final save: weights the last step made non-finite are not saved."""
        if not bool(_all_finite(vectors.values())):
            self.stop(f"the vectors became {_non_finite_kind(vectors.values())} at step {step}")
        if self.lora_weights and not bool(_all_finite(self.lora_weights)):
            self.stop(f"the LoRA's weights became {_non_finite_kind(self.lora_weights)} at step {step}")

    def stop(self, what: str) -> None:
        advice = "Try a lower --learning_rate, --max_grad_norm 1.0, or --mixed_precision bf16 or no instead of fp16"
        if self.good is None:
            raise UserError(f"{what}, with the starting vectors; nothing was saved. {advice}")
        label = f"last-good-step{self.good_step:08d}"
        written = self.save(label, self.good, self.good_step, self.good_lora)
        kept = "vectors and LoRA" if self.lora_weights else "vectors"
        raise UserError(
            f"{what}; the last good {kept} (step {self.good_step}) are saved as {written}. {advice}"
        )


def _copy(vectors: Vectors) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in vectors.items()}


def _all_finite(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """1.0 when every value of every tensor is finite, as a tensor on their device: no device wait."""
    return torch.stack([torch.isfinite(value.detach()).all() for value in tensors]).all().float()


def _non_finite_kind(tensors: Iterable[torch.Tensor]) -> str:
    return "nan" if any(bool(torch.isnan(value).any()) for value in tensors) else "inf"


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
