"""What happens around the optimizer steps of a run: checks, logs, saves, samples, validation, the end.

The trainer's loop does the learning (batches, loss, backward, optimizer step) and calls this
object after each optimizer step and at each epoch's end; the cadence rules (``SaveCadence``,
``SampleSchedule``, ``ValidationSettings``) decide what is due. The run is finished at
``--max_train_steps`` or when early stopping says so.
"""

from __future__ import annotations

import logging

import torch

from library.training.checks import FiniteGuard, warn_if_vectors_frozen
from library.training.optimizers import optimizer_eval_mode, optimizer_train_mode
from library.training.run import Run
from library.training.samples import SampleSchedule, sample_images
from library.training.state import RunSaver
from library.training.step import DiffusionLoss
from library.training.tracking import TrainLogger
from library.training.validation import make_validation

logger = logging.getLogger(__name__)


class RunEvents:
    """The NaN guard, logs, saves, samples and validation of one run, built from the ``Run``."""

    def __init__(self, run: Run, loss: DiffusionLoss, tracker: TrainLogger):
        self.run = run
        self.tracker = tracker
        self.saver = RunSaver(run, run.embedding_metadata)
        self.saver.warn_if_final_exists()
        self.guard = FiniteGuard(
            run.word.vectors, self._save_last_good, run.lora.parameters if run.lora else ()
        )
        self.samples = SampleSchedule.from_settings(run.settings.sampling, run.word.num_vectors)
        self.validation = make_validation(run, loss, self.saver, tracker.log_validation)
        self.stopped = False  # by early stopping

    def _save_last_good(self, label: str, vectors, step: int, lora_weights: list[torch.Tensor]) -> str:
        """The last good vectors as ``name-<label>``; in pivotal tuning also the LoRA, its weights put
        back first (the run stops after this), as ``name_lora-<label>``."""
        path = self.saver.embedding(f"{self.saver.name}-{label}.{self.saver.extension}", vectors, step)
        if not lora_weights:
            return str(path)
        with torch.no_grad():
            for weight, good in zip(self.run.lora.parameters, lora_weights):
                weight.copy_(good)
        lora_path = self.saver.lora(f"{self.saver.lora_name}-{label}.safetensors", vectors=vectors, step=step)
        return f"{path} and {lora_path}"

    @property
    def finished(self) -> bool:
        return self.stopped or self.run.finished_steps

    def render_samples(self, epoch: int | None = None) -> None:
        """Sample images with the current vectors (the optimizer's evaluation weights, for schedule-free)."""
        optimizer_eval_mode(self.run.optimizer)
        sample_images(self.run, self.samples, epoch=epoch)
        optimizer_train_mode(self.run.optimizer)

    def after_step(self, loss: torch.Tensor, bar) -> None:
        """After optimizer step ``progress.global_step``: every process checks the same averaged loss
        (so a NaN, like early stopping, stops all of them together), then what is due happens."""
        run = self.run
        step, vectors = run.progress.global_step, run.word.vectors
        value = self.guard.after_step(run.accelerator.reduce(loss.detach(), reduction="mean"), vectors, step)
        warn_if_vectors_frozen(step, run.start_vectors, vectors)
        self.tracker.log_step(step, value, run.optimizer, run.lr_scheduler, vectors, bar)
        if self.saver.cadence.step_save_due(step):
            self.saver.intermediate(step=step)
        if self.samples.due_at_step(step):
            self.render_samples()
        if self.validation is not None and run.settings.validation.due_at_step(step):
            self.stopped = self.validation.evaluate(step, "step") or self.stopped

    def after_epoch(self) -> None:
        """The epoch's end, or the run's (kohya ends the last epoch there too, even part-way)."""
        run = self.run
        progress = run.progress
        finished = progress.batches_done_in_epoch >= run.length.batches_per_epoch
        if finished:
            progress.epoch += 1
            progress.batches_done_in_epoch = 0
        epoch = progress.epoch if finished else progress.epoch + 1
        self.tracker.log_epoch(epoch)
        if finished and self.saver.cadence.epoch_save_due(epoch):
            self.saver.intermediate(epoch=epoch)
        if self.samples.due_at_epoch(epoch):
            self.render_samples(epoch)
        if self.validation is not None and finished and run.settings.validation.due_at_epoch(epoch):
            self.stopped = self.validation.evaluate(progress.global_step, "epoch") or self.stopped

    def finish(self) -> None:
        """The final embedding (and state), named after --output_name."""
        run = self.run
        total = sum(float(v.detach().sum()) for v in run.word.vectors.values())
        logger.debug("process %d: final vectors sum %.9g", run.accelerator.process_index, total)
        if run.lora is not None:
            lora_total = sum(float(p.detach().double().sum()) for p in run.lora.parameters)
            logger.debug("process %d: final LoRA sum %.12g", run.accelerator.process_index, lora_total)
        self.guard.check_vectors(run.word.vectors, run.progress.global_step)
        optimizer_eval_mode(run.optimizer)
        run.accelerator.wait_for_everyone()
        self.saver.final()
