"""Running the real CLIs in tests: the trainer's command line (in this process, or in its own
where the process matters), pictures to train on, the common options of a tiny-model run, and the
one error line a refused run prints."""

from __future__ import annotations

import contextlib
import gc
import io
import logging
import os
import subprocess
import sys
import traceback
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
TRAIN = str(ROOT / "train_textual_inversion.py")
TRAIN_SDXL = str(ROOT / "sdxl_train_textual_inversion.py")
CAPTION = "a photo of mychar4 toy, number {i}"


def run_train(
    *args: str,
    check: bool = True,
    launcher: list[str] | None = None,
    env: dict | None = None,
    sdxl: bool = False,
) -> subprocess.CompletedProcess:
    """The trainer CLI (``sdxl``: the SDXL trainer) on ``args``; fails the test on a non-zero exit
    unless ``check`` is False.

    It runs in this process, as ``python train_textual_inversion.py`` would run it (the same entry
    point, exit code, stdout and stderr), because a new process spends most of a tiny run importing
    torch and diffusers. A ``launcher`` or an ``env`` gives the run a process of its own (one
    thread, offline): for several processes, or environment variables the run reads.
    """
    if launcher is None and env is None:
        result = _run_here(list(args), sdxl)
    else:
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "OMP_NUM_THREADS": "1",
            **(env or {}),
        }
        cmd = (launcher or [sys.executable]) + [TRAIN_SDXL if sdxl else TRAIN, *args]
        result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return result


def _run_here(argv: list[str], sdxl: bool) -> subprocess.CompletedProcess:
    """``run_train`` in this process: the script's entry point with stdout and stderr captured, and
    what a run leaves in the process (logging, accelerate's state, warning filters) put back."""
    from accelerate.state import AcceleratorState, GradientState

    import train_textual_inversion
    from library.errors import run_cli

    stdout, stderr = io.StringIO(), io.StringIO()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    cwd = os.getcwd()
    code = 0
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr), warnings.catch_warnings():
        _warn_as_a_new_process_would()
        os.chdir(ROOT)
        try:
            run_cli(lambda: train_textual_inversion.main(argv, sdxl=sdxl))
        except SystemExit as exit:
            code = exit.code if isinstance(exit.code, int) else (0 if exit.code is None else 1)
        except BaseException:  # what Python prints for an uncaught exception, and its exit code
            traceback.print_exc()
            code = 1
        finally:
            os.chdir(cwd)
            root.handlers[:], root.level = handlers, level
            AcceleratorState._reset_state(reset_partial_state=True)
            GradientState._reset_state()
            torch._dynamo.reset()  # what --torch_compile compiled
            gc.collect()
    return subprocess.CompletedProcess(
        [TRAIN_SDXL if sdxl else TRAIN, *argv], code, stdout.getvalue(), stderr.getvalue()
    )


def _warn_as_a_new_process_would() -> None:
    """Python's own warning filters, each warning shown once, on (the captured) stderr: pytest's
    filters would record warnings instead, and a warning seen by an earlier run would not repeat."""
    warnings.resetwarnings()
    warnings.simplefilter("default")
    for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
        warnings.simplefilter("ignore", category)
    warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: sys.stderr.write(
        warnings.formatwarning(message, category, filename, lineno, line)
    )


TWO_PROCESSES = [
    sys.executable,
    "-m",
    "accelerate.commands.launch",
    "--multi_gpu",
    "--num_processes=2",
    "--num_machines=1",
    "--mixed_precision=no",
    "--dynamo_backend=no",
]


def launch_two(port: int) -> dict:
    """``run_train`` keywords for two CPU processes under accelerate's launcher (gloo on ``port``)."""
    return {
        "launcher": [*TWO_PROCESSES, f"--main_process_port={port}"],
        "env": {"ACCELERATE_USE_CPU": "true"},
    }


def make_images(
    folder: Path, count: int, size: tuple[int, int] = (64, 64), caption: str | None = None
) -> None:
    """``count`` random pictures with some structure, each with a caption file when ``caption`` is given."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(str(folder)) + count)
    for i in range(count):
        pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
        pixels[: size[1] // 2] = [200, 40 * i % 255, 90]  # some structure
        Image.fromarray(pixels).save(folder / f"img{i}.png")
        if caption is not None:
            (folder / f"img{i}.txt").write_text(caption.format(i=i))


def picture_folder(count: int, repeats: int = 1):
    """A module fixture: a kohya DreamBooth folder ``<repeats>_mychar4 toy`` of ``count`` captioned
    pictures (one copy per test module, so a latent cache written into it stays in the module)."""

    @pytest.fixture(scope="module")
    def folder(tmp_path_factory) -> Path:
        root = tmp_path_factory.mktemp("data")
        make_images(root / f"{repeats}_mychar4 toy", count, caption=CAPTION)
        return root

    return folder


def common(data: Path, out: Path, model: Path, *extra: str) -> list[str]:
    """The options every tiny-model run shares."""
    return [
        f"--pretrained_model_name_or_path={model}",
        f"--train_data_dir={data}",
        f"--output_dir={out}",
        "--resolution=64,64",
        "--caption_extension=.txt",
        "--max_data_loader_n_workers=0",
        "--seed=42",
        *extra,
    ]


def error_line(result: subprocess.CompletedProcess) -> str:
    """The one ``error: ...`` line of a refused run (exit 2, no traceback)."""
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    return lines[0]
