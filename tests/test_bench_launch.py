"""The bench's outside timing of a trainer's steps (bench.launch): counts read from tqdm's bar."""

from bench.launch import seconds_per_step, step_times

# what tqdm writes to a pipe: carriage-return redraws, at most every 0.1 s, skipping counts
PIECES = [
    (1.0, "caching latents: 100%|##| 2/2 [00:01<00:00]\n"),
    (2.0, "steps:   0%|          | 0/10 [00:00<?, ?it/s]"),
    (3.0, "\rsteps:  10%|#         | 1/10 [00:01<00:09, 1.00s/it]"),
    (3.6, "\rsteps:  30%|###       | 3/10 [00:01<00:03]\rsteps:  40%|####      | 4/10 [00:02<00:03]"),
    (5.6, "\rsteps: 100%|##########| 10/10 [00:04<00:00]\rsteps: 100%|##########| 10/10 [00:04<00:00]\n"),
]


def test_step_times_keep_when_each_count_of_the_bar_first_showed():
    done = step_times(PIECES, 10)
    assert done == {0: 2.0, 1: 3.0, 3: 3.6, 4: 3.6, 10: 5.6}  # the caching bar (of 2) is not the run's


def test_seconds_per_step_start_at_the_first_count_past_the_warm_up():
    done = step_times(PIECES, 10)
    assert seconds_per_step(done, 10, warmup=1) == (5.6 - 3.0) / 9
    assert seconds_per_step(done, 10, warmup=2) == (5.6 - 3.6) / 7  # count 2 never showed: from 3


def test_seconds_per_step_is_none_without_the_last_step_or_a_count_past_the_warm_up():
    done = step_times(PIECES[:4], 10)
    assert seconds_per_step(done, 10, warmup=1) is None  # the run never finished
    assert seconds_per_step(step_times(PIECES, 10), 10, warmup=10) is None
