"""Optimizer and learning-rate schedule, built from kohya sd-scripts' options with kohya's rules.

The trainer builds ``OptimizerSettings`` from the command line once (``library.options``), then::

    optimizer_name, optimizer_args, optimizer = create_optimizer(trainable_params, settings)
    lr_scheduler = create_lr_scheduler(optimizer, settings, max_train_steps)

and around sampling/saving::

    optimizer_eval_mode(optimizer)   # schedule-free optimizers must be in eval mode to save/sample
    ...
    optimizer_train_mode(optimizer)

Optional optimizer packages are imported only when chosen; a missing one is a one-line UserError that
names the flag and the pip package.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from library.errors import UserError
from library.options import default_of

logger = logging.getLogger(__name__)

DEFAULT_LEARNING_RATE = 2.0e-6


@dataclass(frozen=True)
class OptimizerSettings:
    """The optimizer and learning-rate schedule options of one run (fields named like the options)."""

    optimizer_type: str = ""
    use_8bit_adam: bool = False
    use_lion_optimizer: bool = False
    learning_rate: float = DEFAULT_LEARNING_RATE
    max_grad_norm: float = 1.0
    optimizer_args: list[str] | None = None
    fused_backward_pass: bool = False
    lr_scheduler: str = "constant"
    lr_scheduler_type: str = ""
    lr_scheduler_args: list[str] | None = None
    lr_warmup_steps: int | float = 0
    lr_decay_steps: int | float = 0
    lr_scheduler_num_cycles: int = 1
    lr_scheduler_power: float = 1
    lr_scheduler_timescale: int | None = None
    lr_scheduler_min_lr_ratio: float | None = None


# ---------------------------------------------------------------------------------------------
# Arguments


def int_or_float(value: str) -> int | float:
    """argparse type of --lr_warmup_steps/--lr_decay_steps: steps (int), a ratio (< 1) or "N%".

    As in kohya, "N%" becomes the ratio N/100 and a value >= 1 must be a whole number of steps.
    """
    text = value.strip()
    try:
        if text.endswith("%"):
            ratio = float(text[:-1]) / 100.0
        else:
            number = float(text)
            if number >= 1:
                if not number.is_integer():
                    raise argparse.ArgumentTypeError(
                        f"'{value}' is neither a whole number of steps nor a ratio below 1"
                    )
                return int(number)
            ratio = number
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"'{value}' is not a number of steps, a ratio or a percentage"
        ) from None
    if ratio < 0:
        raise argparse.ArgumentTypeError(f"'{value}' must not be negative")
    return ratio


def add_optimizer_arguments(parser: argparse.ArgumentParser) -> None:
    """Add kohya's "optimizer & schedule" options (names, types and defaults as in sd-scripts)."""
    parser.add_argument(
        "--optimizer_type",
        type=str,
        default=default_of(OptimizerSettings, "optimizer_type"),
        help="optimizer: AdamW (default), AdamW8bit, PagedAdamW, PagedAdamW8bit, PagedAdamW32bit, Lion, "
        "Lion8bit, PagedLion8bit, SGDNesterov, SGDNesterov8bit, DAdaptation, DAdaptAdaGrad, DAdaptAdam, "
        "DAdaptAdan, DAdaptAdanIP, DAdaptLion, DAdaptSGD, Prodigy, AdaFactor, AdamWScheduleFree, "
        "SGDScheduleFree, RAdamScheduleFree, or any class as module.Class (e.g. torch.optim.Adam)",
    )
    parser.add_argument(
        "--use_8bit_adam", action="store_true", help="use 8-bit AdamW (bitsandbytes); same as AdamW8bit"
    )
    parser.add_argument(
        "--use_lion_optimizer",
        action="store_true",
        help="use Lion (lion-pytorch); same as --optimizer_type Lion",
    )
    parser.add_argument(
        "--learning_rate",
        type=float,
        default=default_of(OptimizerSettings, "learning_rate"),
        help="learning rate",
    )
    parser.add_argument(
        "--max_grad_norm",
        type=float,
        default=default_of(OptimizerSettings, "max_grad_norm"),
        help="max gradient norm, 0 for no clipping (default 1.0)",
    )
    parser.add_argument(
        "--optimizer_args",
        type=str,
        default=default_of(OptimizerSettings, "optimizer_args"),
        nargs="*",
        help='extra optimizer arguments as key=value, values are Python literals: "weight_decay=0.01" '
        '"betas=0.9,0.999"',
    )
    parser.add_argument(
        "--lr_scheduler_type",
        type=str,
        default=default_of(OptimizerSettings, "lr_scheduler_type"),
        help="custom scheduler class, e.g. torch.optim.lr_scheduler.StepLR",
    )
    parser.add_argument(
        "--lr_scheduler_args",
        type=str,
        default=default_of(OptimizerSettings, "lr_scheduler_args"),
        nargs="*",
        help='extra scheduler arguments as key=value, values are Python literals: "T_max=100"',
    )
    parser.add_argument(
        "--lr_scheduler",
        type=str,
        default=default_of(OptimizerSettings, "lr_scheduler"),
        help="lr schedule: constant (default), constant_with_warmup, linear, cosine, cosine_with_restarts, "
        "polynomial, inverse_sqrt, cosine_with_min_lr, warmup_stable_decay, piecewise_constant, adafactor",
    )
    parser.add_argument(
        "--lr_warmup_steps",
        type=int_or_float,
        default=default_of(OptimizerSettings, "lr_warmup_steps"),
        help="warmup steps: a number of steps, a ratio of the training steps (< 1) or a percentage like 10%%",
    )
    parser.add_argument(
        "--lr_decay_steps",
        type=int_or_float,
        default=default_of(OptimizerSettings, "lr_decay_steps"),
        help="decay steps of warmup_stable_decay: steps, a ratio (< 1) or a percentage like 20%%",
    )
    parser.add_argument(
        "--lr_scheduler_num_cycles",
        type=int,
        default=default_of(OptimizerSettings, "lr_scheduler_num_cycles"),
        help="restarts of cosine_with_restarts (default 1)",
    )
    parser.add_argument(
        "--lr_scheduler_power",
        type=float,
        default=default_of(OptimizerSettings, "lr_scheduler_power"),
        help="power of the polynomial schedule (default 1)",
    )
    parser.add_argument(
        "--fused_backward_pass",
        action="store_true",
        help="not available for textual inversion (kohya implements it for SDXL, SD3 and FLUX only)",
    )
    parser.add_argument(
        "--lr_scheduler_timescale",
        type=int,
        default=default_of(OptimizerSettings, "lr_scheduler_timescale"),
        help="timescale of inverse_sqrt (default: the warmup steps)",
    )
    parser.add_argument(
        "--lr_scheduler_min_lr_ratio",
        type=float,
        default=default_of(OptimizerSettings, "lr_scheduler_min_lr_ratio"),
        help="minimum lr as a ratio of the initial lr, for cosine_with_min_lr and warmup_stable_decay",
    )


def parse_key_value_args(items: Iterable[str] | None, flag: str) -> dict[str, Any]:
    """kohya's key=value parsing: values are Python literals (0.01, True, (0.9, 0.999), 0.9,0.999, 'x')."""
    hyper: dict[str, Any] = {}
    for item in items or []:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"{flag}: '{item}' is not key=value (e.g. {flag} weight_decay=0.01)")
        try:
            hyper[key.strip()] = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError):
            raise UserError(
                f"{flag}: the value of '{item}' is not a Python literal (quote strings: key='text')"
            ) from None
    return hyper


def resolve_step_count(value: int | float | str | None, total_steps: int, flag: str) -> int:
    """Absolute step count of --lr_warmup_steps/--lr_decay_steps for ``total_steps`` training steps.

    Ratios are truncated like kohya (int(ratio * total)); "N%" strings (e.g. from a config file that
    skipped argparse) are accepted too.
    """
    if value is None:
        return 0
    if isinstance(value, str):
        try:
            value = int_or_float(value)
        except argparse.ArgumentTypeError as exc:
            raise UserError(f"{flag}: {exc}") from None
    if isinstance(value, float):
        if value < 0:
            raise UserError(f"{flag} must not be negative, got {value}")
        return int(value * total_steps)
    if value < 0:
        raise UserError(f"{flag} must not be negative, got {value}")
    return int(value)


# ---------------------------------------------------------------------------------------------
# Optimizers


@dataclass(frozen=True)
class _KnownOptimizer:
    module: str
    class_name: str
    pip_package: str | None  # None: always installed (torch, transformers)
    nesterov: bool = False  # SGDNesterov*: nesterov=True and momentum 0.9 unless given


_KNOWN_OPTIMIZERS: dict[str, _KnownOptimizer] = {
    "adamw": _KnownOptimizer("torch.optim", "AdamW", None),
    "adamw8bit": _KnownOptimizer("bitsandbytes.optim", "AdamW8bit", "bitsandbytes"),
    "pagedadamw": _KnownOptimizer("bitsandbytes.optim", "PagedAdamW", "bitsandbytes"),
    "pagedadamw8bit": _KnownOptimizer("bitsandbytes.optim", "PagedAdamW8bit", "bitsandbytes"),
    "pagedadamw32bit": _KnownOptimizer("bitsandbytes.optim", "PagedAdamW32bit", "bitsandbytes"),
    "lion": _KnownOptimizer("lion_pytorch", "Lion", "lion-pytorch"),
    "lion8bit": _KnownOptimizer("bitsandbytes.optim", "Lion8bit", "bitsandbytes"),
    "pagedlion8bit": _KnownOptimizer("bitsandbytes.optim", "PagedLion8bit", "bitsandbytes"),
    "sgdnesterov": _KnownOptimizer("torch.optim", "SGD", None, nesterov=True),
    "sgdnesterov8bit": _KnownOptimizer("bitsandbytes.optim", "SGD8bit", "bitsandbytes", nesterov=True),
    "dadaptation": _KnownOptimizer("dadaptation.experimental", "DAdaptAdamPreprint", "dadaptation"),
    "dadaptadampreprint": _KnownOptimizer("dadaptation.experimental", "DAdaptAdamPreprint", "dadaptation"),
    "dadaptadagrad": _KnownOptimizer("dadaptation", "DAdaptAdaGrad", "dadaptation"),
    "dadaptadam": _KnownOptimizer("dadaptation", "DAdaptAdam", "dadaptation"),
    "dadaptadan": _KnownOptimizer("dadaptation", "DAdaptAdan", "dadaptation"),
    "dadaptadanip": _KnownOptimizer("dadaptation.experimental", "DAdaptAdanIP", "dadaptation"),
    "dadaptlion": _KnownOptimizer("dadaptation", "DAdaptLion", "dadaptation"),
    "dadaptsgd": _KnownOptimizer("dadaptation", "DAdaptSGD", "dadaptation"),
    "prodigy": _KnownOptimizer("prodigyopt", "Prodigy", "prodigyopt"),
    "adafactor": _KnownOptimizer("transformers.optimization", "Adafactor", None),
    "adamwschedulefree": _KnownOptimizer("schedulefree", "AdamWScheduleFree", "schedulefree"),
    "sgdschedulefree": _KnownOptimizer("schedulefree", "SGDScheduleFree", "schedulefree"),
    "radamschedulefree": _KnownOptimizer("schedulefree", "RAdamScheduleFree", "schedulefree"),
}


def _optimizer_choice(settings: OptimizerSettings) -> tuple[str, str]:
    """(optimizer type as given, the flag that chose it), applying kohya's legacy flags and conflicts."""
    optimizer_type = settings.optimizer_type or ""
    use_8bit_adam = settings.use_8bit_adam
    use_lion = settings.use_lion_optimizer
    if use_8bit_adam and use_lion:
        raise UserError("--use_8bit_adam and --use_lion_optimizer cannot be used together: pick one")
    if use_8bit_adam or use_lion:
        legacy_flag = "--use_8bit_adam" if use_8bit_adam else "--use_lion_optimizer"
        if optimizer_type:
            raise UserError(
                f"{legacy_flag} and --optimizer_type {optimizer_type} cannot be used together: "
                "use only --optimizer_type"
            )
        return ("AdamW8bit" if use_8bit_adam else "Lion"), legacy_flag
    if not optimizer_type:
        return "AdamW", "--optimizer_type AdamW"
    return optimizer_type, f"--optimizer_type {optimizer_type}"


def _import_known_class(known: _KnownOptimizer, flag: str) -> type:
    try:
        module = importlib.import_module(known.module)
    except ImportError:
        package = known.pip_package or known.module.split(".")[0]
        raise UserError(f"{flag} needs the {package} package: pip install {package}") from None
    try:
        return getattr(module, known.class_name)
    except AttributeError:
        raise UserError(
            f"{flag} needs a newer {known.pip_package} (no {known.class_name}): pip install -U {known.pip_package}"
        ) from None


def _import_dotted_class(optimizer_type: str) -> type:
    """kohya's "any optimizer": a bare name is looked up in torch.optim, module.Class is imported."""
    if "." in optimizer_type:
        module_name, _, class_name = optimizer_type.rpartition(".")
    else:
        module_name, class_name = "torch.optim", optimizer_type
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UserError(
            f"--optimizer_type {optimizer_type}: cannot import module {module_name} ({exc}); "
            f"known types: {', '.join(_KNOWN_OPTIMIZERS)}"
        ) from None
    optimizer_class = getattr(module, class_name, None)
    if not isinstance(optimizer_class, type):
        raise UserError(
            f"--optimizer_type {optimizer_type}: {module_name} has no class {class_name}; "
            f"known types: {', '.join(_KNOWN_OPTIMIZERS)}"
        )
    return optimizer_class


def optimizer_class_for(settings: OptimizerSettings) -> type:
    """The optimizer class the options name, imported: a wrong name or a missing package is found
    here, before the model loads (``create_optimizer`` makes the optimizer with it)."""
    optimizer_type, flag = _optimizer_choice(settings)
    known = _KNOWN_OPTIMIZERS.get(optimizer_type.lower())
    return _import_dotted_class(optimizer_type) if known is None else _import_known_class(known, flag)


def optimizer_label(settings: OptimizerSettings) -> str:
    """The optimizer as a resumable state records it: its type, lower-cased (kohya's legacy flags resolved)."""
    return _optimizer_choice(settings)[0].lower()


def _first_group_lr(params: list[Any], lr: float) -> tuple[float, int]:
    if params and isinstance(params[0], dict):
        first = params[0].get("lr", lr)
        return first, len({group.get("lr", first) for group in params})
    return lr, 1


def _warn_if_adaptive_lr_too_low(params: list[Any], lr: float) -> None:
    """D-Adaptation and Prodigy estimate the step size themselves; kohya wants lr around 1.0."""
    actual_lr, distinct_lrs = _first_group_lr(params, lr)
    if actual_lr <= 0.1:
        logger.warning(
            f"learning rate {actual_lr} is too low for D-Adaptation/Prodigy: set --learning_rate around 1.0"
        )
    if distinct_lrs > 1:
        logger.warning(
            f"D-Adaptation/Prodigy with several learning rates: only the first ({actual_lr}) takes effect"
        )


def _prepare_adafactor(
    params: list[Any], hyper: dict[str, Any], lr: float, settings: OptimizerSettings
) -> float | None:
    """kohya's Adafactor handling; returns the lr to pass (None when Adafactor picks its own step size).

    relative_step defaults to True (and warmup_init forces it). Then --learning_rate only seeds the
    'adafactor' lr schedule that create_lr_scheduler uses, and per-group lrs are dropped.
    """
    hyper.setdefault("relative_step", True)
    if not hyper["relative_step"] and hyper.get("warmup_init", False):
        logger.info("Adafactor: warmup_init=True needs relative_step=True; setting relative_step=True")
        hyper["relative_step"] = True
    if hyper["relative_step"]:
        if lr != 0.0:
            logger.warning("Adafactor with relative_step: --learning_rate is used as the initial lr only")
        dropped = [group.pop("lr", None) for group in params if isinstance(group, dict)]
        if any(value is not None for value in dropped):
            logger.warning("Adafactor with relative_step: per-group learning rates are ignored")
        if settings.lr_scheduler != "adafactor":
            logger.info("Adafactor with relative_step: using the adafactor lr schedule")
        return None
    if settings.max_grad_norm != 0.0:
        logger.warning("Adafactor: --max_grad_norm clips gradients; consider --max_grad_norm 0")
    if settings.lr_scheduler != "constant_with_warmup":
        logger.warning("Adafactor without relative_step: --lr_scheduler constant_with_warmup may work better")
    if hyper.get("clip_threshold", 1.0) != 1.0:
        logger.warning("Adafactor: clip_threshold=1.0 may work better")
    return lr


def create_optimizer(
    params: list[torch.nn.Parameter] | list[dict], settings: OptimizerSettings
) -> tuple[str, str, Any]:
    """kohya's get_optimizer: returns (optimizer class path, its extra args as "k=v,...", optimizer)."""
    if settings.fused_backward_pass:
        raise UserError(
            "--fused_backward_pass is not available for textual inversion (kohya implements it only for "
            "SDXL, SD3 and FLUX fine-tuning); remove it"
        )
    params = list(params)
    if not params:
        raise ValueError("create_optimizer got no parameters to train")
    optimizer_type, flag = _optimizer_choice(settings)
    hyper = parse_key_value_args(settings.optimizer_args, "--optimizer_args")
    lr = settings.learning_rate
    type_key = optimizer_type.lower()
    known = _KNOWN_OPTIMIZERS.get(type_key)

    if known is None:
        optimizer_class = _import_dotted_class(optimizer_type)
    else:
        if type_key.startswith("dadapt") or type_key == "prodigy":
            _warn_if_adaptive_lr_too_low(params, lr)
        optimizer_class = _import_known_class(known, flag)
        if known.nesterov:
            if "momentum" not in hyper:
                logger.info("SGD with Nesterov needs momentum; using momentum=0.9")
                hyper["momentum"] = 0.9
            hyper["nesterov"] = True
        if type_key == "adafactor":
            lr = _prepare_adafactor(params, hyper, lr, settings)

    logger.info(f"use {optimizer_class.__name__} optimizer | {hyper}")
    try:
        optimizer = optimizer_class(params, lr=lr, **hyper)
    except TypeError as exc:
        raise UserError(f"--optimizer_args do not fit {optimizer_class.__name__}: {exc}") from None
    except ValueError as exc:  # optimizers validate their hyper-parameters with ValueError
        raise UserError(
            f"--optimizer_args / --learning_rate rejected by {optimizer_class.__name__}: {exc}"
        ) from None

    optimizer_train_mode(optimizer)  # schedule-free optimizers start in train mode (kohya does the same)
    optimizer_name = f"{optimizer_class.__module__}.{optimizer_class.__name__}"
    optimizer_args = ",".join(f"{key}={value}" for key, value in hyper.items())
    return optimizer_name, optimizer_args, optimizer


def _unwrap(optimizer: Any) -> Any:
    """The real optimizer inside accelerate's AcceleratedOptimizer (or the optimizer itself)."""
    inner = getattr(optimizer, "optimizer", None)
    return inner if isinstance(inner, torch.optim.Optimizer) else optimizer


def is_schedule_free(optimizer: Any) -> bool:
    """True for the schedulefree package's optimizers (they need train/eval modes and no lr schedule)."""
    return type(_unwrap(optimizer)).__name__.lower().endswith("schedulefree")


def optimizer_train_mode(optimizer: Any) -> None:
    """Switch a schedule-free optimizer back to train mode after sampling/saving (no-op for others)."""
    train = getattr(_unwrap(optimizer), "train", None)
    if callable(train):
        train()


def optimizer_eval_mode(optimizer: Any) -> None:
    """Put a schedule-free optimizer's averaged weights in place before sampling/saving (no-op for others)."""
    evaluate = getattr(_unwrap(optimizer), "eval", None)
    if callable(evaluate):
        evaluate()


def is_relative_step_adafactor(optimizer: Any) -> bool:
    inner = _unwrap(optimizer)
    return type(inner).__name__ == "Adafactor" and bool(getattr(inner, "defaults", {}).get("relative_step"))


# ---------------------------------------------------------------------------------------------
# Learning-rate schedules

SUPPORTED_LR_SCHEDULERS = (
    "constant",
    "constant_with_warmup",
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "inverse_sqrt",
    "cosine_with_min_lr",
    "warmup_stable_decay",
    "piecewise_constant",
    "adafactor",
)

# Which scheduler reads which option, to warn about options given for a schedule that ignores them.
_OPTION_USERS = {
    "lr_decay_steps": ("--lr_decay_steps", 0, ("warmup_stable_decay",)),
    "lr_scheduler_num_cycles": (
        "--lr_scheduler_num_cycles",
        1,
        ("cosine_with_restarts", "cosine_with_min_lr", "warmup_stable_decay"),
    ),
    "lr_scheduler_power": ("--lr_scheduler_power", 1, ("polynomial",)),
    "lr_scheduler_timescale": ("--lr_scheduler_timescale", None, ("inverse_sqrt",)),
    "lr_scheduler_min_lr_ratio": (
        "--lr_scheduler_min_lr_ratio",
        None,
        ("cosine_with_min_lr", "warmup_stable_decay"),
    ),
}


def _warn_unused_schedule_options(settings: OptimizerSettings, name: str) -> None:
    for attribute, (flag, default, users) in _OPTION_USERS.items():
        value = getattr(settings, attribute)
        if value != default and name not in users:
            logger.warning(f"{flag} is not used by --lr_scheduler {name}; ignored")


def _constant_schedule(optimizer: Any) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(_unwrap(optimizer), lambda _: 1.0)


def _require_no_warmup(num_warmup_steps: int, what: str) -> None:
    if num_warmup_steps != 0:
        raise UserError(f"{what} does not use warmup: remove --lr_warmup_steps or use another --lr_scheduler")


def _custom_scheduler(
    optimizer: Any, scheduler_type: str, hyper: dict[str, Any], num_warmup_steps: int
) -> Any:
    """--lr_scheduler_type: a bare name from torch.optim.lr_scheduler, or module.Class."""
    _require_no_warmup(num_warmup_steps, f"--lr_scheduler_type {scheduler_type}")
    module_name, _, class_name = scheduler_type.rpartition(".")
    module_name = module_name or "torch.optim.lr_scheduler"
    try:
        scheduler_class = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError):
        raise UserError(
            f"--lr_scheduler_type {scheduler_type}: no class {class_name} in {module_name}"
        ) from None
    logger.info(f"use {scheduler_type} | {hyper} as lr scheduler")
    try:
        return scheduler_class(_unwrap(optimizer), **hyper)
    except TypeError as exc:
        raise UserError(f"--lr_scheduler_args do not fit {scheduler_type}: {exc}") from None


def create_lr_scheduler(optimizer: Any, settings: OptimizerSettings, num_training_steps: int) -> Any:
    """kohya's get_scheduler_fix: the lr schedule for ``num_training_steps`` optimizer steps.

    The trainer steps it once per optimizer step on every process, so the learning rate at each
    step is the same on 1 and N processes: kohya's single-GPU trajectory. (kohya builds it for
    steps x processes and lets accelerate step it N times per step, which amounts to the same.)
    Warmup/decay ratios are taken of ``num_training_steps``, schedule-free optimizers get a
    constant schedule, and relative-step Adafactor gets transformers' AdafactorSchedule.
    """
    name = settings.lr_scheduler or "constant"
    total_steps = num_training_steps
    warmup = resolve_step_count(settings.lr_warmup_steps, total_steps, "--lr_warmup_steps")
    decay = resolve_step_count(settings.lr_decay_steps, total_steps, "--lr_decay_steps")
    num_cycles = settings.lr_scheduler_num_cycles
    min_lr_ratio = settings.lr_scheduler_min_lr_ratio
    hyper = parse_key_value_args(settings.lr_scheduler_args, "--lr_scheduler_args")
    inner = _unwrap(optimizer)

    if is_schedule_free(optimizer):
        if name != "constant" or warmup or settings.lr_scheduler_type:
            logger.warning(
                "schedule-free optimizers run without an lr schedule (as in kohya): --lr_scheduler, "
                "--lr_scheduler_type and --lr_warmup_steps are ignored; use --optimizer_args warmup_steps=N"
            )
        return _constant_schedule(optimizer)

    scheduler_type = settings.lr_scheduler_type or ""
    if scheduler_type:
        return _custom_scheduler(optimizer, scheduler_type, hyper, warmup)

    if is_relative_step_adafactor(optimizer) or name.startswith("adafactor"):
        if not is_relative_step_adafactor(optimizer):
            raise UserError(
                "--lr_scheduler adafactor needs --optimizer_type AdaFactor with relative_step=True "
                "(its default); use another --lr_scheduler"
            )
        _require_no_warmup(warmup, "the adafactor lr schedule (used by Adafactor with relative_step)")
        from transformers.optimization import AdafactorSchedule

        initial_lr = float(name.split(":", 1)[1]) if ":" in name else settings.learning_rate
        return AdafactorSchedule(inner, initial_lr)

    if name not in SUPPORTED_LR_SCHEDULERS:
        raise UserError(
            f"--lr_scheduler {name} is not supported; use one of {', '.join(SUPPORTED_LR_SCHEDULERS)}"
        )
    _warn_unused_schedule_options(settings, name)

    if name == "piecewise_constant":
        from diffusers.optimization import get_piecewise_constant_schedule

        try:
            return get_piecewise_constant_schedule(inner, **hyper)
        except (TypeError, ValueError) as exc:
            raise UserError(
                f"--lr_scheduler piecewise_constant needs --lr_scheduler_args step_rules='1:100,0.1' ({exc})"
            ) from None

    from transformers.optimization import TYPE_TO_SCHEDULER_FUNCTION, SchedulerType

    schedule_function = TYPE_TO_SCHEDULER_FUNCTION[SchedulerType(name)]
    if warmup > total_steps:
        logger.warning(f"--lr_warmup_steps ({warmup}) is longer than the {total_steps} training steps")

    if name == "constant":
        _require_no_warmup(warmup, "--lr_scheduler constant (use constant_with_warmup)")
        call: dict[str, Any] = {}
    elif name == "constant_with_warmup":
        call = {"num_warmup_steps": warmup}
    elif name == "inverse_sqrt":
        call = {"num_warmup_steps": warmup, "timescale": settings.lr_scheduler_timescale}
    elif name in ("linear", "cosine"):
        call = {"num_warmup_steps": warmup, "num_training_steps": total_steps}
    elif name == "cosine_with_restarts":
        call = {"num_warmup_steps": warmup, "num_training_steps": total_steps, "num_cycles": num_cycles}
    elif name == "polynomial":
        call = {
            "num_warmup_steps": warmup,
            "num_training_steps": total_steps,
            "power": settings.lr_scheduler_power,
        }
    elif name == "cosine_with_min_lr":
        if min_lr_ratio is None:
            raise UserError("--lr_scheduler cosine_with_min_lr needs --lr_scheduler_min_lr_ratio (e.g. 0.1)")
        call = {
            "num_warmup_steps": warmup,
            "num_training_steps": total_steps,
            "num_cycles": num_cycles / 2,
            "min_lr_rate": min_lr_ratio,
        }
    else:  # warmup_stable_decay
        stable = total_steps - warmup - decay
        if stable < 0:
            raise UserError(
                f"--lr_warmup_steps ({warmup}) + --lr_decay_steps ({decay}) exceed the {total_steps} training steps"
            )
        call = {
            "num_warmup_steps": warmup,
            "num_stable_steps": stable,
            "num_decay_steps": decay,
            "num_cycles": num_cycles / 2,
            "min_lr_ratio": min_lr_ratio if min_lr_ratio is not None else 0.0,
        }
    try:
        return schedule_function(inner, **call, **hyper)
    except TypeError as exc:
        raise UserError(f"--lr_scheduler_args do not fit --lr_scheduler {name}: {exc}") from None
