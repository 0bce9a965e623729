"""Console logging, the progress bar's numbers and tracker (TensorBoard / W&B) logs of a run."""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

import torch

from library.errors import UserError


def setup_console_logging(level: int, log_file: str | None = None, simple: bool = False) -> None:
    """``--console_log_level/file/simple``: plain lines on stderr (or into a file)."""
    fmt = "%(message)s" if simple else "%(asctime)s %(levelname)s %(name)s: %(message)s"
    handler = (
        logging.FileHandler(log_file, encoding="utf-8") if log_file else logging.StreamHandler(sys.stderr)
    )
    handler.setFormatter(logging.Formatter(fmt, datefmt="%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("httpx", "urllib3", "PIL", "torch._dynamo"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # diffusers/transformers chatter (dtype casts, weight loading bars) says nothing users can act on
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()


class TrainLogger:
    """Loss, learning rate and each vector's norm, to the progress bar and the trackers."""

    def __init__(self, accelerator, args: Any, optimizer_name: str, optimizer_args: str):
        self.accelerator = accelerator
        self.prefix = args.log_prefix or ""
        self.enabled = bool(accelerator.log_with)
        self.loss_sum = 0.0
        self.count = 0
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

    def log_step(self, step: int, loss: float, lr_scheduler, vectors: torch.Tensor, bar) -> None:
        self.loss_sum += loss
        self.count += 1
        lr = lr_scheduler.get_last_lr()[0]
        bar.set_postfix(loss=f"{loss:.4f}", avg=f"{self.loss_sum / self.count:.4f}", lr=f"{lr:.2e}")
        if self.enabled:
            logs = {f"{self.prefix}loss/current": loss, f"{self.prefix}loss/average": self.loss_sum / self.count,
                    f"{self.prefix}lr": lr}  # fmt: skip
            for i, norm in enumerate(vectors.detach().float().norm(dim=1).tolist()):
                logs[f"{self.prefix}norm/vector{i}"] = norm
            self.accelerator.log(logs, step=step)

    def log_epoch(self, epoch: int) -> None:
        if self.enabled and self.count:
            self.accelerator.log({f"{self.prefix}loss/epoch": self.loss_sum / self.count}, step=epoch)

    def finish(self) -> None:
        if self.enabled:
            self.accelerator.end_training()


def _read_tracker_config(path: str) -> dict:
    """``--log_tracker_config``: a TOML (or JSON) file of per-tracker init arguments, as kohya."""
    try:
        text = open(path, encoding="utf-8").read()
    except OSError as exc:
        raise UserError(f"--log_tracker_config {path}: cannot read ({exc})") from exc
    if path.endswith(".json"):
        return json.loads(text)
    import tomllib

    return tomllib.loads(text)
