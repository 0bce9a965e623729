"""Knowing when to stop: a validation loss that means something, early stopping, the best vectors.

The training loss is noise: every step draws other images, noise and timesteps. The validation
loss here is the same diffusion loss computed on the **same** inputs every time: held-out images
(``--validation_split``) or, with none held out, a fixed batch of training images (the DVAR idea,
arXiv 2302.04841), each scored at kohya's validation timesteps (200, 400, 600 and 800, within
``--min/max_timestep``) with noise drawn from ``--validation_seed``. Only the vectors change
between two evaluations, so the curve is smooth and comparable across steps, runs and resumes.

Early stopping (``--early_stopping``) is DVAR's rule: once ``window`` values exist, stop when the
variance of the last ``window`` values falls below ``threshold`` times the variance of all of
them (the loss has flattened compared to its own history). The paper's defaults: a window of
200 evaluations, a threshold of 0.15.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np
import torch

from library.errors import UserError
from library.training.noise import NUM_TRAIN_TIMESTEPS
from library.training.step import DiffusionLoss

if TYPE_CHECKING:
    from library.training.run import Run
    from library.training.state import RunSaver

logger = logging.getLogger(__name__)

VALIDATION_TIMESTEP_COUNT = 4  # kohya: linspace(min, max, 6)[1:-1], i.e. 200, 400, 600, 800
VALIDATION_STREAM = 1 << 20  # in place of a process rank: validation draws never meet training draws


@dataclass(frozen=True)
class ValidationSettings:
    """The validation options (kohya's names, plus ours for early stopping)."""

    validate_every_n_steps: int | None = None
    validate_every_n_epochs: int | None = None
    max_validation_steps: int | None = None
    early_stopping: bool = False
    early_stopping_window: int = 200
    early_stopping_threshold: float = 0.15

    def __post_init__(self) -> None:
        for name in ("validate_every_n_steps", "validate_every_n_epochs", "max_validation_steps"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UserError(f"--{name} {value}: must be 1 or more")
        if self.early_stopping_window < 2:
            raise UserError(f"--early_stopping_window {self.early_stopping_window}: must be 2 or more")
        if not 0.0 < self.early_stopping_threshold < 1.0:
            raise UserError(
                f"--early_stopping_threshold {self.early_stopping_threshold}: must be between 0 and 1"
            )

    def wanted(self, held_out: bool) -> bool:
        """Validation runs when images are held out, or a cadence or early stopping asks for it."""
        return bool(
            held_out or self.validate_every_n_steps or self.validate_every_n_epochs or self.early_stopping
        )

    @property
    def every_n_steps(self) -> int | None:
        """Early stopping scores every step unless told otherwise (DVAR's cadence)."""
        if self.validate_every_n_steps is None and self.early_stopping and not self.validate_every_n_epochs:
            return 1
        return self.validate_every_n_steps

    def due_at_step(self, step: int) -> bool:
        every = self.every_n_steps
        return bool(every) and step % every == 0

    def due_at_epoch(self, epoch: int) -> bool:
        """kohya: every epoch when there is a validation set and no cadence was given."""
        if self.validate_every_n_epochs:
            return epoch % self.validate_every_n_epochs == 0
        return self.every_n_steps is None


def validation_timesteps(min_timestep: int, max_timestep: int) -> list[int]:
    """kohya's: evenly inside the trained range, ends excluded (200, 400, 600, 800 by default)."""
    points = np.linspace(min_timestep, max_timestep, VALIDATION_TIMESTEP_COUNT + 2, dtype=int)[1:-1]
    return [min(int(t), NUM_TRAIN_TIMESTEPS - 1) for t in points]


@dataclass
class Validator:
    """Scores the current vectors on fixed batches, timesteps and noise."""

    batches: list[dict]
    loss: DiffusionLoss
    seed: int
    timesteps: list[int]

    @torch.no_grad()
    def score(self) -> float:
        total, count = 0.0, 0
        for index, batch in enumerate(self.batches):
            for position, timestep in enumerate(self.timesteps):
                fixed = replace(
                    self.loss, noise=replace(self.loss.noise, min_timestep=timestep, max_timestep=timestep)
                )
                # the generator depends on the batch and timestep only: the same noise at every evaluation
                value = fixed(batch, step=index, micro_step=position, rank=VALIDATION_STREAM, seed=self.seed)
                total += float(value)
                count += 1
        return total / count


@dataclass
class EarlyStopping:
    """DVAR's rule on the history of validation losses (kept in the training state for resume)."""

    window: int
    threshold: float
    history: list[float] = field(default_factory=list)

    def update(self, value: float) -> float | None:
        """Add a value; returns the variance ratio once the window is full, else None."""
        self.history.append(value)
        if len(self.history) < self.window:
            return None
        overall = float(np.var(self.history))
        recent = float(np.var(self.history[-self.window :]))
        return recent / overall if overall > 0 else 0.0

    def should_stop(self, ratio: float | None) -> bool:
        return ratio is not None and ratio < self.threshold


def make_validation(run: Run, loss: DiffusionLoss, saver: RunSaver, log: Callable) -> ValidationRun | None:
    """The validation loss on held-out images, else on a fixed training batch, when one is wanted."""
    options, dataset = run.settings.validation, run.dataset
    held_out = dataset.validation is not None
    if not options.wanted(held_out=held_out):
        return None
    if options.every_n_steps:
        evaluations = run.length.max_train_steps // options.every_n_steps
    else:
        evaluations = run.length.num_epochs // (options.validate_every_n_epochs or 1)
    if options.early_stopping and options.early_stopping_window > evaluations:
        logger.warning(
            "--early_stopping: the window of %d validation values is longer than this run's %d evaluations, so it "
            "cannot stop early; lower --early_stopping_window",
            options.early_stopping_window,
            evaluations,
        )
    source = dataset.validation if held_out else dataset
    batches = source.fixed_batches(options.max_validation_steps or (None if held_out else 1))
    noise = run.settings.noise
    timesteps = validation_timesteps(noise.min_timestep, noise.max_timestep)
    logger.info(
        "validation: %d %s batch(es), timesteps %s",
        len(batches),
        "held-out" if held_out else "fixed training",
        timesteps,
    )
    seed = run.settings.data.validation_seed
    validator = Validator(batches, loss, run.seed if seed is None else seed, timesteps)

    def save_best(step: int, value: float) -> None:
        extra = {"ti_trainer.step": str(step), "ti_trainer.validation_loss": f"{value:.6g}"}
        saver.embedding(f"{saver.name}-best.{saver.extension}", step=step, extra_metadata=extra)

    return ValidationRun(validator, options, run.progress, save_best, log)


@dataclass
class ValidationRun:
    """Scores the vectors when due, keeps the best ones and says when to stop (state in ``progress``)."""

    validator: Validator
    settings: ValidationSettings
    progress: object  # library.training.state.Progress: validation_history, best_loss, best_step
    save_best: Callable[[int, float], object]  # (step, loss): writes <name>-best.<ext>
    log: Callable[[int, float, str, float | None], None]  # (step, loss, "step"|"epoch", variance ratio)

    def evaluate(self, step: int, kind: str) -> bool:
        """Score now; True when early stopping says training should end."""
        value = self.validator.score()
        history = self.progress.validation_history
        stopper = EarlyStopping(
            self.settings.early_stopping_window, self.settings.early_stopping_threshold, history
        )
        ratio = stopper.update(value)  # appends to the history
        if self.progress.best_loss is None or value < self.progress.best_loss:
            self.progress.best_loss, self.progress.best_step = value, step
            self.save_best(step, value)
        logger.info(
            "step %d: validation loss %.5f (best %.5f at step %d)%s",
            step,
            value,
            self.progress.best_loss,
            self.progress.best_step,
            "" if ratio is None else f", variance ratio {ratio:.3f}",
        )
        self.log(step, value, kind, ratio)
        if self.settings.early_stopping and stopper.should_stop(ratio):
            logger.info(
                "early stopping at step %d: the validation loss has flattened (the variance of its last %d values "
                "is %.3f of its overall variance, below %.3f)",
                step,
                stopper.window,
                ratio,
                stopper.threshold,
            )
            return True
        return False
