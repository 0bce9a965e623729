"""Options the command line alone shows to be wrong: one line naming the option, before anything loads.

Each case once ended in a traceback, a silent no-op run, or a refusal only after the model had
loaded (docs/bad-input.md). The whole trainer goes through the same ``check_settings`` (one CLI
case in test_bad_input.py proves the wiring)."""

from __future__ import annotations

import logging

import pytest

from library.errors import UserError
from library.training.args import check_settings, parse_args, run_settings


def check(tmp_path, *extra: str) -> None:
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    argv = [
        "--pretrained_model_name_or_path=model.safetensors",
        f"--train_data_dir={data}",
        f"--output_dir={tmp_path / 'out'}",
        "--token_string=mychar4",
        *extra,
    ]
    check_settings(run_settings(parse_args(argv)))


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("--train_batch_size=0", "--train_batch_size 0: must be at least 1"),
        ("--max_train_epochs=0", "--max_train_epochs 0: must be at least 1"),
        ("--vae_batch_size=0", "--vae_batch_size 0: must be at least 1"),
        ("--save_every_n_steps=0", "--save_every_n_steps 0: must be at least 1"),
        ("--learning_rate=nan", "--learning_rate nan: must be a finite number"),
        ("--learning_rate=-1e-3", "--learning_rate -0.001: must be a finite number of 0 or more"),
        ("--max_grad_norm=inf", "--max_grad_norm inf: must be a finite number"),
        ("--init_word=mychar4", "--init_word 'mychar4' contains the new word"),
        ("--init_word=cute MyChar4", "contains the new word"),
        ("--output_name=../escaped", "--output_name '../escaped': must be a plain file name"),
        ("--output_name=sub/name", "--output_name 'sub/name': must be a plain file name"),
        ("--optimizer_type=FooBar", "--optimizer_type FooBar: torch.optim has no class FooBar"),
        ("--sample_every_n_steps=5", "need --sample_prompts"),
    ],
)
def test_a_wrong_option_is_one_line_naming_it(tmp_path, option, message):
    with pytest.raises(UserError) as info:
        check(tmp_path, option)
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--cross_init"], "--cross_init starts from --init_word's output: give --init_word too"),
        (["--cross_init", "--init_word=toy", "--weights=x.pt"], "--cross_init and --weights both choose"),
        (["--direction_only", "--preserve_embedding_norm"], "--direction_only and --preserve_embedding_norm"),
        (["--direction_norm=init"], "--direction_norm is --direction_only's norm: give --direction_only too"),
        (["--init_pull=-1"], "--init_pull -1.0: must be 0 (off) or a positive weight"),
        (["--init_pull=nan"], "--init_pull nan: must be 0 (off) or a positive weight"),
    ],
)
def test_start_and_norm_controls_that_cannot_work_are_refused(tmp_path, options, message):
    with pytest.raises(UserError) as info:
        check(tmp_path, *options)
    assert message in str(info.value)


def test_a_token_string_with_a_space_names_the_option(tmp_path):
    with pytest.raises(UserError, match=r"--token_string 'my char': the new word must be a single word"):
        check(tmp_path, "--token_string=my char")


def test_a_missing_resume_folder_is_named_as_missing(tmp_path):
    with pytest.raises(UserError, match=r"--resume .*nope: no such folder"):
        check(tmp_path, f"--resume={tmp_path / 'nope'}")


def test_a_missing_sample_prompt_file_is_found_before_the_model(tmp_path):
    with pytest.raises(UserError, match=r"--sample_prompts .*prompts.txt: not found"):
        check(tmp_path, f"--sample_prompts={tmp_path / 'prompts.txt'}", "--sample_every_n_steps=5")


def test_a_sample_prompt_file_that_is_not_utf8_is_named_before_the_model(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes("a caf\u00e9 --w 64\n".encode("latin-1"))
    with pytest.raises(UserError, match=r"--sample_prompts .*prompts.txt: not UTF-8 text .*save it as UTF-8"):
        check(tmp_path, f"--sample_prompts={prompts}", "--sample_every_n_steps=5")


def test_good_options_pass(tmp_path):
    check(tmp_path, "--init_word=cute toy", "--output_name=mychar4_v2", "--max_train_epochs=3")


def test_a_file_named_otherwise_than_the_word_says_which_word_prompts_need(tmp_path, caplog):
    """The clients take the word from the file name; kohya's own example names them differently."""
    with caplog.at_level(logging.WARNING):
        check(tmp_path, "--output_name=mychar4_v2")
    assert "--output_name mychar4_v2: " in caplog.text and "need 'mychar4_v2', not 'mychar4'" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        check(tmp_path, "--output_name=MyChar4")  # the tokenizer ignores case
        check(tmp_path)  # named after the token string
    assert "--output_name" not in caplog.text


def test_sample_prompts_without_the_word_are_named_before_the_model(tmp_path, caplog):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a dog --w 64\na mychar4s --n mychar4\n")  # a longer word, a negative: not the word
    with caplog.at_level(logging.WARNING):
        check(tmp_path, f"--sample_prompts={prompts}", "--sample_every_n_steps=5")
    assert "prompts.txt: no prompt contains the token string 'mychar4'" in caplog.text
    caplog.clear()
    prompts.write_text("a dog --w 64\na (MyChar4:1.2) --n blurry\n")
    with caplog.at_level(logging.WARNING):
        check(tmp_path, f"--sample_prompts={prompts}", "--sample_every_n_steps=5")
    assert "no prompt contains" not in caplog.text


def _state_saved_with(folder, **recorded) -> str:
    import json

    folder.mkdir()
    progress = {"format": 1, "seed": 1, "global_step": 2, "epoch": 0, "batches_done_in_epoch": 2, **recorded}
    (folder / "progress.json").write_text(json.dumps(progress))
    return str(folder)


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("--optimizer_type=SGDNesterov", "saved with --optimizer_type adamw, this run asks for sgdnesterov"),
        ("--lr_scheduler=cosine", "saved with --lr_scheduler constant, this run asks for cosine"),
    ],
)
def test_resume_refuses_an_optimizer_or_schedule_the_state_cannot_serve(tmp_path, option, message):
    from library.training.state import check_resume

    state = _state_saved_with(
        tmp_path / "s", optimizer_type="adamw", lr_scheduler="constant", learning_rate=1e-3
    )
    with pytest.raises(UserError, match=message):
        check_resume(state, run_settings(parse_args([option, "--learning_rate=1e-3"])).optimizer)
    check_resume(state, run_settings(parse_args(["--learning_rate=1e-3"])).optimizer)  # the same: fine


def test_resume_says_that_the_states_learning_rate_continues(tmp_path, caplog):
    import logging

    from library.training.state import check_resume

    state = _state_saved_with(
        tmp_path / "s", optimizer_type="adamw", lr_scheduler="constant", learning_rate=1e-3
    )
    with caplog.at_level(logging.WARNING):
        check_resume(state, run_settings(parse_args(["--learning_rate=5e-3"])).optimizer)
    assert "the state's learning rate 0.001 continues; --learning_rate 0.005 is not used" in caplog.text


def test_a_sample_prompt_with_too_few_pndm_steps_is_refused_before_the_model(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a mychar4 --ss pndm --s 2\n")
    with pytest.raises(UserError, match=r"'a mychar4' with 2: the pndm sampler needs at least 4 steps"):
        check(tmp_path, f"--sample_prompts={prompts}", "--sample_every_n_steps=5")
