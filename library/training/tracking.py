"""The progress bar's numbers and the tracker (TensorBoard / W&B) logs of a run."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

import torch

from library.errors import UserError
from library.files import read_text_file, tomllib
from library.shared_options import without_secrets


@dataclass(frozen=True)
class TrackerSettings:
    """Where and how a run is logged (fields named like the options)."""

    logging_dir: str | None = None
    log_with: str | None = None
    log_prefix: str | None = None
    log_tracker_name: str | None = None
    log_tracker_config: str | None = None
    log_config: bool = False
    wandb_run_name: str | None = None
    wandb_api_key: str | None = None

    @property
    def trackers(self) -> list[str] | None:
        """accelerate's ``log_with``: TensorBoard whenever a logging folder is given (kohya)."""
        if self.log_with:
            if not self.logging_dir:
                raise UserError(f"--log_with {self.log_with} needs --logging_dir")
            return ["tensorboard", "wandb"] if self.log_with == "all" else [self.log_with]
        return ["tensorboard"] if self.logging_dir else None

    def init_kwargs(self) -> dict[str, dict]:
        """Each tracker's init arguments: ``--log_tracker_config`` (a table per tracker, as kohya),
        with ``--wandb_run_name`` as W&B's run name."""
        options = _read_tracker_config(self.log_tracker_config) if self.log_tracker_config else {}
        if self.wandb_run_name:
            options.setdefault("wandb", {})["name"] = self.wandb_run_name
        return options


# kohya leaves these out of a logged config too: they name folders on the user's machine
PATH_OPTIONS = frozenset(
    {
        "pretrained_model_name_or_path",
        "vae",
        "tokenizer_cache_dir",
        "train_data_dir",
        "conditioning_data_dir",
        "reg_data_dir",
        "output_dir",
        "logging_dir",
    }
)


def logged_config(options: dict[str, Any], settings: TrackerSettings) -> dict[str, Any] | None:
    """What ``--log_config`` records in the tracker: the options without secrets and paths, as kohya
    (values the trackers cannot store become text); None without ``--log_config``, so that no
    config (and no TensorBoard hparams run) is written at all."""
    if not settings.log_config:
        return None
    kept = {k: v for k, v in without_secrets(options).items() if k not in PATH_OPTIONS}
    return {k: v if v is None or isinstance(v, (bool, int, float, str)) else str(v) for k, v in kept.items()}


class TrainLogger:
    """Loss, learning rate and each vector's norm, to the progress bar and the trackers.

    Tags are kohya's: ``loss`` (this step), ``lr``, ``lr/unet`` (pivotal tuning), ``lr/d*lr``
    (D-Adaptation, Prodigy) and ``loss/epoch`` (the epoch's mean, logged at step = epoch number); ours beside them:
    ``loss/average`` (the epoch so far, as the progress bar shows) and ``norm/vector<i>``
    (``norm/<encoder>/vector<i>`` for a family with several text encoders).
    """

    def __init__(
        self, accelerator, settings: TrackerSettings, config: dict[str, Any] | None, optimizer_name: str
    ):
        """``config`` is what ``logged_config`` gives: recorded in the tracker, or None."""
        self.accelerator = accelerator
        self.enabled = bool(accelerator.log_with)
        self.adaptive = optimizer_name.lower().startswith(("dadapt", "prodigy"))
        self.epoch_loss = 0.0
        self.epoch_steps = 0
        if self.enabled:
            accelerator.init_trackers(
                settings.log_tracker_name or "textual_inversion",
                config=config,
                init_kwargs=settings.init_kwargs(),
            )

    @classmethod
    def for_run(cls, run, optimizer_name: str) -> TrainLogger:
        """The run's logger: its trackers, with its options as config when ``--log_config`` asks."""
        settings = run.settings
        config = logged_config(settings.options, settings.tracking)
        return cls(run.accelerator, settings.tracking, config, optimizer_name)

    def log_step(
        self, step: int, loss: float, optimizer, lr_scheduler, vectors: dict[str, torch.Tensor], bar
    ) -> None:
        self.epoch_loss += loss
        self.epoch_steps += 1
        average = self.epoch_loss / self.epoch_steps
        lr = lr_scheduler.get_last_lr()[0]
        norms = {key: value.detach().float().norm(dim=1).tolist() for key, value in vectors.items()}
        logging.getLogger("train_textual_inversion").debug(
            "step %d: loss %.6g, lr %.9g, vector norms %s",
            step,
            loss,
            lr,
            " ".join(f"{n:.4g}" for values in norms.values() for n in values),
        )
        largest = max(n for values in norms.values() for n in values)
        bar.set_postfix(loss=f"{loss:.4f}", avg=f"{average:.4f}", lr=f"{lr:.2e}", norm=f"{largest:.3g}")
        if self.enabled:
            logs = {"loss": loss, "lr": lr, "loss/average": average}
            if len(lr_scheduler.get_last_lr()) > 1:  # pivotal tuning: the LoRA's rate (kohya's tag)
                logs["lr/unet"] = lr_scheduler.get_last_lr()[1]
            if self.adaptive:
                group = optimizer.param_groups[0]
                logs["lr/d*lr"] = group["d"] * group["lr"]
            for key, values in norms.items():
                prefix = "norm/" if len(norms) == 1 else f"norm/{key}/"
                for i, norm in enumerate(values):
                    logs[f"{prefix}vector{i}"] = norm
            self.accelerator.log(logs, step=step)

    def log_validation(self, step: int, value: float, kind: str, variance_ratio: float | None) -> None:
        """kohya's ``loss/validation/{step,epoch}_average`` and ``..._divergence`` (minus the epoch's training
        average), and ours: the early-stopping variance ratio."""
        if not self.enabled:
            return
        logs = {f"loss/validation/{kind}_average": value}
        if self.epoch_steps:
            logs[f"loss/validation/{kind}_divergence"] = value - self.epoch_loss / self.epoch_steps
        if variance_ratio is not None:
            logs["early_stopping/variance_ratio"] = variance_ratio
        self.accelerator.log(logs, step=step)

    def log_epoch(self, epoch: int) -> None:
        """The finished epoch's mean loss; the next epoch's average starts afresh (kohya)."""
        if self.enabled and self.epoch_steps:
            self.accelerator.log({"loss/epoch": self.epoch_loss / self.epoch_steps}, step=epoch)
        self.epoch_loss, self.epoch_steps = 0.0, 0


def _read_tracker_config(path: str) -> dict[str, dict]:
    """``--log_tracker_config``: a TOML (or JSON) file of init arguments, one table per tracker
    (``[tensorboard]``, ``[wandb]``), as kohya reads it."""
    text = read_text_file(path, "--log_tracker_config")
    try:
        options = json.loads(text) if path.endswith(".json") else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise UserError(f"--log_tracker_config {path}: cannot parse ({exc})") from exc
    if not isinstance(options, dict) or not all(isinstance(v, dict) for v in options.values()):
        raise UserError(
            f"--log_tracker_config {path}: expected one table of init arguments per tracker, "
            "e.g. [tensorboard] or [wandb]"
        )
    return options
