"""Tests for library/training/optimizers.py: kohya's optimizer choice and learning-rate schedules."""

from __future__ import annotations

import argparse
import logging
import math
import sys

import pytest
import torch

from library.errors import UserError
from library.options import settings_from
from library.training.optimizers import (
    OptimizerSettings,
    add_optimizer_arguments,
    create_lr_scheduler,
    create_optimizer,
    int_or_float,
    is_schedule_free,
    optimizer_eval_mode,
    optimizer_train_mode,
    resolve_step_count,
)

LR = 1e-2


def parse(*argv: str) -> OptimizerSettings:
    """Settings from a command line, as the trainer builds them."""
    return settings_from(OptimizerSettings, parse_options(*argv))


def parse_options(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_optimizer_arguments(parser)
    return parser.parse_args(list(argv))


def tiny_param(rows: int = 3, dim: int = 8) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.randn(rows, dim, generator=torch.Generator().manual_seed(0)))


def train_steps(optimizer, param: torch.nn.Parameter, steps: int = 5) -> list[float]:
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = (param**2).sum()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def lr_curve(optimizer, scheduler, steps: int) -> list[float]:
    """The learning rate used by optimizer step 0, 1, ..., steps - 1."""
    curve = []
    for _ in range(steps):
        curve.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return curve


def sgd(lr: float = LR):
    return torch.optim.SGD([tiny_param()], lr=lr)


# --- options -----------------------------------------------------------------------------------


def test_optimizer_arguments_have_kohyas_names_types_and_defaults():
    assert vars(parse_options()) == {
        "optimizer_type": "",
        "use_8bit_adam": False,
        "use_lion_optimizer": False,
        "learning_rate": 2e-6,
        "max_grad_norm": 1.0,
        "optimizer_args": None,
        "lr_scheduler_type": "",
        "lr_scheduler_args": None,
        "lr_scheduler": "constant",
        "lr_warmup_steps": 0,
        "lr_decay_steps": 0,
        "lr_scheduler_num_cycles": 1,
        "lr_scheduler_power": 1,
        "fused_backward_pass": False,
        "lr_scheduler_timescale": None,
        "lr_scheduler_min_lr_ratio": None,
    }
    args = parse("--optimizer_args", "weight_decay=0.1", "betas=0.9,0.99", "--lr_warmup_steps", "10%")
    assert args.optimizer_args == ["weight_decay=0.1", "betas=0.9,0.99"] and args.lr_warmup_steps == 0.1


def test_int_or_float_accepts_steps_ratios_and_percentages():
    assert int_or_float("10") == 10 and isinstance(int_or_float("10"), int)
    assert int_or_float("0.1") == 0.1 and int_or_float("10%") == 0.1 and int_or_float("0") == 0
    for bad in ("1.5", "abc", "-0.1", "x%"):
        with pytest.raises(argparse.ArgumentTypeError):
            int_or_float(bad)


@pytest.mark.parametrize("value", ["10%", "0.1", "10"])
def test_warmup_forms_give_the_same_absolute_steps(value):
    assert (
        resolve_step_count(parse("--lr_warmup_steps", value).lr_warmup_steps, 100, "--lr_warmup_steps") == 10
    )
    assert resolve_step_count(value, 100, "--lr_warmup_steps") == 10  # e.g. a string from a config file


def test_ratios_are_truncated_like_kohya():
    assert resolve_step_count(0.29, 100, "--lr_warmup_steps") == int(0.29 * 100)
    with pytest.raises(UserError, match="--lr_decay_steps"):
        resolve_step_count("abc", 100, "--lr_decay_steps")


# --- optimizers --------------------------------------------------------------------------------


@pytest.mark.parametrize("optimizer_type", ["", "AdamW", "adamw"])
def test_adamw_is_the_default_and_names_are_case_insensitive(optimizer_type):
    param = tiny_param()
    name, extra, optimizer = create_optimizer(
        [param], parse("--optimizer_type", optimizer_type, "--learning_rate", "0.01")
    )
    assert type(optimizer) is torch.optim.AdamW and name == "torch.optim.adamw.AdamW" and extra == ""
    assert optimizer.param_groups[0]["lr"] == 0.01


def test_optimizer_args_are_python_literals():
    args = parse("--optimizer_args", "weight_decay=0.05", "betas=0.8,0.9", "amsgrad=True")
    _, extra, optimizer = create_optimizer([tiny_param()], args)
    group = optimizer.param_groups[0]
    assert (group["weight_decay"], group["betas"], group["amsgrad"]) == (0.05, (0.8, 0.9), True)
    assert extra == "weight_decay=0.05,betas=(0.8, 0.9),amsgrad=True"


@pytest.mark.parametrize(
    "optimizer_args, message",
    [
        (["weight_decay"], "--optimizer_args: 'weight_decay' is not key=value"),
        (["weight_decay=abc"], "--optimizer_args: the value of 'weight_decay=abc' is not a Python literal"),
        (["no_such_option=1"], "--optimizer_args do not fit AdamW"),
    ],
)
def test_bad_optimizer_args_are_user_errors(optimizer_args, message):
    with pytest.raises(UserError, match=message):
        create_optimizer([tiny_param()], parse("--optimizer_args", *optimizer_args))


def test_adamw_state_is_two_fp32_values_per_trained_element():
    rows, dim = 3, 768
    param = tiny_param(rows, dim)
    _, _, optimizer = create_optimizer([param], parse())
    train_steps(optimizer, param, steps=1)
    state = [v for v in optimizer.state[param].values() if torch.is_tensor(v) and v.dim() > 0]
    assert all(v.dtype == torch.float32 for v in state)
    assert sum(v.numel() for v in state) == 2 * rows * dim


BUILDS_AND_STEPS = [
    ("AdamW", []),
    ("SGDNesterov", []),
    ("AdaFactor", []),
    ("AdaFactor", ["relative_step=False", "scale_parameter=False"]),
    ("torch.optim.Adam", ["weight_decay=0.01"]),
    ("RAdam", []),  # a bare name that kohya looks up in torch.optim
    ("AdamW8bit", []),
    ("PagedAdamW", []),
    ("PagedAdamW8bit", []),
    ("PagedAdamW32bit", []),
    ("Lion8bit", []),
    ("PagedLion8bit", []),
    ("SGDNesterov8bit", []),
]


@pytest.mark.filterwarnings("ignore:Paged optimizers are not supported on CPU")
@pytest.mark.parametrize("optimizer_type, optimizer_args", BUILDS_AND_STEPS)
def test_each_available_optimizer_builds_and_trains_a_tiny_parameter(optimizer_type, optimizer_args):
    if optimizer_type.lower().endswith("8bit") or optimizer_type.lower().startswith("paged"):
        pytest.importorskip("bitsandbytes")
    param = tiny_param()
    argv = ["--optimizer_type", optimizer_type, "--learning_rate", str(LR)]
    if optimizer_args:
        argv += ["--optimizer_args", *optimizer_args]
    _, _, optimizer = create_optimizer([param], parse(*argv))
    before = param.detach().clone()
    losses = train_steps(optimizer, param)
    assert not torch.equal(param.detach(), before)
    assert losses[-1] < losses[0]


def test_use_8bit_adam_is_adamw8bit_and_trains():
    pytest.importorskip("bitsandbytes")
    param = tiny_param(4, 4096)  # big enough for bitsandbytes to keep 8-bit state
    name, _, optimizer = create_optimizer([param], parse("--use_8bit_adam", "--learning_rate", str(LR)))
    assert name.endswith("AdamW8bit")
    losses = train_steps(optimizer, param)
    assert losses[-1] < losses[0]
    assert optimizer.state[param]["state1"].dtype == torch.uint8


def test_sgd_nesterov_gets_kohyas_momentum_default():
    _, extra, optimizer = create_optimizer([tiny_param()], parse("--optimizer_type", "SGDNesterov"))
    assert optimizer.param_groups[0]["momentum"] == 0.9 and optimizer.param_groups[0]["nesterov"] is True
    assert extra == "momentum=0.9,nesterov=True"


def test_relative_step_adafactor_gets_the_adafactor_schedule():
    args = parse("--optimizer_type", "AdaFactor", "--learning_rate", "0.001")
    _, extra, optimizer = create_optimizer([tiny_param()], args)
    assert optimizer.param_groups[0]["lr"] is None and extra == "relative_step=True"
    scheduler = create_lr_scheduler(optimizer, args, 100)
    assert type(scheduler).__name__ == "AdafactorSchedule"
    with pytest.raises(UserError, match="warmup"):
        create_lr_scheduler(optimizer, parse("--optimizer_type", "AdaFactor", "--lr_warmup_steps", "5"), 100)


MISSING_PACKAGES = [
    (
        ["--optimizer_type", "Lion"],
        "lion_pytorch",
        "--optimizer_type Lion needs the lion-pytorch package: pip install lion-pytorch",
    ),
    (
        ["--use_lion_optimizer"],
        "lion_pytorch",
        "--use_lion_optimizer needs the lion-pytorch package: pip install lion-pytorch",
    ),
    (
        ["--optimizer_type", "Prodigy"],
        "prodigyopt",
        "--optimizer_type Prodigy needs the prodigyopt package: pip install prodigyopt",
    ),
    (
        ["--optimizer_type", "DAdaptAdam"],
        "dadaptation",
        "--optimizer_type DAdaptAdam needs the dadaptation package: pip install dadaptation",
    ),
    (
        ["--optimizer_type", "DAdaptation"],
        "dadaptation",
        "--optimizer_type DAdaptation needs the dadaptation package: pip install dadaptation",
    ),
    (
        ["--optimizer_type", "AdamWScheduleFree"],
        "schedulefree",
        "--optimizer_type AdamWScheduleFree needs the schedulefree package: pip install schedulefree",
    ),
]


@pytest.mark.parametrize(
    "optimizer_type", ["Lion", "Prodigy", "DAdaptAdam", "DAdaptation", "AdamWScheduleFree", "SGDScheduleFree"]
)
def test_optional_optimizers_from_requirements_train_a_parameter(optimizer_type):
    param = tiny_param()
    before = param.detach().clone()
    _, _, optimizer = create_optimizer(
        [param], parse("--optimizer_type", optimizer_type, "--learning_rate", "1.0")
    )
    optimizer_train_mode(optimizer)
    param.sum().backward()
    optimizer.step()
    assert not torch.equal(param.detach(), before)


@pytest.mark.parametrize("argv, module, message", MISSING_PACKAGES)
def test_missing_optional_package_names_the_pip_package(argv, module, message, monkeypatch):
    for name in [module] + [m for m in sys.modules if m.startswith(module + ".")]:
        monkeypatch.setitem(sys.modules, name, None)  # makes the import fail as if not installed
    with pytest.raises(UserError) as error:
        create_optimizer([tiny_param()], parse(*argv, "--learning_rate", "1.0"))
    assert str(error.value) == message


def test_adaptive_optimizers_warn_about_a_low_learning_rate(caplog):
    with caplog.at_level(logging.WARNING):
        try:  # the warning comes before the import, so it shows whether prodigyopt is installed or not
            create_optimizer([tiny_param()], parse("--optimizer_type", "Prodigy", "--learning_rate", "1e-4"))
        except UserError:
            pass
    assert "too low for D-Adaptation/Prodigy" in caplog.text


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["--use_8bit_adam", "--optimizer_type", "AdamW"],
            "--use_8bit_adam and --optimizer_type AdamW cannot be used together",
        ),
        (["--use_8bit_adam", "--use_lion_optimizer"], "--use_8bit_adam and --use_lion_optimizer"),
        (
            ["--optimizer_type", "NoSuchOptimizer"],
            "--optimizer_type NoSuchOptimizer: torch.optim has no class",
        ),
        (["--optimizer_type", "no_such_module.Opt"], "--optimizer_type no_such_module.Opt: cannot import"),
        (["--fused_backward_pass"], "--fused_backward_pass is not available for textual inversion"),
    ],
)
def test_optimizer_choice_errors_are_user_errors(argv, message):
    with pytest.raises(UserError, match=message):
        create_optimizer([tiny_param()], parse(*argv))


class FakeScheduleFree(torch.optim.SGD):
    """Stands in for schedulefree's optimizers: train/eval modes and a name ending in ScheduleFree."""

    mode = "eval"

    def train(self):
        self.mode = "train"

    def eval(self):
        self.mode = "eval"


def test_schedule_free_modes_and_constant_schedule(caplog):
    optimizer = FakeScheduleFree([tiny_param()], lr=LR)
    assert is_schedule_free(optimizer) and not is_schedule_free(sgd())
    optimizer_train_mode(optimizer)
    assert optimizer.mode == "train"
    optimizer_eval_mode(optimizer)
    assert optimizer.mode == "eval"
    optimizer_train_mode(sgd())  # a no-op for ordinary optimizers

    with caplog.at_level(logging.WARNING):
        scheduler = create_lr_scheduler(
            optimizer, parse("--lr_scheduler", "cosine", "--lr_warmup_steps", "5"), 20
        )
    assert lr_curve(optimizer, scheduler, 20) == [LR] * 20
    assert "schedule-free" in caplog.text


def test_create_optimizer_puts_a_schedule_free_optimizer_in_train_mode():
    args = parse("--optimizer_type", f"{__name__}.FakeScheduleFree")
    name, _, optimizer = create_optimizer([tiny_param()], args)
    assert name.endswith("FakeScheduleFree") and optimizer.mode == "train"


# --- learning-rate schedules -------------------------------------------------------------------

TOTAL = 100


def curve_for(*argv: str, steps: int = TOTAL) -> list[float]:
    optimizer = sgd()
    scheduler = create_lr_scheduler(optimizer, parse(*argv), TOTAL)
    return lr_curve(optimizer, scheduler, steps)


def cosine(progress: float) -> float:
    return 0.5 * (1 + math.cos(math.pi * progress))


EXPECTED_CURVES = {
    ("constant",): {0: LR, 50: LR, 99: LR},
    ("constant_with_warmup", "--lr_warmup_steps", "10"): {0: 0.0, 5: LR / 2, 10: LR, 99: LR},
    ("linear", "--lr_warmup_steps", "10%"): {5: LR / 2, 10: LR, 55: LR / 2, 99: LR / 90},
    ("cosine", "--lr_warmup_steps", "0.1"): {10: LR, 55: LR * cosine(0.5), 80: LR * cosine(70 / 90)},
    ("cosine_with_restarts", "--lr_scheduler_num_cycles", "2"): {
        0: LR,
        25: LR * cosine(0.5),
        50: LR,
        75: LR * cosine(0.5),
    },
    ("polynomial", "--lr_scheduler_power", "2"): {0: LR, 50: (LR - 1e-7) * 0.25 + 1e-7},
    ("inverse_sqrt", "--lr_warmup_steps", "10"): {5: LR / 2, 10: LR, 40: LR / 2},
    ("cosine_with_min_lr", "--lr_scheduler_min_lr_ratio", "0.1"): {
        0: LR,
        50: LR * 0.55,
        99: LR * (0.1 + 0.9 * cosine(0.99)),
    },
    (
        "warmup_stable_decay",
        "--lr_warmup_steps",
        "10",
        "--lr_decay_steps",
        "20",
        "--lr_scheduler_min_lr_ratio",
        "0.2",
    ): {
        5: LR * (0.2 + 0.8 * 0.5),  # transformers' warmup starts at the min lr ratio
        10: LR,
        60: LR,
        90: LR * (0.2 + 0.8 * cosine(0.5)),
    },
    ("piecewise_constant", "--lr_scheduler_args", "step_rules='1:30,0.1:60,0.01'"): {
        0: LR,
        29: LR,
        30: LR * 0.1,
        60: LR * 0.01,
    },
}


@pytest.mark.parametrize("argv", list(EXPECTED_CURVES), ids=lambda argv: argv[0])
def test_each_lr_schedule_follows_its_curve(argv):
    curve = curve_for("--lr_scheduler", *argv)
    for step, expected in EXPECTED_CURVES[argv].items():
        assert curve[step] == pytest.approx(expected, rel=1e-6, abs=1e-12), f"step {step}"


def test_custom_scheduler_class_with_args():
    curve = curve_for(
        "--lr_scheduler_type", "StepLR", "--lr_scheduler_args", "step_size=10", "gamma=0.5", steps=21
    )
    assert curve[9] == LR and curve[10] == LR / 2 and curve[20] == LR / 4
    dotted = curve_for(
        "--lr_scheduler_type",
        "torch.optim.lr_scheduler.ExponentialLR",
        "--lr_scheduler_args",
        "gamma=0.9",
        steps=3,
    )
    assert dotted == pytest.approx([LR, LR * 0.9, LR * 0.81])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--lr_scheduler", "constant", "--lr_warmup_steps", "5"], "does not use warmup"),
        (["--lr_scheduler", "cosine_with_min_lr"], "needs --lr_scheduler_min_lr_ratio"),
        (["--lr_scheduler", "no_such_schedule"], "--lr_scheduler no_such_schedule is not supported"),
        (["--lr_scheduler", "reduce_lr_on_plateau"], "is not supported"),
        (["--lr_scheduler", "adafactor"], "--lr_scheduler adafactor needs --optimizer_type AdaFactor"),
        (
            ["--lr_scheduler", "warmup_stable_decay", "--lr_warmup_steps", "60", "--lr_decay_steps", "50"],
            "exceed",
        ),
        (["--lr_scheduler", "piecewise_constant"], "step_rules"),
        (["--lr_scheduler_type", "StepLR", "--lr_warmup_steps", "5"], "does not use warmup"),
        (
            ["--lr_scheduler_type", "StepLR", "--lr_scheduler_args", "nope=1"],
            "--lr_scheduler_args do not fit StepLR",
        ),
        (["--lr_scheduler_type", "NoSuchLR"], "--lr_scheduler_type NoSuchLR"),
        (
            ["--lr_scheduler", "cosine", "--lr_scheduler_args", "x"],
            "--lr_scheduler_args: 'x' is not key=value",
        ),
    ],
)
def test_schedule_errors_are_user_errors(argv, message):
    with pytest.raises(UserError, match=message):
        create_lr_scheduler(sgd(), parse(*argv), TOTAL)


def test_options_the_schedule_ignores_are_warned_about(caplog):
    with caplog.at_level(logging.WARNING):
        create_lr_scheduler(sgd(), parse("--lr_scheduler", "linear", "--lr_scheduler_power", "2"), TOTAL)
    assert "--lr_scheduler_power is not used by --lr_scheduler linear" in caplog.text
