"""How long a run is, when it saves, and which older saves it removes: kohya's rules, in one place.

kohya's ``train_textual_inversion.py`` (with ``library/train_util.py``):

* a **step save** happens whenever ``step % save_every_n_steps == 0``, the last step included
  (so a run can end with both ``name-step00000100.ext`` and ``name.ext``);
* an **epoch save** happens at the end of every ``save_every_n_epochs``-th epoch except the last
  one, which the final ``name.ext`` stands for;
* ``--save_last_n_steps N`` counts *steps*, not files: after the save at step ``s``, the save at
  ``s - N - 1`` rounded down to a multiple of ``save_every_n_steps`` is removed, so the saves of
  the last ``N`` steps remain (``N + 1`` files with one save per step);
* ``--save_last_n_epochs N`` counts *saves*: after the save of epoch ``e``, the one of epoch
  ``e - save_every_n_epochs * N`` is removed;
* state folders follow the same rules with ``--save_last_n_*_state``, falling back to
  ``--save_last_n_*`` when not given.

Each rule names exactly one older save to remove, as kohya does, so a folder's other files are
never touched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from library.errors import UserError


@dataclass(frozen=True)
class SaveCadence:
    every_n_steps: int | None = None
    every_n_epochs: int | None = None
    last_n_steps: int | None = None
    last_n_epochs: int | None = None
    last_n_steps_state: int | None = None
    last_n_epochs_state: int | None = None
    num_epochs: int = 1

    def step_save_due(self, step: int) -> bool:
        return bool(self.every_n_steps) and step % self.every_n_steps == 0

    def epoch_save_due(self, epoch: int) -> bool:
        """``epoch`` counts from 1 (the number of epochs finished)."""
        return bool(self.every_n_epochs) and epoch % self.every_n_epochs == 0 and epoch < self.num_epochs

    def step_to_remove(self, step: int, *, state: bool) -> int | None:
        """The step whose save (file, or state folder with ``state``) goes after the save at ``step``."""
        keep = (self.last_n_steps_state or self.last_n_steps) if state else self.last_n_steps
        if not keep or not self.every_n_steps:
            return None
        old = step - keep - 1
        old -= old % self.every_n_steps
        return old if old > 0 else None

    def epoch_to_remove(self, epoch: int, *, state: bool) -> int | None:
        """The epoch whose save (file, or state folder with ``state``) goes after the save of ``epoch``."""
        keep = (self.last_n_epochs_state or self.last_n_epochs) if state else self.last_n_epochs
        if not keep or not self.every_n_epochs:
            return None
        old = epoch - self.every_n_epochs * keep
        return old if old > 0 else None

    def older_save(self, *, state: bool, step: int | None = None, epoch: int | None = None) -> dict | None:
        """After a save at ``step`` (or of ``epoch``), the one to remove, as ``{"step": n}`` or
        ``{"epoch": n}`` (the keywords of ``library.training.state``'s naming functions), or ``None``."""
        if step is not None:
            old = self.step_to_remove(step, state=state)
            return None if old is None else {"step": old}
        old = self.epoch_to_remove(epoch, state=state)
        return None if old is None else {"epoch": old}


@dataclass(frozen=True)
class RunLength:
    """How long a run is, in batches, optimizer steps and epochs.

    With gradient accumulation over ``k`` batches, an epoch's last group may hold fewer than
    ``k`` batches; it makes its own optimizer step (accelerate and kohya do the same), so an epoch
    has ``ceil(batches / k)`` steps. Each of ``n`` processes sees ``ceil(dataset batches / n)``
    batches of an epoch, and an optimizer step averages their gradients.
    """

    batches_per_epoch: int  # per process
    steps_per_epoch: int
    max_train_steps: int
    num_epochs: int

    @classmethod
    def for_loop(cls, loop, dataset_batches: int, num_processes: int) -> RunLength:
        """The run length ``LoopSettings`` ask for over a dataset of ``dataset_batches`` batches."""
        return cls.plan(
            dataset_batches,
            num_processes,
            loop.gradient_accumulation_steps,
            loop.max_train_steps,
            loop.max_train_epochs,
        )

    @classmethod
    def plan(
        cls,
        dataset_batches: int,
        num_processes: int,
        accumulation: int,
        max_train_steps: int,
        max_train_epochs: int | None,
    ) -> RunLength:
        batches = math.ceil(dataset_batches / num_processes)
        steps = math.ceil(batches / accumulation)
        if steps == 0:
            raise UserError("no training batches: add images, raise the repeats or lower --train_batch_size")
        if max_train_epochs is not None:
            max_train_steps = max_train_epochs * steps
        return cls(batches, steps, max_train_steps, math.ceil(max_train_steps / steps))
