"""Guardrails: stop early with a clear message when a run cannot learn or has gone wrong."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from library.errors import UserError

logger = logging.getLogger(__name__)

FROZEN_CHECK_STEP = 10  # after this many steps, vectors that have not moved mean nothing is learned


def check_training_arguments(args: Any) -> None:
    """The options every run needs, checked before anything loads."""
    for flag in ("pretrained_model_name_or_path", "token_string"):
        if not getattr(args, flag):
            raise UserError(f"--{flag} is required")
    if not args.output_dir and not args.debug_dataset:
        raise UserError("--output_dir is required")
    if args.use_object_template and args.use_style_template:
        raise UserError("--use_object_template and --use_style_template exclude each other; choose one")
    if args.train_data_dir is None and args.dataset_config is None and args.in_json is None:
        raise UserError("no training data: pass --train_data_dir, --in_json or --dataset_config")
    if args.gradient_accumulation_steps < 1:
        raise UserError("--gradient_accumulation_steps must be at least 1")
    if args.max_train_steps < 1 and args.max_train_epochs is None:
        raise UserError("--max_train_steps must be at least 1")
    if args.clip_skip is not None and args.clip_skip < 1:
        raise UserError("--clip_skip must be 1 or more (1 = the last layer)")


def check_finite(
    loss: torch.Tensor,
    vectors: torch.Tensor,
    step: int,
    last_good: torch.Tensor,
    output_dir: Path,
    output_name: str,
    save: Callable[[str, int], None],
) -> float:
    """The loss as a float; on NaN/inf (loss or vectors) keep the last good vectors and stop.

    Both are read in one transfer, so a GPU step waits for the device once (for the loss the
    progress bar shows anyway), not twice.
    """
    value, vectors_finite = torch.stack(
        [loss.detach().float().reshape(()), torch.isfinite(vectors.detach()).all().float()]
    ).tolist()
    if math.isfinite(value) and vectors_finite:
        return value
    with torch.no_grad():
        vectors.copy_(last_good)
    name = f"{output_name}-last-good-step{step - 1:08d}"
    save(name + ".safetensors", step - 1)
    raise UserError(
        f"the loss became {value} at step {step}; the last good vectors (step {step - 1}) are saved as "
        f"{output_dir / (name + '.safetensors')}. Try a lower --learning_rate, --mixed_precision bf16 or no "
        "instead of fp16, or --max_grad_norm 1.0"
    )


def warn_if_vectors_frozen(step: int, start: torch.Tensor, vectors: torch.Tensor) -> None:
    """After ``FROZEN_CHECK_STEP`` steps, vectors identical to their start mean nothing is learned."""
    if step == FROZEN_CHECK_STEP and torch.equal(start, vectors.detach()):
        logger.warning(
            "after %d steps the vectors have not changed at all: check that the captions contain the token "
            "string and that --learning_rate is not 0",
            step,
        )
