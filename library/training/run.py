"""One training run: what the loop's collaborators share, in one object instead of positional wiring.

The trainer builds a ``Run`` once the model, the new word, the data and the optimizer exist;
saving, the events after each step, sample images and validation read what they need from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from library.embeddings.formats import MODELSPEC_DIFFUSERS, MODELSPEC_IMPLEMENTATION, sai_model_spec_metadata
from library.training.accelerator import Precision
from library.training.cadence import RunLength
from library.training.new_word import NewWord
from library.training.state import Progress

if TYPE_CHECKING:
    from library.models.loading import SDModel
    from library.text.conditioning import TextConditioner
    from library.training.args import RunSettings
    from library.training.dataset.dataset import TrainDataset
    from library.training.pivotal import UNetLoRA


@dataclass(frozen=True)
class LoopSettings:
    """How long the run is and its seed (fields named like the options)."""

    max_train_steps: int = 1600
    max_train_epochs: int | None = None
    gradient_accumulation_steps: int = 1
    seed: int | None = None
    clip_skip: int | None = None


@dataclass
class Run:
    """A training run: its settings, the frozen model, the trained word and the loop's state."""

    settings: RunSettings
    accelerator: Any
    precision: Precision
    model: SDModel
    text: TextConditioner  # captions -> conditioning, through the new word's vectors
    word: NewWord
    dataset: TrainDataset
    length: RunLength
    optimizer: Any
    lr_scheduler: Any
    progress: Progress  # where the run is; its seed (a resumed run keeps its own)
    lora: UNetLoRA | None = None  # the UNet LoRA trained beside the word (--network_module)
    start_vectors: dict[str, torch.Tensor] = field(init=False)  # the word's rows as this process began
    start_norms: dict[str, torch.Tensor] = field(
        init=False
    )  # what --preserve_embedding_norm holds them to (library/training/steering.py)

    def __post_init__(self) -> None:
        self.start_vectors = self.word.snapshot()
        self.start_norms = self._norms_before_step_one()

    @property
    def seed(self) -> int:
        return self.progress.seed

    def _norms_before_step_one(self) -> dict[str, torch.Tensor]:
        """Each vector's norm before the run's first step (kept in its state, so a resumed run holds
        the same norms as the uninterrupted one)."""
        recorded = self.progress.start_norms
        if recorded:
            device = next(iter(self.start_vectors.values())).device
            return {key: torch.tensor(recorded[key], device=device) for key in self.start_vectors}
        return {key: vectors.norm(dim=1) for key, vectors in self.start_vectors.items()}

    @property
    def output_name(self) -> str:
        return self.settings.saving.name(self.settings.word.token_string)

    @property
    def output_dir(self) -> Path:
        return self.settings.saving.folder

    @property
    def finished_steps(self) -> bool:
        return self.progress.global_step >= self.length.max_train_steps

    def describe(self) -> str:
        """One line for the log: how many vectors of which width, how long, where, in what precision."""
        widths = " + ".join(str(v.shape[1]) for v in self.word.vectors.values())
        length = self.length
        return (
            f"{self.word.num_vectors} vectors of dimension {widths} for {length.max_train_steps} steps "
            f"({length.num_epochs} epochs, {length.steps_per_epoch} steps each) on {self.accelerator.device} "
            f"x{self.accelerator.num_processes} process(es), {self.precision.mixed_precision}"
            + (f", with a {self.lora.describe()}" if self.lora else "")
        )

    def embedding_metadata(self, adapter: str = "textual-inversion") -> dict[str, str]:
        """SAI model-spec metadata for ``.safetensors`` (kohya's keys), from the run and --metadata_*;
        ``adapter="lora"`` for the LoRA file of a pivotal-tuning run."""
        settings = self.settings
        noise = settings.noise
        timesteps = (noise.min_timestep, noise.max_timestep) if noise.timestep_range_given else None
        extra = settings.metadata.given()
        family = self.model.family
        lora_by_diffusers = adapter == "lora" and family.name != "sdxl"  # kohya's implementation values
        return sai_model_spec_metadata(
            architecture=family.architecture(settings.model.v_parameterization, adapter),
            v_parameterization=settings.model.v_parameterization,
            resolution=self.dataset.resolution,
            title=extra.get("title") or self.output_name,
            clip_skip=settings.loop.clip_skip,
            extra=extra,
            timesteps=timesteps,
            implementation=MODELSPEC_DIFFUSERS if lora_by_diffusers else MODELSPEC_IMPLEMENTATION,
        )
