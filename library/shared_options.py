"""The options both command lines share, declared once: which model and how to load it, the
console log, the attention backend, and the rule that keeps secrets out of every written config.

The trainer names the model ``--pretrained_model_name_or_path`` and the generator ``--ckpt``
(kohya's names); everything else here has the same name, type, default and meaning in both.
"""

from __future__ import annotations

import argparse
import functools
from dataclasses import dataclass
from typing import Any

from library.options import default_of

# Option values that must never be written anywhere: not into a logged config, a saved config
# file, metadata or a log line.
SECRET_OPTIONS = frozenset({"wandb_api_key", "huggingface_token"})


def without_secrets(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` (option name -> value) without the options that hold secrets."""
    return {name: value for name, value in values.items() if name not in SECRET_OPTIONS}


@dataclass(frozen=True)
class ModelSettings:
    """The model file or folder, and how to read it (fields named like the options)."""

    path: str | None = None  # --pretrained_model_name_or_path (trainer) or --ckpt (generator)
    v2: bool = False
    v_parameterization: bool = False
    vae: str | None = None
    tokenizer_cache_dir: str | None = None
    highvram: bool = False
    expect_sdxl: bool | None = None  # set by the program: SDXL only, SD 1.x/2.x only, or None (any)

    @property
    def exact_half_storage(self) -> bool:
        """Frozen fp32 layers keep the file's exact fp16 weights unless memory is plentiful."""
        return not self.highvram


def add_model_options(parser: argparse.ArgumentParser, path_option: str, path_help: str) -> None:
    """The model options, with the model itself under the program's own option name."""
    default = functools.partial(default_of, ModelSettings)
    group = parser.add_argument_group("model")
    group.add_argument(path_option, type=str, default=default("path"), help=path_help)
    group.add_argument(
        "--v2", action="store_true", help="the model is SD 2.x (detected from the file; a mismatch warns)"
    )
    group.add_argument(
        "--v_parameterization", action="store_true", help="the model predicts v (SD 2.x 768-v models)"
    )
    group.add_argument(
        "--vae", type=str, default=default("vae"), help="replace the model's VAE (file or folder)"
    )
    group.add_argument(
        "--tokenizer_cache_dir",
        type=str,
        default=default("tokenizer_cache_dir"),
        help="folder caching the tokenizer (kohya's layout)",
    )
    group.add_argument(
        "--highvram",
        action="store_true",
        help="memory is plentiful: keep the frozen weights in fp32, not the file's exact fp16 (faster small "
        "fp32 steps on a CPU, +1.9 GB for SD 1.5), and on a CPU keep the memory a step freed for the next",
    )


@dataclass(frozen=True)
class ConsoleSettings:
    """``--console_log_level/file/simple``."""

    console_log_level: str | None = None
    console_log_file: str | None = None
    console_log_simple: bool = False


def add_console_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("console log")
    group.add_argument(
        "--console_log_level",
        type=str,
        default=None,
        choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
        help="console log level (default INFO)",
    )
    group.add_argument(
        "--console_log_file", type=str, default=None, help="write the log to this file instead of the console"
    )
    group.add_argument(
        "--console_log_simple", action="store_true", help="plain log lines without time and level"
    )


def add_attention_options(parser: argparse.ArgumentParser) -> None:
    """``--xformers`` (CUDA with xformers installed; else SDPA with a warning) and ``--sdpa``."""
    group = parser.add_argument_group("attention")
    group.add_argument("--xformers", action="store_true", help="xformers attention (CUDA only; else SDPA)")
    group.add_argument(
        "--sdpa", action="store_true", help="PyTorch scaled-dot-product attention (the default)"
    )
