"""The SDXL bench's pairing of our runs with kohya's (bench/sdxl.py)."""

from bench.sdxl import kohya_counterpart, run_name


def test_runs_are_named_by_program_options_and_precision():
    assert run_name("ours", [], "no") == "ours no"
    assert run_name("kohya", ["--gradient_checkpointing"], "bf16") == "kohya --gradient_checkpointing bf16"


def test_a_run_with_an_option_kohya_lacks_is_compared_with_kohyas_run_without_it():
    assert kohya_counterpart(["--highvram"], "no") == run_name("kohya", [], "no")


def test_a_run_with_a_shared_option_is_compared_with_kohyas_run_with_it():
    assert kohya_counterpart(["--gradient_checkpointing"], "no") == "kohya --gradient_checkpointing no"
    assert kohya_counterpart([], "bf16") == "kohya bf16"
