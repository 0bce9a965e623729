"""Console logging, the progress bar's numbers and tracker (TensorBoard / W&B) logs of a run."""

from __future__ import annotations

import json
import logging
from typing import Any

import torch

from library.errors import UserError
from library.files import tomllib


class TrainLogger:
    """Loss, learning rate and each vector's norm, to the progress bar and the trackers.

    Tags are kohya's: ``loss`` (this step), ``lr``, ``lr/d*lr`` (D-Adaptation, Prodigy) and
    ``loss/epoch`` (the epoch's mean, logged at step = epoch number); ours beside them:
    ``loss/average`` (the epoch so far, as the progress bar shows) and ``norm/vector<i>``.
    """

    def __init__(self, accelerator, args: Any, optimizer_name: str, optimizer_args: str):
        self.accelerator = accelerator
        self.enabled = bool(accelerator.log_with)
        self.adaptive = optimizer_name.lower().startswith(("dadapt", "prodigy"))
        self.epoch_loss = 0.0
        self.epoch_steps = 0
        if self.enabled:
            config = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
            init_kwargs = {}
            if args.log_tracker_config:
                init_kwargs = _read_tracker_config(args.log_tracker_config)
            if args.wandb_run_name:
                init_kwargs.setdefault("wandb", {})["name"] = args.wandb_run_name
            accelerator.init_trackers(
                args.log_tracker_name or "textual_inversion",
                config=config if args.log_config else {"optimizer": f"{optimizer_name} {optimizer_args}"},
                init_kwargs=init_kwargs,
            )

    def log_step(self, step: int, loss: float, optimizer, lr_scheduler, vectors: torch.Tensor, bar) -> None:
        self.epoch_loss += loss
        self.epoch_steps += 1
        average = self.epoch_loss / self.epoch_steps
        lr = lr_scheduler.get_last_lr()[0]
        logging.getLogger("train_textual_inversion").debug("step %d: loss %.6g, lr %.9g", step, loss, lr)
        bar.set_postfix(loss=f"{loss:.4f}", avg=f"{average:.4f}", lr=f"{lr:.2e}")
        if self.enabled:
            logs = {"loss": loss, "lr": lr, "loss/average": average}
            if self.adaptive:
                group = optimizer.param_groups[0]
                logs["lr/d*lr"] = group["d"] * group["lr"]
            for i, norm in enumerate(vectors.detach().float().norm(dim=1).tolist()):
                logs[f"norm/vector{i}"] = norm
            self.accelerator.log(logs, step=step)

    def log_epoch(self, epoch: int) -> None:
        """The finished epoch's mean loss; the next epoch's average starts afresh (kohya)."""
        if self.enabled and self.epoch_steps:
            self.accelerator.log({"loss/epoch": self.epoch_loss / self.epoch_steps}, step=epoch)
        self.epoch_loss, self.epoch_steps = 0.0, 0


def _read_tracker_config(path: str) -> dict:
    """``--log_tracker_config``: a TOML (or JSON) file of per-tracker init arguments, as kohya."""
    try:
        text = open(path, encoding="utf-8").read()
    except OSError as exc:
        raise UserError(f"--log_tracker_config {path}: cannot read ({exc})") from exc
    if path.endswith(".json"):
        return json.loads(text)
    return tomllib.loads(text)
