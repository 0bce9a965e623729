"""What happens to the new word's vectors around each optimizer step, besides the step itself.

A Textual Inversion vector that grows far beyond an ordinary token's norm drowns the rest of the
prompt: ``a red myshape`` draws the training pictures' colour. Three opt-in controls (not kohya
options) act on that:

* ``--preserve_embedding_norm``: after each step, each vector is scaled back to its starting norm;
* ``--direction_only`` (DTI, arXiv 2512.13672): each vector is a fixed norm times a direction; the
  gradient is projected onto the sphere before the optimizer sees it and the vector is put back on
  the sphere after the step, so only the direction learns. The norm is the vocabulary's mean
  token norm (``--direction_norm vocabulary``, the paper's choice) or the start's (``init``);
* ``--init_pull W``: the gradient of ``W * mean ||v - v0||^2`` is added, pulling the vectors
  toward where they started (with ``--cross_init``, the init word's output: CrossInit's
  regulariser).

Every control leaves an ordinary embedding file: only the vectors' values differ.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DIRECTION_NORMS = ("vocabulary", "init")


@dataclass(frozen=True)
class SteeringSettings:
    """The controls, named like the options."""

    preserve_embedding_norm: bool = False
    direction_only: bool = False
    direction_norm: str | None = None  # None: vocabulary
    init_pull: float = 0.0

    @property
    def holds_norms(self) -> bool:
        return self.preserve_embedding_norm or self.direction_only


class VectorSteering:
    """The controls of one run, with what they hold the vectors to."""

    def __init__(
        self, settings: SteeringSettings, start: dict[str, torch.Tensor], norms: dict[str, torch.Tensor]
    ):
        self.settings = settings
        self.start = start  # the rows before step 1 (what --init_pull pulls toward)
        self.norms = norms  # each vector's held norm (--preserve_embedding_norm, --direction_only)

    @classmethod
    def for_run(
        cls,
        settings: SteeringSettings,
        start: dict[str, torch.Tensor],
        start_norms: dict[str, torch.Tensor],
        vocabulary_norms: dict[str, float],
    ) -> VectorSteering:
        """``start``: the rows before step 1; ``start_norms``: their norms as the run recorded them
        (a resumed run holds the same ones); ``vocabulary_norms``: each encoder's mean token norm."""
        if settings.direction_only and (settings.direction_norm or "vocabulary") == "vocabulary":
            norms = {key: torch.full_like(start_norms[key], vocabulary_norms[key]) for key in start}
        else:
            norms = start_norms
        return cls(settings, start, norms)

    def place(self, vectors: dict[str, torch.nn.Parameter]) -> None:
        """Before the first step: ``--direction_only`` starts on its sphere."""
        if self.settings.direction_only:
            for key, rows in vectors.items():
                rescale_to_norms(rows, self.norms[key])

    def before_step(self, vectors: dict[str, torch.nn.Parameter]) -> None:
        """On the gradient averaged over processes, before clipping and the optimizer."""
        with torch.no_grad():
            for key, rows in vectors.items():
                if rows.grad is None:
                    continue
                if self.settings.init_pull:
                    pull = self.start[key].to(rows.device, rows.dtype)
                    rows.grad.add_(rows - pull, alpha=2 * self.settings.init_pull / rows.shape[0])
                if self.settings.direction_only:
                    rows.grad.copy_(tangent_part(rows.grad, rows))

    def after_step(self, vectors: dict[str, torch.nn.Parameter]) -> None:
        """After the optimizer: vectors back to their held norms."""
        if self.settings.holds_norms:
            for key, rows in vectors.items():
                rescale_to_norms(rows, self.norms[key])


def tangent_part(gradient: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Each row's gradient without its component along the row: the part that turns the vector
    instead of lengthening it."""
    unit = rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return gradient - (gradient * unit).sum(dim=1, keepdim=True) * unit


def rescale_to_norms(vectors: torch.Tensor, norms: torch.Tensor) -> None:
    """Give each vector the norm in ``norms``, keeping its direction (in place)."""
    with torch.no_grad():
        current = vectors.norm(dim=1, keepdim=True).clamp_min(1e-12)
        vectors.mul_(norms.to(vectors.device, vectors.dtype).reshape(-1, 1) / current)
