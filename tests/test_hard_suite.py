"""The hard quality suite's plumbing (bench/hard_suite.py): its pictures, commands, summaries and
one real trial on the small model, in seconds. The suite's long runs stay in bench/."""

from __future__ import annotations

import re

import numpy as np
from PIL import Image

from bench import hard_suite
from bench.hard_suite import CASES, METHODS, SuitePlan, Trial, command, final_line, markdown, summarise
from tools import shapes
from tools.demo import WORD


def test_the_entangled_pictures_are_purple_hearts_on_black_named_only_by_the_word(tmp_path):
    hard_suite.draw_entangled_pictures(tmp_path)
    pictures = sorted(tmp_path.glob("*.png"))
    assert len(pictures) == 8
    for picture in pictures:
        verdict = shapes.judge(Image.open(picture))
        assert (verdict.shape, verdict.color, verdict.background) == ("heart", "purple", "black")
        assert picture.with_suffix(".txt").read_text() == f"a {WORD}"


def test_a_methods_options_win_over_the_cases_and_every_save_is_kept(tmp_path):
    argv = command(CASES["overfit"], METHODS["kohya example"], 800, 3, tmp_path / "d", tmp_path / "o")
    given = {}
    for option in argv[2:]:
        name, _, value = option.partition("=")
        given[name] = value  # argparse keeps the last
    assert given["--learning_rate"] == "1e-4" and given["--num_vectors_per_token"] == "4"
    assert given["--max_train_steps"] == "800" and given["--seed"] == "3"
    assert given["--save_every_n_steps"] == "10" and given["--train_data_dir"] == str(tmp_path / "d")


def trial(method: str, seed: int, by_step: dict[int, tuple[float, float, float]]) -> Trial:
    judged = {s: dict(zip(("concept", "color", "background"), v)) for s, v in by_step.items()}
    return Trial("entangled captioned", method, seed, 1.0, judged)


def test_the_target_step_is_the_first_from_which_the_seed_mean_stays_at_90():
    trials = [
        trial(
            "recommended", 1, {10: (1, 1, 0.5), 20: (0.7, 1, 0.5), 40: (1.0, 1.0, 0.5), 80: (1.0, 0.9, 0.4)}
        ),
        trial(
            "recommended", 2, {10: (1, 1, 0.5), 20: (1.0, 1, 0.3), 40: (0.9, 0.9, 0.3), 80: (0.9, 0.9, 0.2)}
        ),
    ]
    summary = summarise(trials)  # on target at 10, not at 20 (mean concept 0.85), then held from 40
    assert summary.reached and summary.at_step == 40
    assert np.isclose(summary.means["concept"], 0.95) and np.isclose(summary.spreads["concept"], 0.05)
    assert summary.last_step == 80 and np.isclose(summary.last["background"], 0.3)
    dropped = summarise([trial("default", 1, {20: (1.0, 1.0, 0.4), 40: (1.0, 0.1, 0.4)})])
    assert not dropped.reached and dropped.at_step == 40
    never = summarise([trial("kohya example", 1, {10: (0.2, 1.0, 0.5), 800: (0.85, 1.0, 0.4)})])
    assert not never.reached and never.at_step == 800
    line = final_line([summary, never])
    assert line == (
        "hard: concept 95% color 95% background 40% at 40 steps "
        "(kohya example: concept 85% color 100% background 40% at 800 steps)"
    )
    machine = {"cpu": {"model": "a CPU"}, "torch": "2"}
    table = markdown(
        [summary, never], hard_suite.QUICK, machine, {"concept": 1, "color": 1, "background": 0.4}
    )
    assert "| entangled captioned | recommended | `--direction_only` | 40 | 95% ± 5 |" in table
    assert "| entangled captioned | kohya example |" in table and "not reached" in table
    assert final_line([summary]) is None  # kohya's example was not run


def test_one_real_trial_trains_and_judges_every_save(tmp_path, monkeypatch):
    monkeypatch.setattr(hard_suite, "WORK", tmp_path)
    plan = SuitePlan(("entangled",), ("recommended",), (1,), images=2, steps_cap=20)
    result = hard_suite.run_trial(CASES["entangled"], METHODS["recommended"], 1, plan)
    assert sorted(result.judged) == [10, 20]
    assert all(0 <= v <= 1 for figures in result.judged.values() for v in figures.values())
    assert set(result.judged[20]) == {"concept", "color", "background"}
    assert re.fullmatch(r"entangled-recommended-1", next((tmp_path / "runs").iterdir()).name)
