"""Train a Textual Inversion embedding for SDXL: kohya-ss/sd-scripts' command line.

The same trainer as ``train_textual_inversion.py`` (same options, dataset folders and TOML, and
kohya's one SDXL option, ``--disable_mmap_load_safetensors``); the model family decides what
differs: both text encoders get the new word, each starting from ``--init_word`` in its own
token table; the UNet is conditioned on both encoders' states, the second's pooled output and each
picture's size and crop (``library.text.sdxl_conditioning``); the file holds ``clip_l`` and
``clip_g`` rows, as kohya writes it.

Run with ``accelerate launch sdxl_train_textual_inversion.py ...`` or plain ``python``.
"""

from __future__ import annotations

from library.allocator import restart_under_installed_allocator
from library.errors import run_cli
from library.training.args import check_command_line

if __name__ == "__main__":  # first: the slow imports below wait for options that make sense,
    run_cli(lambda: check_command_line(sdxl=True))  # and a restart under tcmalloc would repeat them
    run_cli(restart_under_installed_allocator)

import train_textual_inversion


def main(argv: list[str] | None = None) -> None:
    train_textual_inversion.main(argv, sdxl=True)


if __name__ == "__main__":
    run_cli(main)
