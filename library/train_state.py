"""What a run saves: embedding files with kohya's names, and resumable training states.

A state folder holds the vectors, the optimizer and LR-scheduler states and the counters
(global step, epoch, batches done in that epoch). Nothing else is needed for an exact resume:
every random draw of the run (data order, augmentation, noise, timesteps) is derived from the
seed and the step or epoch, not from a running RNG. Everything is read back with
``weights_only=True``, so a state folder cannot run code either.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from library.cadence import SaveCadence
from library.embeddings import save_embedding
from library.errors import UserError
from library.optimizers import optimizer_eval_mode, optimizer_train_mode

logger = logging.getLogger(__name__)

STATE_FORMAT = 1


@dataclass
class Progress:
    """Where the run is: optimizer steps done, the current epoch, and batches of it already used.

    ``seed`` is kept so that a resumed run repeats the random draws the interrupted one would have
    made (every draw derives from the seed and the step).
    """

    seed: int = 0
    global_step: int = 0
    epoch: int = 0
    batches_done_in_epoch: int = 0


# ---------------------------------------------------------------------------------------------
# file names (kohya's)


def embedding_file_name(
    output_name: str, ext: str, *, epoch: int | None = None, step: int | None = None
) -> str:
    """``name.ext`` (final), ``name-000003.ext`` (epoch 3) or ``name-step00000100.ext`` (step 100)."""
    if epoch is not None:
        return f"{output_name}-{epoch:06d}.{ext}"
    if step is not None:
        return f"{output_name}-step{step:08d}.{ext}"
    return f"{output_name}.{ext}"


def state_folder_name(output_name: str, *, epoch: int | None = None, step: int | None = None) -> str:
    """kohya's state folder names: ``name-000003-state``, ``name-step00000100-state``, ``name-state``."""
    return embedding_file_name(output_name, "x", epoch=epoch, step=step)[: -len(".x")] + "-state"


def remove_save(path: Path) -> None:
    """Remove an older save (an embedding file or a state folder), if it is there."""
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
    else:
        return
    logger.info("removed old save %s", path.name)


# ---------------------------------------------------------------------------------------------
# saving during and after a run


@dataclass
class RunSaver:
    """Writes a run's embeddings and states under kohya's names, removing older ones by its rules.

    Only the main process writes; every process waits for a state to be complete before going on.
    """

    accelerator: Any
    folder: Path
    name: str  # --output_name (default: the token string)
    extension: str  # pt, ckpt or safetensors
    cadence: SaveCadence
    with_state: bool  # --save_state
    vectors: torch.nn.Parameter
    optimizer: Any
    lr_scheduler: Any
    progress: Progress
    metadata: Callable[[], dict[str, str]]  # the .safetensors metadata, made at each save (its date)
    dtype: torch.dtype  # --save_precision
    checkpoint_name: str

    def embedding(self, file_name: str, vectors: torch.Tensor | None = None, step: int | None = None) -> Path:
        path = self.folder / file_name
        if self.accelerator.is_main_process:
            vectors = self.vectors if vectors is None else vectors
            save_embedding(path, vectors.detach().float().cpu(), self.name,
                           step=self.progress.global_step if step is None else step,
                           checkpoint_name=self.checkpoint_name, metadata=self.metadata(), dtype=self.dtype)  # fmt: skip
            logger.info("saved %s", path)
        return path

    def state(self, folder_name: str) -> None:
        if self.accelerator.is_main_process:
            optimizer_eval_mode(self.optimizer)
            save_training_state(self.folder / folder_name, self.vectors, self.optimizer, self.lr_scheduler,
                                self.progress)  # fmt: skip
            optimizer_train_mode(self.optimizer)
        self.accelerator.wait_for_everyone()

    def intermediate(self, *, step: int | None = None, epoch: int | None = None) -> None:
        """A numbered embedding (and state) during the run; an older one goes per --save_last_n_*."""
        self.embedding(embedding_file_name(self.name, self.extension, step=step, epoch=epoch))
        if self.with_state:
            self.state(state_folder_name(self.name, step=step, epoch=epoch))
        for state in (False, True) if self.with_state else (False,):
            old = self.cadence.older_save(state=state, step=step, epoch=epoch)
            if old and self.accelerator.is_main_process:
                name = state_folder_name(self.name, **old) if state else embedding_file_name(
                    self.name, self.extension, **old)  # fmt: skip
                remove_save(self.folder / name)

    def final(self, with_state: bool) -> None:
        """``name.ext`` and, with ``--save_state``/``--save_state_on_train_end``, ``name-state``."""
        self.embedding(embedding_file_name(self.name, self.extension))
        if with_state:
            self.state(state_folder_name(self.name))


# ---------------------------------------------------------------------------------------------
# state folders


def save_training_state(
    folder: Path, vectors: torch.Tensor, optimizer, lr_scheduler, progress: Progress
) -> None:
    """Write a state folder atomically (a temporary folder renamed into place)."""
    folder = Path(folder)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        save_file({"vectors": vectors.detach().float().cpu().contiguous()}, str(tmp / "vectors.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(lr_scheduler.state_dict(), tmp / "lr_scheduler.pt")
        (tmp / "progress.json").write_text(json.dumps({"format": STATE_FORMAT, **asdict(progress)}, indent=1))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("saved training state to %s", folder)


def _read_progress(folder: Path) -> dict:
    progress_file = folder / "progress.json"
    if not progress_file.is_file():
        raise UserError(f"--resume {folder}: not a state folder of this trainer (no progress.json)")
    info = json.loads(progress_file.read_text())
    if info.get("format") != STATE_FORMAT:
        raise UserError(f"--resume {folder}: state format {info.get('format')} is not {STATE_FORMAT}")
    return info


def saved_seed(folder: Path) -> int:
    """The seed of the run that wrote a state folder (read before the data is set up)."""
    return int(_read_progress(Path(folder))["seed"])


def load_training_state(folder: Path, vectors: torch.nn.Parameter, optimizer, lr_scheduler) -> Progress:
    """Restore a state folder written by ``save_training_state`` into the live objects."""
    folder = Path(folder)
    info = _read_progress(folder)
    saved = load_file(str(folder / "vectors.safetensors"))["vectors"]
    if saved.shape != vectors.shape:
        raise UserError(
            f"--resume {folder}: the state has {saved.shape[0]} vectors of dimension {saved.shape[1]}, this run "
            f"{vectors.shape[0]} of dimension {vectors.shape[1]}; use the same --num_vectors_per_token and model"
        )
    with torch.no_grad():
        vectors.copy_(saved)
    try:
        optimizer.load_state_dict(torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True))
        lr_scheduler.load_state_dict(
            torch.load(folder / "lr_scheduler.pt", map_location="cpu", weights_only=True)
        )
    except (ValueError, KeyError, RuntimeError) as exc:
        raise UserError(
            f"--resume {folder}: the optimizer state does not fit this run's optimizer ({exc})"
        ) from exc
    info.pop("format")
    return Progress(**info)
