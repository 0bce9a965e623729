"""What a run saves: embedding files with kohya's names, and resumable training states.

A state folder holds the vectors (and a pivotal-tuning run's LoRA), the optimizer and
LR-scheduler states and the counters (global step, epoch, batches done in that epoch). Nothing
else is needed for an exact resume: every random draw of the run (data order, augmentation,
noise, timesteps) is derived from the seed and the step or epoch, not from a running RNG.
Everything is read back with ``weights_only=True``, so a state folder cannot run code either.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import secrets
import shutil
import warnings
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file

from library.embeddings.formats import refusal_detail, save_embedding
from library.errors import UserError
from library.files import ensure_writable_folder, remove_interrupted_saves, write_folder_atomically
from library.networks.lora import load_kohya_state_dict, lora_file_tensors, save_lora_file
from library.training.cadence import SaveCadence
from library.training.optimizers import (
    OptimizerSettings,
    optimizer_eval_mode,
    optimizer_label,
    optimizer_train_mode,
)
from library.training.pivotal import LoRASession

if TYPE_CHECKING:
    from library.training.run import Run

logger = logging.getLogger(__name__)

STATE_FORMAT = 1
LORA_STATE = "lora.safetensors"  # a pivotal-tuning run's LoRA in a state folder
Vectors = Mapping[str, torch.Tensor]  # each text encoder's rows of the new word (``NewWord.vectors``)


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
    # what the state was made with, so that a resume can refuse what it cannot serve (older states
    # lack them); and the vectors' norms before step 1, which --preserve_embedding_norm keeps
    optimizer_type: str | None = None
    lr_scheduler: str | None = None
    learning_rate: float | None = None
    start_norms: dict[str, list[float]] = field(default_factory=dict)


SAVE_DTYPES = {None: torch.float32, "float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class SaveSettings:
    """Where and when a run saves, and what it resumes from (fields named like kohya's options)."""

    output_dir: str | None = None
    output_name: str | None = None
    save_model_as: str | None = "pt"
    save_precision: str | None = None
    save_every_n_epochs: int | None = None
    save_every_n_steps: int | None = None
    save_n_epoch_ratio: int | None = None
    save_last_n_epochs: int | None = None
    save_last_n_epochs_state: int | None = None
    save_last_n_steps: int | None = None
    save_last_n_steps_state: int | None = None
    save_state: bool = False
    save_state_on_train_end: bool = False
    resume: str | None = None

    @property
    def folder(self) -> Path:
        """``--output_dir`` (``debug_dataset`` for a ``--debug_dataset`` run without one)."""
        return Path(self.output_dir or "debug_dataset")

    def name(self, token_string: str) -> str:
        """kohya: files are named after the word unless ``--output_name`` says otherwise."""
        return self.output_name or token_string

    @property
    def extension(self) -> str:
        return self.save_model_as or "pt"

    @property
    def dtype(self) -> torch.dtype:
        return SAVE_DTYPES[self.save_precision]

    def cadence(self, num_epochs: int) -> SaveCadence:
        """kohya's save rules for a run of ``num_epochs``; ``--save_n_epoch_ratio`` means about that many
        epoch saves in the whole run."""
        every_n_epochs = self.save_every_n_epochs
        if self.save_n_epoch_ratio:
            every_n_epochs = max(1, num_epochs // self.save_n_epoch_ratio)
        return SaveCadence(
            self.save_every_n_steps,
            every_n_epochs,
            self.save_last_n_steps,
            self.save_last_n_epochs,
            self.save_last_n_steps_state,
            self.save_last_n_epochs_state,
            num_epochs,
        )


METADATA_OPTIONS = (
    "title",
    "author",
    "description",
    "license",
    "tags",
    "trigger_phrase",
    "usage_hint",
    "merged_from",
    "preprocessor",
    "thumbnail",
    "is_negative_embedding",
)


@dataclass(frozen=True)
class MetadataSettings:
    """kohya's ``--metadata_*``: written into ``.safetensors`` files as ``modelspec.*``."""

    metadata_title: str | None = None
    metadata_author: str | None = None
    metadata_description: str | None = None
    metadata_license: str | None = None
    metadata_tags: str | None = None
    metadata_trigger_phrase: str | None = None
    metadata_usage_hint: str | None = None
    metadata_merged_from: str | None = None
    metadata_preprocessor: str | None = None
    metadata_thumbnail: str | None = None
    metadata_is_negative_embedding: str | None = None

    def given(self) -> dict[str, str]:
        """The options that were given, by their ``modelspec`` name (``author``, ``title``...)."""
        values = {name: getattr(self, f"metadata_{name}") for name in METADATA_OPTIONS}
        return {name: value for name, value in values.items() if value}


def prepare_output_folders(saving: SaveSettings, tracking, main_process: bool) -> None:
    """Writable output and log folders before anything loads; leftovers of a killed save removed."""
    ensure_writable_folder(saving.folder, "--output_dir" if saving.output_dir else "--debug_dataset")
    if tracking.logging_dir:
        ensure_writable_folder(Path(tracking.logging_dir), "--logging_dir")
    if main_process:
        remove_interrupted_saves(saving.folder)


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


class RunSaver:
    """Writes a run's embeddings and states under kohya's names, removing older ones by its rules.

    Only the main process writes; every process waits for a state to be complete before going on.
    ``metadata`` makes the ``.safetensors`` metadata at each save (its date changes).
    """

    def __init__(self, run: Run, metadata: Callable[[], dict[str, str]]):
        self.run = run
        self.settings = run.settings.saving
        self.folder = self.settings.folder
        self.name = run.output_name
        self.extension = self.settings.extension
        self.cadence = self.settings.cadence(run.length.num_epochs)
        self.metadata = metadata
        self.lora_session = LoRASession.now() if run.lora is not None else None

    @property
    def lora_name(self) -> str:
        """A pivotal-tuning run's LoRA files are named like its embeddings, as ``name_lora``."""
        return f"{self.name}_lora"

    def embedding(
        self,
        file_name: str,
        vectors: Vectors | None = None,
        step: int | None = None,
        extra_metadata: dict[str, str] | None = None,
        announce: bool = True,
    ) -> Path:
        """One embedding file: the run's vectors now, or ``vectors``."""
        run = self.run
        path = self.folder / file_name
        if run.accelerator.is_main_process:
            vectors = run.word.vectors if vectors is None else vectors
            save_embedding(
                path,
                {key: value.detach().float().cpu() for key, value in vectors.items()},
                self.name,
                step=run.progress.global_step if step is None else step,
                checkpoint_name=run.model.name,
                metadata={**self.metadata(), **(extra_metadata or {})},
                dtype=self.settings.dtype,
                extension="." + self.extension,
            )
            if announce:
                logger.info("saved %s", path)
        return path

    def lora(
        self, file_name: str, announce: bool = True, vectors: Vectors | None = None, step: int | None = None
    ) -> Path | None:
        """With ``--network_module``: the LoRA file (always ``.safetensors``: kohya's metadata has no
        place elsewhere), the word's rows (now, or ``vectors``) bundled under the embedding's name
        (the WebUI's rule)."""
        run, path = self.run, self.folder / file_name
        if run.lora is None:
            return None
        if run.accelerator.is_main_process:
            vectors = run.word.vectors if vectors is None else vectors
            rows = {key: value.detach().float().cpu() for key, value in vectors.items()}
            tensors = lora_file_tensors(run.lora.network, {self.name: rows}, self.settings.dtype)
            save_lora_file(path, tensors, run.lora.metadata(run, self.lora_session, step))
            if announce:
                logger.info("saved %s", path)
        return path

    def state(self, folder_name: str) -> None:
        run = self.run
        if run.accelerator.is_main_process:
            optimizer_eval_mode(run.optimizer)
            save_training_state(
                self.folder / folder_name,
                run.word.vectors,
                run.optimizer,
                run.lr_scheduler,
                run.progress,
                lora=run.lora.network if run.lora else None,
            )
            optimizer_train_mode(run.optimizer)
        run.accelerator.wait_for_everyone()

    def intermediate(self, *, step: int | None = None, epoch: int | None = None) -> None:
        """A numbered embedding (LoRA, state) during the run; an older one goes per --save_last_n_*."""
        self.embedding(embedding_file_name(self.name, self.extension, step=step, epoch=epoch))
        self.lora(embedding_file_name(self.lora_name, "safetensors", step=step, epoch=epoch))
        with_state = self.settings.save_state
        if with_state:
            self.state(state_folder_name(self.name, step=step, epoch=epoch))
        for state in (False, True) if with_state else (False,):
            old = self.cadence.older_save(state=state, step=step, epoch=epoch)
            if old and self.run.accelerator.is_main_process:
                name = (
                    state_folder_name(self.name, **old)
                    if state
                    else embedding_file_name(self.name, self.extension, **old)
                )
                remove_save(self.folder / name)
                if not state and self.run.lora is not None:
                    remove_save(self.folder / embedding_file_name(self.lora_name, "safetensors", **old))

    @property
    def final_path(self) -> Path:
        return self.folder / embedding_file_name(self.name, self.extension)

    @property
    def final_lora_path(self) -> Path | None:
        return self.folder / f"{self.lora_name}.safetensors" if self.run.lora is not None else None

    def warn_if_final_exists(self) -> None:
        """A second run into the same folder: say so at the start, not after the old file is gone."""
        for final in (self.final_path, self.final_lora_path):
            if self.run.accelerator.is_main_process and final is not None and final.exists():
                logger.warning(
                    "%s exists from an earlier run; this run's result replaces it, and the old file is kept as "
                    "%s.bak",
                    final,
                    final.name,
                )

    def final(self) -> None:
        """``name.ext`` (a pivotal-tuning run: ``name_lora.safetensors`` too) and, with
        ``--save_state``/``--save_state_on_train_end``, ``name-state``."""
        self._replacing_earlier(
            self.final_path, lambda name, announce: self.embedding(name, announce=announce)
        )
        if self.final_lora_path is not None:
            self._replacing_earlier(self.final_lora_path, self.lora)
        if self.settings.save_state or self.settings.save_state_on_train_end:
            self.state(state_folder_name(self.name))

    def _replacing_earlier(self, final: Path, write: Callable[[str, bool], Any]) -> None:
        """Write ``final`` with ``write(file name, announce)``; an earlier run's file is kept as
        ``final.bak`` (an extension no client loads), so re-running a command never destroys a good
        file; kohya replaces it silently. The new file is written first and only then put in place:
        when it cannot be written (a full disk), the earlier file stays where it was and the error
        says so."""
        if not (self.run.accelerator.is_main_process and final.exists()):
            write(final.name, True)
            return
        staged = final.with_name(f".{final.name}.p{os.getpid()}.{secrets.token_hex(4)}.tmp")
        try:
            write(staged.name, False)
        except UserError as exc:
            raise UserError(f"{exc}; the earlier run's {final.name} is untouched") from None
        os.replace(final, final.with_name(final.name + ".bak"))
        os.replace(staged, final)
        logger.info("saved %s (the earlier one is now %s.bak)", final, final.name)


# ---------------------------------------------------------------------------------------------
# state folders


def save_training_state(
    folder: Path, vectors: Vectors, optimizer, lr_scheduler, progress: Progress, lora=None
) -> None:
    """Write a state folder atomically (``library.files.write_folder_atomically``); ``lora``: the
    run's ``LoRANetwork``, kept in fp32 as ``lora.safetensors``."""

    def write(into: Path) -> None:
        rows = {
            _state_key(key, vectors): value.detach().float().cpu().contiguous()
            for key, value in vectors.items()
        }
        save_file(rows, str(into / "vectors.safetensors"))
        if lora is not None:
            save_file(lora.kohya_state_dict(), str(into / LORA_STATE))
        torch.save(optimizer.state_dict(), into / "optimizer.pt")
        torch.save(lr_scheduler.state_dict(), into / "lr_scheduler.pt")
        (into / "progress.json").write_text(
            json.dumps({"format": STATE_FORMAT, **asdict(progress)}, indent=1)
        )

    write_folder_atomically(folder, write)
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
        raise _damaged(
            folder,
            name,
            f"was refused by the safe loader ({refusal_detail(str(exc))}): it is "
            "damaged or was not written by this trainer",
        ) from None
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


def check_resume(folder: Path, optimizer: OptimizerSettings, with_lora: bool = False) -> None:
    """Before the model loads: refuse a state the options cannot continue (another optimizer or LR
    schedule would read the state wrongly or silently; a LoRA saved or asked for, not both), and say
    which options the state overrides."""
    info = _read_progress(Path(folder))
    _check_lora_presence(Path(folder), with_lora)
    for option, recorded, wanted in (
        ("optimizer_type", info.get("optimizer_type"), optimizer_label(optimizer)),
        ("lr_scheduler", info.get("lr_scheduler"), optimizer.lr_scheduler),
    ):
        if recorded is not None and recorded != wanted:
            raise UserError(
                f"--resume {folder}: the state was saved with --{option} {recorded}, this run asks for {wanted}; "
                f"resume with --{option} {recorded} (a state cannot change its {option.replace('_', ' ')})"
            )
    saved_lr = info.get("learning_rate")
    if saved_lr is not None and saved_lr != optimizer.learning_rate:
        logger.warning(
            "--resume: the state's learning rate %g continues; --learning_rate %g is not used (start a new run "
            "from the saved embedding with --weights to change it)",
            saved_lr,
            optimizer.learning_rate,
        )


def _state_key(key: str, vectors: Vectors) -> str:
    """A state's name for an encoder's rows: ``vectors`` for a family with one text encoder (the
    first format of state folders), else the encoder's embedding-file key (``clip_l``, ``clip_g``)."""
    return "vectors" if len(vectors) == 1 else key


def resume_or_start(settings, word, optimizer, lr_scheduler, seed: int, length, lora=None) -> Progress:
    """A new run's progress (recording what the state needs to resume it), or with ``--resume`` the
    state folder's restored into the live objects. ``settings`` are the run's ``RunSettings``;
    ``lora`` the run's ``LoRANetwork`` (``--network_module``)."""
    resume = settings.saving.resume
    if not resume:
        return Progress(
            seed=seed,
            optimizer_type=optimizer_label(settings.optimizer),
            lr_scheduler=settings.optimizer.lr_scheduler,
            learning_rate=settings.optimizer.learning_rate,
            start_norms={key: norms.tolist() for key, norms in word.norms().items()},
        )
    progress = load_training_state(resume, word.vectors, optimizer, lr_scheduler, lora)
    logger.info("resumed from %s at step %d (epoch %d)", resume, progress.global_step, progress.epoch + 1)
    if progress.global_step >= length.max_train_steps:
        logger.warning(
            "the resumed state is at step %d and --max_train_steps is %d: no step is left, the embedding is "
            "saved as it is; raise --max_train_steps (or --max_train_epochs) to train on",
            progress.global_step,
            length.max_train_steps,
        )
    return progress


def load_training_state(folder: Path, vectors: Vectors, optimizer, lr_scheduler, lora=None) -> Progress:
    """Restore a state folder written by ``save_training_state`` into the live objects."""
    folder = Path(folder)
    info = _read_progress(folder)
    _restore_lora(folder, lora)
    saved = _read_state_file(folder, "vectors.safetensors", lambda p: load_file(str(p)))
    expected = {_state_key(key, vectors): value for key, value in vectors.items()}
    if set(saved) != set(expected):
        raise UserError(
            f"--resume {folder}: the state holds the rows of {sorted(saved)}, this model's text encoders are "
            f"{sorted(expected)}; resume with the model (family) that saved it"
        )
    for key, value in expected.items():
        if saved[key].shape != value.shape:
            raise UserError(
                f"--resume {folder}: the state has {saved[key].shape[0]} vectors of dimension {saved[key].shape[1]}, "
                f"this run {value.shape[0]} of dimension {value.shape[1]}; use the same --num_vectors_per_token "
                "and model"
            )
    optimizer_state = _read_state_file(folder, "optimizer.pt", _load_weights)
    scheduler_state = _read_state_file(folder, "lr_scheduler.pt", _load_weights)
    with torch.no_grad():
        for key, value in expected.items():
            value.copy_(saved[key])
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


def _check_lora_presence(folder: Path, with_lora: bool) -> None:
    """A pivotal-tuning state resumes only with its LoRA, and a plain one only without."""
    if (folder / LORA_STATE).is_file() and not with_lora:
        raise UserError(
            f"--resume {folder}: the state was saved with a LoRA; resume with the same --network_module options"
        )
    if with_lora and not (folder / LORA_STATE).is_file():
        raise UserError(
            f"--resume {folder}: the state was saved without a LoRA; resume without --network_module "
            "(or start a new run with --weights to add one)"
        )


def _restore_lora(folder: Path, lora) -> None:
    _check_lora_presence(folder, lora is not None)
    if lora is None:
        return
    tensors = _read_state_file(folder, LORA_STATE, lambda p: load_file(str(p)))
    try:
        load_kohya_state_dict(lora, tensors)
    except ValueError as exc:
        raise UserError(
            f"--resume {folder}: its LoRA does not fit this run's ({exc}); resume with the same --network_dim "
            "and --network_alpha"
        ) from None
