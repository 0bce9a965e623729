"""kohya's save cadence and rotation rules (``library/training/cadence.py``), checked without running a trainer."""

from __future__ import annotations

from library.training.cadence import SaveCadence


def simulate_step_saves(cadence: SaveCadence, steps: int, *, state: bool) -> list[int]:
    """The steps whose saves remain after ``steps`` steps, applying the cadence as the trainer does."""
    kept: list[int] = []
    for step in range(1, steps + 1):
        if cadence.step_save_due(step):
            kept.append(step)
            old = cadence.older_save(state=state, step=step)
            if old:
                kept = [s for s in kept if s != old["step"]]
    return kept


def test_step_saves_include_the_last_step_and_keep_the_last_n_steps():
    """kohya's example: every 10 steps, last 30 steps: at step 50 the step-10 save goes."""
    cadence = SaveCadence(every_n_steps=10, last_n_steps=30)
    assert simulate_step_saves(cadence, 50, state=False) == [20, 30, 40, 50]
    one = SaveCadence(every_n_steps=1, last_n_steps=1)
    assert simulate_step_saves(one, 2, state=False) == [1, 2]  # the case: both files stay
    assert simulate_step_saves(one, 5, state=False) == [4, 5]


def test_step_states_fall_back_to_the_file_count_and_may_differ_from_it():
    assert simulate_step_saves(SaveCadence(every_n_steps=1, last_n_steps=1), 2, state=True) == [1, 2]
    cadence = SaveCadence(every_n_steps=2, last_n_steps=6, last_n_steps_state=2)
    assert simulate_step_saves(cadence, 10, state=False) == [4, 6, 8, 10]
    assert simulate_step_saves(cadence, 10, state=True) == [8, 10]


def test_epoch_saves_skip_the_last_epoch_and_keep_the_last_n_saves():
    cadence = SaveCadence(every_n_epochs=2, last_n_epochs=2, num_epochs=10)
    due = [e for e in range(1, 11) if cadence.epoch_save_due(e)]
    assert due == [2, 4, 6, 8]  # epoch 10 is the final save, name.ext
    kept: list[int] = []
    for epoch in due:
        kept.append(epoch)
        old = cadence.older_save(state=False, epoch=epoch)
        kept = [e for e in kept if not old or e != old["epoch"]]
    assert kept == [6, 8]


def test_nothing_is_removed_without_save_last_n():
    cadence = SaveCadence(every_n_steps=1, every_n_epochs=1, num_epochs=3)
    assert cadence.older_save(state=False, step=100) is None
    assert cadence.older_save(state=True, epoch=2) is None
    assert not SaveCadence().step_save_due(5) and not SaveCadence().epoch_save_due(1)
