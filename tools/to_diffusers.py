"""Write a single-file SD 1.x/2.x or SDXL checkpoint as a diffusers folder that transformers 4 and 5 both read.

    python -m tools.to_diffusers models/shapes-sd1.safetensors shapes-diffusers/

The folder loads with its trained text encoder in kohya's pinned stack (transformers 4.54,
diffusers 0.32) as well as in this project's (``library.models.diffusers_folder``).
"""

from __future__ import annotations

from pathlib import Path

from library.errors import OneLineParser, run_cli
from library.models.diffusers_folder import save_diffusers_folder
from library.models.loading import load_sd_model


def main(argv: list[str] | None = None) -> None:
    parser = OneLineParser(prog="python -m tools.to_diffusers", description=__doc__.split("\n")[0])
    parser.add_argument("model", type=Path, help="a .safetensors/.ckpt checkpoint (or a diffusers folder)")
    parser.add_argument("folder", type=Path, help="the diffusers folder to write")
    args = parser.parse_args(argv)
    save_diffusers_folder(load_sd_model(args.model), args.folder)
    print(f"wrote {args.folder}")


if __name__ == "__main__":
    run_cli(main)
