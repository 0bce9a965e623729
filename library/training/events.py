"""What happens around the optimizer steps of a run: checks, logs, saves, samples, validation, the end.

The trainer's loop does the learning (batches, loss, backward, optimizer step) and calls this
object after each optimizer step and at each epoch's end; the cadence rules (``SaveCadence``,
``SampleSchedule``, ``ValidationSettings``) decide what is due. The run is finished at
``--max_train_steps`` or when early stopping says so.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from library.training.cadence import RunLength, SaveCadence
from library.training.checks import FiniteGuard, warn_if_vectors_frozen
from library.training.optimizers import optimizer_eval_mode
from library.training.samples import SampleSchedule
from library.training.state import Progress, RunSaver
from library.training.tracking import TrainLogger
from library.training.validation import ValidationRun, ValidationSettings

logger = logging.getLogger(__name__)


@dataclass
class RunEvents:
    accelerator: Any
    progress: Progress
    length: RunLength
    vectors: torch.nn.Parameter
    optimizer: Any
    lr_scheduler: Any
    guard: FiniteGuard
    tracker: TrainLogger
    saver: RunSaver
    saves: SaveCadence
    samples: SampleSchedule
    render_samples: Callable[[int | None], None]  # (epoch or None for a step sample)
    validation: ValidationRun | None
    validation_settings: ValidationSettings
    start_vectors: torch.Tensor
    stopped: bool = False  # by early stopping

    @property
    def finished(self) -> bool:
        return self.stopped or self.progress.global_step >= self.length.max_train_steps

    def after_step(self, loss: torch.Tensor, bar) -> None:
        """After optimizer step ``progress.global_step``: every process checks the same averaged loss
        (so a NaN, like early stopping, stops all of them together), then what is due happens."""
        step = self.progress.global_step
        value = self.guard.after_step(
            self.accelerator.reduce(loss.detach(), reduction="mean"), self.vectors, step
        )
        warn_if_vectors_frozen(step, self.start_vectors, self.vectors)
        self.tracker.log_step(step, value, self.optimizer, self.lr_scheduler, self.vectors, bar)
        if self.saves.step_save_due(step):
            self.saver.intermediate(step=step)
        if self.samples.due_at_step(step):
            self.render_samples(None)
        if self.validation is not None and self.validation_settings.due_at_step(step):
            self.stopped = self.validation.evaluate(step, "step") or self.stopped

    def after_epoch(self) -> None:
        """The epoch's end, or the run's (kohya ends the last epoch there too, even part-way)."""
        progress = self.progress
        finished = progress.batches_done_in_epoch >= self.length.batches_per_epoch
        if finished:
            progress.epoch += 1
            progress.batches_done_in_epoch = 0
        epoch = progress.epoch if finished else progress.epoch + 1
        self.tracker.log_epoch(epoch)
        if finished and self.saves.epoch_save_due(epoch):
            self.saver.intermediate(epoch=epoch)
        if self.samples.due_at_epoch(epoch):
            self.render_samples(epoch)
        if self.validation is not None and finished and self.validation_settings.due_at_epoch(epoch):
            self.stopped = self.validation.evaluate(progress.global_step, "epoch") or self.stopped

    def finish(self, with_state: bool) -> None:
        """The final embedding (and state), named after --output_name."""
        logger.debug(
            "process %d: final vectors sum %.9g", self.accelerator.process_index, self.vectors.sum().item()
        )
        self.guard.check_vectors(self.vectors, self.progress.global_step)
        optimizer_eval_mode(self.optimizer)
        self.accelerator.wait_for_everyone()
        self.saver.final(with_state=with_state)
