"""The trainer's command line: every kohya option exists with kohya's default, type and choices."""

from __future__ import annotations

import ast
import csv
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from library.errors import UserError
from library.training.args import (
    NO_EFFECT_OPTIONS,
    REFUSED_OPTIONS,
    RunSettings,
    build_parser,
    check_command_line,
    parse_args,
    refuse_unsupported,
)

OPTIONS_TABLE = Path(__file__).resolve().parent / "data" / "kohya-ti-options.tsv"


def _actions():
    return {a.option_strings[0]: a for a in build_parser()._actions if a.option_strings}


@pytest.mark.parametrize("sdxl", [False, True])
@pytest.mark.parametrize(
    "argv, named",
    [
        (["--learning_rate=abc"], "argument --learning_rate: invalid float value: 'abc'"),
        (["--mixed_precision=fp64"], "argument --mixed_precision: invalid choice: 'fp64'"),
        (["--resolution=512", "--no_such_option"], "unrecognized arguments: --no_such_option"),
    ],
)
def test_a_mistake_argparse_finds_is_one_line_without_the_usage(argv, named, sdxl, capsys):
    """argparse's own errors come as our one line, not after the whole usage."""
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv, sdxl=sdxl)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    program = "sdxl_train_textual_inversion.py" if sdxl else "train_textual_inversion.py"
    assert len(lines) == 1 and lines[0].startswith(f"error: {named}"), lines
    assert lines[0].endswith(f"({program} --help lists the options)"), lines


@pytest.mark.parametrize(
    "script, argv, named",
    [
        (
            "train_textual_inversion.py",
            ["--learning_rate=abc"],
            "argument --learning_rate: invalid float value",
        ),
        (
            "sdxl_train_textual_inversion.py",
            ["--token_string=t", "--train_data_dir=pictures", "--output_dir=out"],
            "--pretrained_model_name_or_path is required",
        ),
    ],
)
def test_a_mistaken_option_is_answered_before_the_libraries_of_a_run_are_imported(script, argv, named):
    """The real script: one error line, and diffusers, transformers and accelerate (seconds to
    import) were never imported, whether argparse or our checks find the mistake."""
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run(
        [sys.executable, "-X", "importtime", script, *argv], capture_output=True, text=True, cwd=root
    )
    imports = [line for line in result.stderr.splitlines() if line.startswith("import time:")]
    said = [line for line in result.stderr.splitlines() if not line.startswith("import time:")]
    assert result.returncode == 2 and len(said) == 1 and said[0].startswith(f"error: {named}"), said
    imported = {line.rsplit("|", 1)[-1].strip() for line in imports}
    assert "torch" in imported  # the import log is read right
    assert not imported & {"diffusers", "transformers", "accelerate"}


def test_the_silent_first_check_leaves_logging_as_it_found_it(tmp_path, monkeypatch):
    """The run sets logging up itself afterwards: no handler (nor open log file) of the check is left."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    log_file = tmp_path / "console.log"
    monkeypatch.setattr(
        sys, "argv", ["train_textual_inversion.py", f"--console_log_file={log_file}", "--token_string=t"]
    )
    with pytest.raises(UserError, match="--pretrained_model_name_or_path is required"):
        check_command_line()
    assert root.handlers == handlers and root.level == level
    assert logging.root.manager.disable == logging.NOTSET
    assert log_file.read_text() == ""  # the check said nothing into it


def test_every_kohya_option_exists_with_kohyas_default_and_choices():
    actions = _actions()
    with OPTIONS_TABLE.open() as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    assert len(rows) > 140
    for row in rows:
        action = actions.get(row["option"])
        assert action is not None, row["option"]
        default = ast.literal_eval(row["default"])
        assert action.default == default, (row["option"], action.default, default)
        if row["type"] == "store_true":
            assert action.nargs == 0, row["option"]
        if row["choices"]:
            assert list(action.choices) == ast.literal_eval(row["choices"]), row["option"]


def test_the_sdxl_trainer_has_kohyas_sdxl_options_exactly():
    """kohya's sdxl_train_textual_inversion.py adds one option to the SD trainer's (it caches no
    text encoder outputs for Textual Inversion)."""
    sd = {a.dest for a in build_parser()._actions}
    sdxl = {a.dest for a in build_parser(sdxl=True)._actions}
    assert sdxl - sd == {"disable_mmap_load_safetensors"} and sd <= sdxl
    assert build_parser(sdxl=True).prog == "sdxl_train_textual_inversion.py"


def test_config_file_values_are_used_and_the_command_line_wins(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text("[model]\nlearning_rate = 0.5\n[training]\nmax_train_steps = 7\n")
    args = parse_args([f"--config_file={config}", "--max_train_steps=9"])
    assert args.learning_rate == 0.5 and args.max_train_steps == 9


def test_config_file_without_suffix_and_missing_file(tmp_path):
    (tmp_path / "run.toml").write_text("seed = 3\n")
    assert parse_args([f"--config_file={tmp_path / 'run'}"]).seed == 3
    with pytest.raises(UserError, match="not found"):
        parse_args([f"--config_file={tmp_path / 'nope.toml'}"])


def test_broken_toml_is_one_line(tmp_path):
    (tmp_path / "bad.toml").write_text("seed = = 3\n")
    with pytest.raises(UserError, match="not valid TOML"):
        parse_args([f"--config_file={tmp_path / 'bad.toml'}"])
    (tmp_path / "latin.toml").write_bytes("output_name = 'caf\u00e9'\n".encode("latin-1"))
    with pytest.raises(UserError, match=r"--config_file .*latin.toml: not UTF-8 text"):
        parse_args([f"--config_file={tmp_path / 'latin.toml'}"])


def test_output_config_refuses_to_overwrite(tmp_path):
    (tmp_path / "exists.toml").write_text("")
    with pytest.raises(UserError, match="exists already"):
        parse_args([f"--config_file={tmp_path / 'exists.toml'}", "--output_config"])


@pytest.mark.parametrize(
    "argv",
    [
        ["--deepspeed"],
        ["--zero_stage=3"],
        ["--huggingface_token=x"],
        ["--async_upload"],
        ["--offload_optimizer_device=cpu"],
        ["--fp16_master_weights_and_gradients"],
    ],
)
def test_unsupported_options_are_refused(argv):
    with pytest.raises(UserError) as info:
        refuse_unsupported(parse_args(argv))
    assert argv[0].split("=")[0] in str(info.value)


@pytest.mark.parametrize(
    "flag, why",
    [("--deepspeed", "DeepSpeed"), ("--huggingface_repo_id=a/b", "offline"), ("--fp8_base", "fp8")],
)
def test_a_refusal_says_why(flag, why):
    with pytest.raises(UserError) as info:
        refuse_unsupported(parse_args([flag]))
    assert why in str(info.value)


def test_the_lowram_hint_is_accepted_and_logged(caplog):
    """--lowram has nothing to act on (the low-memory load is the default); --highvram does act
    (test_train_memory), so it is not called a no-op."""
    import logging

    with caplog.at_level(logging.INFO):
        refuse_unsupported(parse_args(["--lowram", "--highvram"]))
    assert "--lowram has no effect" in caplog.text and "--highvram" not in caplog.text


def _given(action) -> list[str]:
    """A command line giving ``action`` a value other than its default."""
    flag = action.option_strings[0]
    if action.nargs == 0:
        return [flag]
    if action.choices:
        return [f"{flag}={next(c for c in action.choices if c != action.default)}"]
    return [f"{flag}={7 if action.type in (int, float) else 'x'}"]


@pytest.mark.parametrize("name", sorted(REFUSED_OPTIONS))
def test_every_refused_option_is_one_line_naming_it(name):
    action = next(a for a in build_parser()._actions if a.dest == name)
    with pytest.raises(UserError, match=f"--{name}"):
        refuse_unsupported(parse_args(_given(action)))


@pytest.mark.parametrize("name", sorted(NO_EFFECT_OPTIONS))
def test_every_option_without_effect_says_so(name, caplog):
    import logging

    action = next(a for a in build_parser()._actions if a.dest == name)
    with caplog.at_level(logging.INFO):
        refuse_unsupported(parse_args(_given(action)))
    assert f"--{name} has no effect here: {NO_EFFECT_OPTIONS[name]}" in caplog.text


def test_no_option_is_accepted_and_dropped():
    """Every option of both trainers reaches a settings object, is refused, or is logged as having
    no effect; the rest are read while the command line is parsed. An option added to the parser
    and to none of these would be accepted and silently ignored."""
    import typing
    from dataclasses import fields, is_dataclass

    parts = typing.get_type_hints(RunSettings).values()
    read = {f.name for part in parts if is_dataclass(part) for f in fields(part) if f.init}
    read_while_parsing = {"help", "config_file", "output_config"}
    read_under_another_name = {"pretrained_model_name_or_path"}  # ModelSettings.path
    logged_by_the_sdxl_trainer = {"disable_mmap_load_safetensors"}  # it always reads without a map
    options = {a.dest for a in build_parser(sdxl=True)._actions}
    dropped = options - read - set(REFUSED_OPTIONS) - set(NO_EFFECT_OPTIONS)
    assert dropped == read_while_parsing | read_under_another_name | logged_by_the_sdxl_trainer


def _number_options(parser) -> list[str]:
    from library.training.optimizers import int_or_float

    return sorted(a.dest for a in parser._actions if a.type in (float, int_or_float))


@pytest.mark.parametrize("name", _number_options(build_parser(sdxl=True)))
def test_a_number_option_given_nan_or_inf_is_one_line_naming_it(name, tmp_path):
    """float() reads "nan" and "inf"; none of these options means either (a NaN noise offset used to
    end in a NaN loss blamed on the learning rate)."""
    from cli_helpers import common, run_train

    for value in ("nan", "inf"):
        result = run_train(
            *common(tmp_path, tmp_path / "o", tmp_path / "never-read.safetensors"),
            "--token_string=mychar4",
            f"--{name}={value}",
            check=False,
        )
        last = result.stderr.strip().splitlines()[-1]  # ours, or argparse's for a type it refuses itself
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
        assert "error: " in last and f"--{name}" in last, last


@pytest.mark.parametrize(
    "option, message",
    [
        ("--seed=-1", "--seed -1: must be between 0 and 4294967295"),
        (f"--seed={2**32}", "must be between 0 and"),
        ("--keep_tokens=-1", "--keep_tokens -1: must be 0 or more"),
        ("--max_train_steps=10000000000000000000000", "--max_train_steps 10000000000000000000000: too large"),
    ],
)
def test_counts_and_seeds_beyond_what_the_run_can_use_are_one_line(option, message, tmp_path):
    """A negative seed and a count beyond 64 bits ended in tracebacks from deep inside torch; a dataset
    TOML already refused keep_tokens = -1, the command line took it."""
    from cli_helpers import common, error_line, run_train

    result = run_train(
        *common(tmp_path, tmp_path / "o", tmp_path / "never-read.safetensors"),
        "--token_string=mychar4",
        option,
        check=False,
    )
    assert message in error_line(result)
