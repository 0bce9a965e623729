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
import pickle
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from library.embeddings.formats import refusal_detail, save_embedding
from library.errors import UserError
from library.training.cadence import SaveCadence
from library.training.optimizers import optimizer_eval_mode, optimizer_train_mode

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
    validation_history: list[float] = field(default_factory=list)  # every validation loss so far
    best_loss: float | None = None  # the lowest of them, reached at best_step
    best_step: int = 0


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

    def embedding(
        self, file_name: str, vectors: torch.Tensor | None = None, step: int | None = None,
        extra_metadata: dict[str, str] | None = None,
    ) -> Path:  # fmt: skip
        path = self.folder / file_name
        if self.accelerator.is_main_process:
            vectors = self.vectors if vectors is None else vectors
            save_embedding(path, vectors.detach().float().cpu(), self.name,
                           step=self.progress.global_step if step is None else step,
                           checkpoint_name=self.checkpoint_name, metadata={**self.metadata(), **(extra_metadata or {})},
                           dtype=self.dtype)  # fmt: skip
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

    @property
    def final_path(self) -> Path:
        return self.folder / embedding_file_name(self.name, self.extension)

    def warn_if_final_exists(self) -> None:
        """A second run into the same folder: say so at the start, not after the old file is gone."""
        if self.accelerator.is_main_process and self.final_path.exists():
            logger.warning(
                "%s exists from an earlier run; this run's result replaces it, and the old file is kept as %s.bak",
                self.final_path, self.final_path.name,
            )  # fmt: skip

    def final(self, with_state: bool) -> None:
        """``name.ext`` and, with ``--save_state``/``--save_state_on_train_end``, ``name-state``.

        An earlier run's ``name.ext`` is kept as ``name.ext.bak`` (an extension no client loads), so
        re-running a command never destroys a good embedding; kohya replaces it silently.
        """
        if self.accelerator.is_main_process and self.final_path.exists():
            os.replace(self.final_path, self.final_path.with_name(self.final_path.name + ".bak"))
        self.embedding(self.final_path.name)
        if with_state:
            self.state(state_folder_name(self.name))


# ---------------------------------------------------------------------------------------------
# state folders


def save_training_state(
    folder: Path, vectors: torch.Tensor, optimizer, lr_scheduler, progress: Progress
) -> None:
    """Write a state folder atomically (a temporary folder renamed into place)."""
    folder = Path(folder)
    tmp = Path(
        tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent)
    )  # files.remove_interrupted_saves
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


def _damaged(folder: Path, name: str, problem: str) -> UserError:
    return UserError(
        f"--resume {folder}: {folder / name} {problem}; resume from another state folder (or an "
        "earlier save), or start again without --resume"
    )


def _read_state_file(folder: Path, name: str, read: Callable[[Path], Any]) -> Any:
    """Read one file of a state folder; a missing, cut or foreign file ends in one line naming it."""
    path = folder / name
    if not path.is_file():
        raise _damaged(folder, name, "is missing")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return read(path)
    except pickle.UnpicklingError as exc:
        code = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if code:
            raise _damaged(
                folder, name, f"contains pickled code ({code.group(1)}) and was not loaded"
            ) from None
        raise _damaged(folder, name, f"was refused by the safe loader ({refusal_detail(str(exc))}): it is "
                       "damaged or was not written by this trainer") from None  # fmt: skip
    except Exception as exc:  # cut files: EOFError, SafetensorError, JSONDecodeError, zip and torch errors
        raise _damaged(folder, name, f"is damaged ({type(exc).__name__}: {_first_line(exc)})") from None


def _load_weights(path: Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=True)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:160]


def _read_progress(folder: Path) -> dict:
    if not (folder / "progress.json").is_file():
        raise UserError(f"--resume {folder}: not a state folder of this trainer (no progress.json)")
    info = _read_state_file(folder, "progress.json", lambda p: json.loads(p.read_text()))
    if not isinstance(info, dict):
        raise _damaged(folder, "progress.json", "is not a progress record")
    if info.get("format") != STATE_FORMAT:
        raise UserError(f"--resume {folder}: state format {info.get('format')} is not {STATE_FORMAT}")
    counters = {"seed", "global_step", "epoch", "batches_done_in_epoch"}
    if not counters <= set(info) or not all(isinstance(info[f], int) for f in counters):
        raise _damaged(folder, "progress.json", f"does not hold the counters {sorted(counters)}")
    unknown = set(info) - {"format"} - set(Progress.__dataclass_fields__)
    if unknown:
        raise _damaged(
            folder, "progress.json", f"holds entries this trainer does not know ({sorted(unknown)})"
        )
    return info


def saved_seed(folder: Path) -> int:
    """The seed of the run that wrote a state folder (read before the data is set up)."""
    return int(_read_progress(Path(folder))["seed"])


def load_training_state(folder: Path, vectors: torch.nn.Parameter, optimizer, lr_scheduler) -> Progress:
    """Restore a state folder written by ``save_training_state`` into the live objects."""
    folder = Path(folder)
    info = _read_progress(folder)
    saved = _read_state_file(folder, "vectors.safetensors", lambda p: load_file(str(p))["vectors"])
    if saved.shape != vectors.shape:
        raise UserError(
            f"--resume {folder}: the state has {saved.shape[0]} vectors of dimension {saved.shape[1]}, this run "
            f"{vectors.shape[0]} of dimension {vectors.shape[1]}; use the same --num_vectors_per_token and model"
        )
    optimizer_state = _read_state_file(folder, "optimizer.pt", _load_weights)
    scheduler_state = _read_state_file(folder, "lr_scheduler.pt", _load_weights)
    with torch.no_grad():
        vectors.copy_(saved)
    try:
        optimizer.load_state_dict(optimizer_state)
        lr_scheduler.load_state_dict(scheduler_state)
    except (ValueError, KeyError, RuntimeError, TypeError) as exc:
        raise UserError(
            f"--resume {folder}: the optimizer state does not fit this run's optimizer ({_first_line(exc)}); "
            "use the same --optimizer_type and --lr_scheduler as the run that saved it"
        ) from None
    info.pop("format")
    return Progress(**info)
