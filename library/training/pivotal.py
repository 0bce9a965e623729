"""Pivotal tuning: a UNet LoRA trained beside the new word, with kohya's ``train_network.py`` options.

The word can only point at what the model already draws; the LoRA (kohya's ``networks.lora`` on
its default UNet layers) teaches the UNet what the word cannot reach. Both are trained by one
optimizer, in two parameter groups: the vectors at ``--learning_rate``, the LoRA at
``--unet_lr``. With ``--train_vectors_fraction F`` the vectors stop after that fraction of the
steps and only the LoRA trains on (the diffusers examples' "pivot"), so the word stays a word the
text encoder understands while the LoRA fits the details.

Without ``--network_module`` nothing here runs and a run is plain Textual Inversion.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from library.errors import UserError
from library.networks.lora import (
    UNET_PREFIX,
    LoRANetwork,
    default_unet_layers,
    is_wide_conv,
    network_from_file,
    read_lora_file,
)
from library.options import default_of

if TYPE_CHECKING:
    from library.training.run import Run

logger = logging.getLogger(__name__)

NETWORK_MODULE = "networks.lora"
DEFAULT_DIM = 4  # kohya's networks.lora without --network_dim
DEFAULT_ALPHA = 1.0  # kohya's --network_alpha default
DEFAULT_UNET_LR = 1e-4  # a LoRA's usual rate; --learning_rate stays the vectors' (often 50x higher)
LORA_OPTIONS = (
    "network_dim",
    "network_alpha",
    "network_weights",
    "network_args",
    "unet_lr",
    "network_train_unet_only",
)
NETWORK_ARGS = ("conv_dim", "conv_alpha")  # kohya's 3x3-convolution LoRA ("LoRA-C3Lier")


@dataclass(frozen=True)
class LoRASettings:
    """The LoRA trained beside the word (fields named like kohya's ``train_network.py`` options)."""

    network_module: str | None = None
    network_dim: int | None = None  # None: the --network_weights file's, else DEFAULT_DIM
    network_alpha: float | None = None  # None: the --network_weights file's, else DEFAULT_ALPHA
    network_weights: str | None = None
    network_args: list[str] | None = None  # "conv_dim=8", "conv_alpha=4"
    unet_lr: float | None = None  # None: DEFAULT_UNET_LR
    network_train_unet_only: bool = False  # always so here: the text side learns through the word
    train_vectors_fraction: float = 1.0

    @property
    def enabled(self) -> bool:
        return self.network_module is not None

    @property
    def learning_rate(self) -> float:
        return DEFAULT_UNET_LR if self.unet_lr is None else self.unet_lr

    @property
    def given_args(self) -> dict[str, str]:
        """``--network_args`` as kohya records them (``ss_network_args``): key to the text given."""
        pairs = [item.split("=", 1) for item in self.network_args or []]
        return {key.strip(): value.strip() for key, value in pairs}

    @property
    def conv(self) -> tuple[int, float] | None:
        """kohya's ``conv_dim`` and ``conv_alpha`` (1 when only conv_dim is given), or None."""
        args = self.given_args
        if "conv_dim" not in args:
            return None
        return int(args["conv_dim"]), float(args.get("conv_alpha", 1.0))


def add_lora_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group(
        "pivotal tuning: a UNet LoRA trained with the word (kohya's train_network.py options; docs/training.md)"
    )
    default = functools.partial(default_of, LoRASettings)
    g.add_argument(
        "--network_module",
        type=str,
        default=default("network_module"),
        help=f"{NETWORK_MODULE}: train a UNet LoRA beside the word and save it as name_lora.safetensors",
    )
    g.add_argument(
        "--network_dim", type=int, default=default("network_dim"), help=f"LoRA rank (default {DEFAULT_DIM})"
    )
    g.add_argument(
        "--network_alpha",
        type=float,
        default=default("network_alpha"),
        help=f"LoRA alpha: the output is scaled by alpha / dim (default {DEFAULT_ALPHA:g})",
    )
    g.add_argument(
        "--network_weights",
        type=str,
        default=default("network_weights"),
        help="continue from a kohya LoRA file (its rank and alpha are kept)",
    )
    g.add_argument(
        "--network_args",
        type=str,
        nargs="*",
        default=default("network_args"),
        help="conv_dim=N [conv_alpha=A]: also adapt the UNet's 3x3 convolutions (ResNet, down- and "
        "upsampling blocks) at rank N, as kohya's networks.lora does",
    )
    g.add_argument(
        "--unet_lr",
        type=float,
        default=default("unet_lr"),
        help=f"the LoRA's learning rate (default {DEFAULT_UNET_LR:g}); --learning_rate stays the vectors'",
    )
    g.add_argument(
        "--network_train_unet_only",
        action="store_true",
        help="accepted as in kohya: the LoRA here is always on the UNet only",
    )
    g.add_argument(
        "--train_vectors_fraction",
        type=float,
        default=default("train_vectors_fraction"),
        help="train the word's vectors for this fraction of the steps, then only the LoRA (default 1: all)",
    )


def check_lora_settings(lora: LoRASettings) -> None:
    """Before anything loads: the options fit together, and a --network_weights file is a UNet
    LoRA of the asked rank and alpha."""
    given = [name for name in LORA_OPTIONS if getattr(lora, name) not in (None, False)]
    if lora.train_vectors_fraction != 1.0:
        given.append("train_vectors_fraction")
    if not lora.enabled:
        if given:
            raise UserError(
                f"--{given[0]} is an option of the LoRA trained beside the word: add --network_module "
                f"{NETWORK_MODULE} (or remove --{given[0]} for plain Textual Inversion)"
            )
        return
    if lora.network_module != NETWORK_MODULE:
        raise UserError(
            f"--network_module {lora.network_module}: only {NETWORK_MODULE} (kohya's LoRA) is trained here"
        )
    if lora.network_dim is not None and lora.network_dim < 1:
        raise UserError(f"--network_dim {lora.network_dim}: must be at least 1 (e.g. 4, 8, 16)")
    for name in ("network_alpha", "unet_lr"):
        value = getattr(lora, name)
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise UserError(f"--{name} {value}: must be a finite number of 0 or more")
    if not 0 < lora.train_vectors_fraction <= 1:
        raise UserError(
            f"--train_vectors_fraction {lora.train_vectors_fraction}: must be above 0 and at most 1 "
            "(0.5: the vectors train for the first half of the steps)"
        )
    _check_network_args(lora)
    if lora.network_weights:
        _check_continued_file(lora)


def _check_network_args(lora: LoRASettings) -> None:
    """Only kohya's conv_dim and conv_alpha, as numbers; conv_alpha needs conv_dim."""
    for item in lora.network_args or []:
        key = item.split("=", 1)[0].strip()
        if "=" not in item or key not in NETWORK_ARGS:
            raise UserError(
                f"--network_args {item}: only conv_dim=N and conv_alpha=A (kohya's 3x3-convolution LoRA) are "
                "supported when training here"
            )
    args = lora.given_args
    if "conv_alpha" in args and "conv_dim" not in args:
        raise UserError("--network_args conv_alpha needs conv_dim=N too (the rank of the 3x3 convolutions)")
    try:
        conv = lora.conv
    except ValueError:
        conv = (0, 0.0)
    if conv is not None and not (conv[0] >= 1 and math.isfinite(conv[1]) and conv[1] >= 0):
        raise UserError(
            f"--network_args {' '.join(lora.network_args)}: conv_dim must be a whole number of at least 1 "
            "and conv_alpha a number of 0 or more"
        )


def _check_continued_file(lora: LoRASettings) -> None:
    """``--network_weights`` must be a UNet LoRA whose rank and alpha are the ones asked for."""
    file = read_lora_file(lora.network_weights)
    other = sorted(name for name in file.layers if not name.startswith(UNET_PREFIX + "_"))
    if other:
        raise UserError(
            f"--network_weights {file.path}: it adapts text-encoder layers ({other[0]}); the LoRA trained "
            "here is on the UNet only (the word trains the text side): continue from a UNet-only LoRA"
        )
    conv_dim, conv_alpha = lora.conv or (None, None)
    for wide, dim_option, dim, alpha_option, alpha in (
        (False, "--network_dim", lora.network_dim, "--network_alpha", lora.network_alpha),
        (True, "--network_args conv_dim", conv_dim, "--network_args conv_alpha", conv_alpha),
    ):
        parts = [p for p in file.layers.values() if _is_wide(p["lora_down.weight"]) == wide]
        dims = {int(p["lora_down.weight"].shape[0]) for p in parts}
        alphas = {float(p["alpha"]) for p in parts if "alpha" in p}
        for option, asked, found in ((dim_option, dim, dims), (alpha_option, alpha, alphas)):
            if asked is not None and found and found != {asked}:
                raise UserError(
                    f"--network_weights {file.path} has {option.split()[-1].removeprefix('--network_')} "
                    f"{', '.join(f'{v:g}' for v in sorted(found))}, but {option} is {asked:g}: remove it to "
                    "continue with the file's"
                )


def _is_wide(down: torch.Tensor) -> bool:
    """A file's ``lora_down`` weight of a 3x3 (or larger) convolution."""
    return down.dim() == 4 and tuple(down.shape[2:]) != (1, 1)


class UNetLoRA:
    """The run's LoRA: its adapters on the UNet, its learning rate and when the vectors stop."""

    def __init__(self, network: LoRANetwork, settings: LoRASettings, max_train_steps: int):
        self.network = network
        self.settings = settings
        plain = [a for a in network.adapters.values() if not is_wide_conv(a.lora_down)]
        first = (plain or list(network.adapters.values()))[0]  # the rank and alpha of --network_dim/alpha
        self.dim = int(first.lora_down.weight.shape[0])
        self.alpha = float(first.alpha)
        wide = [a for a in network.adapters.values() if is_wide_conv(a.lora_down)]
        self.conv = (int(wide[0].lora_down.weight.shape[0]), float(wide[0].alpha)) if wide else None
        self.pivot_step = max(1, round(settings.train_vectors_fraction * max_train_steps))

    @classmethod
    def for_run(
        cls, model, settings: LoRASettings, max_train_steps: int, device: torch.device, seed: int
    ) -> UNetLoRA | None:
        """A fresh network on kohya's default UNet layers (or the --network_weights file's), in fp32
        on ``device``, attached to the model; None without --network_module. A fresh network's
        random ``lora_down`` start comes from the run's seed: every process starts from the same."""
        if not settings.enabled:
            return None
        if settings.network_weights:
            network = network_from_file(read_lora_file(settings.network_weights), model)
            logger.info("continuing the LoRA of %s", settings.network_weights)
        else:
            dim = settings.network_dim or DEFAULT_DIM
            alpha = DEFAULT_ALPHA if settings.network_alpha is None else settings.network_alpha
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                layers = default_unet_layers(model, with_convs=settings.conv is not None)
                network = LoRANetwork.create(layers, dim, alpha, conv=settings.conv)
        network.to(device).requires_grad_(True)  # its parameters: alpha is a buffer
        network.attach()
        lora = cls(network, settings, max_train_steps)
        logger.info(
            "%s, alpha %g, learning rate %g%s",
            lora.describe(),
            lora.alpha,
            settings.learning_rate,
            f"; the vectors train for the first {lora.pivot_step} steps"
            if settings.train_vectors_fraction < 1
            else "",
        )
        return lora

    @property
    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.network.parameters() if p.requires_grad]

    def param_group(self) -> dict:
        return {"params": self.parameters, "lr": self.settings.learning_rate}

    def trains_vectors(self, steps_done: int) -> bool:
        """Whether the next optimizer step (after ``steps_done``) still moves the vectors."""
        return steps_done < self.pivot_step

    def describe(self) -> str:
        size = sum(p.numel() for p in self.parameters)
        convs = f", 3x3 convolutions at rank {self.conv[0]}" if self.conv else ""
        return f"LoRA rank {self.dim}{convs} on {len(self.network.adapters)} UNet layers ({size:,} weights)"

    # -----------------------------------------------------------------------------------------
    # the file

    def metadata(self, run: Run, session: LoRASession, step: int | None = None) -> dict[str, str]:
        """kohya's ``ss_*`` keys (those a LoRA loader or a gallery reads) and the SAI model spec, for
        the weights of ``step`` (default: now)."""
        settings, progress = run.settings, run.progress
        v_param = settings.model.v_parameterization
        family = run.model.family
        width, height = run.dataset.resolution
        training = {
            "ss_network_module": NETWORK_MODULE,
            "ss_network_dim": str(self.dim),
            "ss_network_alpha": f"{self.alpha:g}",
            **self._network_args_metadata(),
            "ss_base_model_version": family.base_model_version(v_param),
            "ss_v2": str(family.name == "sd2"),
            "ss_output_name": run.output_name,
            "ss_sd_model_name": Path(settings.model.path).name,
            "ss_learning_rate": f"{settings.optimizer.learning_rate:g}",
            "ss_unet_lr": f"{self.settings.learning_rate:g}",
            "ss_text_encoder_lr": "0",
            "ss_max_train_steps": str(run.length.max_train_steps),
            "ss_num_epochs": str(run.length.num_epochs),
            "ss_steps": str(progress.global_step if step is None else step),
            "ss_epoch": str(progress.epoch + (1 if progress.batches_done_in_epoch else 0)),  # 1-based
            "ss_seed": str(run.seed),
            "ss_resolution": f"({width}, {height})",
            "ss_clip_skip": str(settings.loop.clip_skip),
            "ss_mixed_precision": run.precision.mixed_precision,
            "ss_lr_scheduler": settings.optimizer.lr_scheduler,
            "ss_session_id": session.session_id,
            "ss_training_started_at": session.started_at,
            "ss_training_finished_at": str(time.time()),
            "ss_training_comment": json.dumps(
                {"embedding": run.output_name, "train_vectors_fraction": self.settings.train_vectors_fraction}
            ),
        }
        return {**training, **run.embedding_metadata(adapter="lora")}

    def _network_args_metadata(self) -> dict[str, str]:
        """kohya's ``ss_network_args`` when the 3x3 convolutions are adapted (also when continued
        from a file without --network_args)."""
        if self.conv is None:
            return {}
        dim, alpha = self.conv
        return {"ss_network_args": json.dumps({"conv_dim": str(dim), "conv_alpha": f"{alpha:g}"})}


@dataclass(frozen=True)
class LoRASession:
    """What stays the same across one process's saves (kohya: ``ss_session_id``, the start time)."""

    session_id: str
    started_at: str

    @classmethod
    def now(cls) -> LoRASession:
        return cls(str(secrets.randbelow(2**32)), str(time.time()))
