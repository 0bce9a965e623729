"""One training run: what the loop's collaborators share, in one object instead of positional wiring.

The trainer builds a ``Run`` once the model, the new word, the data and the optimizer exist;
saving, the events after each step, sample images and validation read what they need from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from library.embeddings.formats import sai_model_spec_metadata
from library.training.accelerator import Precision
from library.training.cadence import RunLength
from library.training.new_word import NewWord
from library.training.state import Progress

if TYPE_CHECKING:
    from library.models.loading import SDModel
    from library.text.conditioning import TextConditioner
    from library.training.args import RunSettings
    from library.training.dataset.dataset import TrainDataset


@dataclass(frozen=True)
class LoopSettings:
    """How long the run is, its seed, and what happens to the vectors between steps (fields named
    like the options)."""

    max_train_steps: int = 1600
    max_train_epochs: int | None = None
    gradient_accumulation_steps: int = 1
    seed: int | None = None
    clip_skip: int | None = None
    preserve_embedding_norm: bool = False


@dataclass
class Run:
    """A training run: its settings, the frozen model, the trained word and the loop's state."""

    settings: RunSettings
    accelerator: Any
    precision: Precision
    seed: int
    model: SDModel
    text: TextConditioner  # captions -> conditioning, through the new word's vectors
    word: NewWord
    dataset: TrainDataset
    length: RunLength
    optimizer: Any
    lr_scheduler: Any
    progress: Progress
    start_vectors: dict[str, torch.Tensor]  # the word's rows before step 1 (norm preservation, checks)

    @property
    def output_name(self) -> str:
        return self.settings.saving.name(self.settings.word.token_string)

    @property
    def output_dir(self) -> Path:
        return self.settings.saving.folder

    @property
    def finished_steps(self) -> bool:
        return self.progress.global_step >= self.length.max_train_steps

    def embedding_metadata(self) -> dict[str, str]:
        """SAI model-spec metadata for ``.safetensors`` (kohya's keys), from the run and --metadata_*."""
        settings = self.settings
        noise = settings.noise
        timesteps = (noise.min_timestep, noise.max_timestep) if noise.timestep_range_given else None
        extra = settings.metadata.given()
        return sai_model_spec_metadata(
            architecture=self.model.family.architecture(settings.model.v_parameterization),
            v_parameterization=settings.model.v_parameterization,
            resolution=self.dataset.resolution,
            title=extra.get("title") or self.output_name,
            clip_skip=settings.loop.clip_skip,
            extra=extra,
            timesteps=timesteps,
        )
