"""The pivotal-tuning evaluation's plumbing (bench/pivotal.py): the new glyph and its judge, the
pictures, the commands and the summary. Its training runs stay in bench/."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from PIL import Image

from bench import pivotal
from tools import shapes
from tools.concept_eval import SHAPES_MODEL
from tools.demo import WORD, run_offline


def test_the_new_glyph_is_judged_only_when_asked_and_never_confused_with_the_world():
    rng = np.random.default_rng(7)
    glyphs = [shapes.random_scene(rng, shape=shapes.NEW_GLYPH) for _ in range(60)]
    assert shapes.NEW_GLYPH not in shapes.ALL_SHAPES  # the model never saw it in training
    assert all(shapes.judge(shapes.render(s), (shapes.NEW_GLYPH,)).shape == shapes.NEW_GLYPH for s in glyphs)
    assert all(shapes.judge(shapes.render(s)).shape != shapes.NEW_GLYPH for s in glyphs)
    world = [shapes.random_scene(rng) for _ in range(150)]
    with_glyph = [shapes.judge(shapes.render(s), (shapes.NEW_GLYPH,)).shape for s in world]
    assert np.mean([v == s.shape for v, s in zip(with_glyph, world)]) >= 0.98


def test_the_pictures_are_the_concept_in_every_colour_captioned_with_the_word(tmp_path):
    pivotal.draw_pictures(tmp_path, shapes.NEW_GLYPH, count=12)
    pictures = sorted(tmp_path.glob("*.png"))
    verdicts = [shapes.judge(Image.open(p), (shapes.NEW_GLYPH,)) for p in pictures]
    assert len(pictures) == 12 and {v.shape for v in verdicts} == {shapes.NEW_GLYPH}
    assert {v.color for v in verdicts} == set(shapes.COLORS)
    assert all(p.with_suffix(".txt").read_text() == f"a {v.color} {WORD}" for p, v in zip(pictures, verdicts))


def test_the_glyph_is_taught_only_at_the_sizes_the_models_vae_keeps(tmp_path):
    """Below 14 px the small model's VAE blurs the arrow's head into its shaft; a training picture
    that small would teach the word a blob the judge counts as a miss."""
    from library.models.loading import load_sd_model

    model = load_sd_model(SHAPES_MODEL)
    rates = pivotal.vae_keep_rates(model, shapes.NEW_GLYPH, (12, 14), per_radius=24)
    assert rates[12] < 0.9 <= rates[14]
    pivotal.draw_pictures(tmp_path, shapes.NEW_GLYPH, count=16)
    for picture in sorted(tmp_path.glob("*.png")):
        decoded = pivotal.through_the_vae(model, Image.open(picture))
        assert shapes.judge(decoded, (shapes.NEW_GLYPH,)).shape == shapes.NEW_GLYPH, picture.name


def test_the_pivotal_methods_train_a_lora_beside_the_demos_command(tmp_path):
    by_name = {m.name: m for m in pivotal.METHODS}
    given = {}
    argv = pivotal.command(by_name["pivotal"], 2, tmp_path / "d", tmp_path / "o", 300)
    for option in argv[2:]:
        name, _, value = option.partition("=")
        given[name] = value
    assert given["--network_module"] == "networks.lora" and given["--max_train_steps"] == "300"
    assert "conv_dim=16" in argv and given["--seed"] == "2" and given["--learning_rate"] == "5e-3"
    plain = pivotal.command(by_name["TI alone"], 2, tmp_path / "d", tmp_path / "o", 300)
    assert not any(o.startswith("--network") for o in plain)
    tuned = pivotal.command(by_name["pivotal"], 2, tmp_path / "d", tmp_path / "o", 300, ("--unet_lr=5e-4",))
    assert [o for o in tuned if o.startswith("--unet_lr")] == ["--unet_lr=5e-4"]  # replaces the method's
    weighted = pivotal.command(by_name["pivotal, min-SNR 5"], 2, tmp_path / "d", tmp_path / "o", 300)
    assert set(weighted) - set(argv) == {"--min_snr_gamma=5"}
    slow = by_name["pivotal, min-SNR 5, LoRA at 5e-4 to 500 steps"]
    slower = pivotal.command(slow, 2, tmp_path / "d", tmp_path / "o", slow.length(300))
    assert [o for o in slower if o.startswith(("--unet_lr", "--max_train_steps"))] == [
        "--unet_lr=5e-4",
        "--max_train_steps=500",  # the method's own length, whatever the bench's
    ]
    assert by_name["pivotal"].length(300) == 300


def test_the_summary_finds_the_step_from_which_the_target_holds_to_the_end():
    def trial(seed, by_step):
        judged = {s: {"concept": c, "color": k, "background": 0.4} for s, (c, k) in by_step.items()}
        return {"concept": "new glyph", "method": "pivotal", "seed": seed, "seconds": 1.0, "judged": judged}

    held = [
        trial(1, {20: (0.5, 0.5), 40: (1.0, 1.0), 80: (0.92, 0.75)}),
        trial(2, {20: (0.5, 0.5), 40: (0.8, 1.0), 80: (0.92, 0.85)}),
    ]
    (row,) = pivotal.summarise(held)
    assert row["reached"] == 40  # mean concept 0.9 and colour 1.0 at 40, 0.92 and 0.8 at 80
    assert row["by_step"][40]["concept"] == (0.9, 0.8, 1.0)
    lost = [trial(1, {20: (1.0, 1.0), 40: (1.0, 1.0), 80: (0.5, 1.0)})]
    (row,) = pivotal.summarise(lost)
    assert row["reached"] is None  # right at 20 and 40, not at the end: not reached
    assert (
        "| new glyph | pivotal | 50 % (50-50) | 100 % (100-100) | 40 % (40-40) | not reached |"
        in pivotal.markdown([row], "a test machine", 12)
    )


def test_a_failing_bench_run_names_itself_with_the_trainers_last_words():
    assert run_offline([sys.executable, "-c", "pass"], "fine") >= 0
    with pytest.raises(RuntimeError, match="glyph-1: the trainer failed:\nno such option"):
        run_offline([sys.executable, "-c", "import sys; sys.exit('no such option')"], "glyph-1")


def test_every_run_has_its_last_save_judged_even_between_the_judged_steps():
    assert pivotal.judged_steps(300) == [20, 40, 80, 160, 300]
    assert pivotal.judged_steps(400) == [20, 40, 80, 160, 300, 400]
    assert pivotal.judged_steps(30) == [20, 30]


def test_only_the_full_default_run_replaces_the_quality_section():
    parser = pivotal.build_parser()
    assert pivotal.is_reference_run(parser, parser.parse_args([]))
    for partial in (
        ["--concepts", "heart"],
        ["--methods", "pivotal"],
        ["--images", "24"],
        ["--extra=--seed=1"],
    ):
        assert not pivotal.is_reference_run(parser, parser.parse_args(partial)), partial
