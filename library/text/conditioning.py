"""Texts to the UNet's conditioning: the one place where a model family's text encoders are used.

SD 1.x and 2.x condition the UNet on one text encoder's hidden states (the last layer, or the
``--clip_skip``-th from the end). Training and generation both go through a ``TextConditioner``:
training with captions (``captions``: every caption gets all ``--max_token_length`` windows),
generation with weighted prompts (``prompts``: WebUI attention weights, ``BREAK``, as many
windows as the longest prompt needs). A family with other encoders (SDXL) is another
``TextConditioner``; the training step and the generator do not change.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from library.errors import UserError
from library.text.encoding import (
    drop_unused_layers,
    empty_windows,
    encode_prompts,
    join_windows,
    tokenize_prompts,
)
from library.text.weighting import apply_token_weights, weighted_token_chunks


@dataclass
class Conditioning:
    """What the UNet is conditioned on: the text's hidden states ``[batch, positions, width]`` and,
    for families that have them, the UNet's added conditioning (``added_cond_kwargs``)."""

    hidden: torch.Tensor
    added: dict[str, torch.Tensor] = field(default_factory=dict)

    def unet_kwargs(self, dtype: torch.dtype) -> dict[str, Any]:
        """The UNet's keyword arguments, in the UNet's dtype."""
        kwargs: dict[str, Any] = {"encoder_hidden_states": self.hidden.to(dtype)}
        if self.added:
            kwargs["added_cond_kwargs"] = {name: value.to(dtype) for name, value in self.added.items()}
        return kwargs


class TextConditioner:
    """SD 1.x/2.x: one tokenizer, one text encoder, its hidden states as the conditioning.

    ``tokenizers``/``encoders`` are lists (one entry here) so that code that adds words or
    splices vectors treats every family alike. ``max_token_length`` (75, 150, 225 or None) sets
    the windows of a caption, ``max_chunks`` (1-3) the most windows of a prompt.
    """

    def __init__(
        self,
        tokenizers: list,
        encoders: list,
        *,
        clip_skip: int | None = None,
        max_token_length: int | None = None,
        max_chunks: int = 1,
    ):
        self.tokenizers = list(tokenizers)
        self.encoders = list(encoders)
        self.clip_skip = clip_skip
        check_clip_skip(clip_skip, self.encoders[0])
        self.max_token_length = max_token_length
        self.max_chunks = max_chunks

    @property
    def device(self) -> torch.device:
        return self.encoders[0].device

    def drop_unused_layers(self) -> None:
        """Remove the encoder layers whose outputs are never read (those past ``clip_skip``): training
        saves their memory and their share of every step's forward and backward."""
        self.clip_skip = drop_unused_layers(self.encoders[0], self.clip_skip)

    def captions(self, texts: list[str], sizes: Any = None) -> Conditioning:
        """Training: captions as they are, each in all ``max_token_length`` windows. ``sizes`` is
        for families that condition on the image's size (SDXL); SD ignores it."""
        tokenizer, encoder = self.tokenizers[0], self.encoders[0]
        ids = tokenize_prompts(tokenizer, texts, self.max_token_length)
        return Conditioning(encode_prompts(encoder, tokenizer, ids, self.clip_skip))

    def prompts(self, texts: list[str]) -> Conditioning:
        """Generation: weighted prompts, all as long as the longest (at most ``max_chunks`` windows),
        encoded in one batch so that a prompt and its negative line up."""
        tokenizer, encoder = self.tokenizers[0], self.encoders[0]
        ids, weights = weighted_windows(tokenizer, texts, self.max_chunks)
        hidden = encode_prompts(encoder, tokenizer, ids, self.clip_skip)
        if bool((weights != 1.0).any()):
            hidden = apply_token_weights(hidden, join_windows(weights, empty_windows(tokenizer, ids)))
        return Conditioning(hidden)


def check_clip_skip(clip_skip: int | None, encoder) -> None:
    """``--clip_skip`` k must name one of the encoder's layers (1 = the last)."""
    layers = len(getattr(encoder, "text_model", encoder).encoder.layers)
    if clip_skip is not None and not 1 <= clip_skip <= layers:
        raise UserError(
            f"--clip_skip {clip_skip}: this model's text encoder has {layers} layers; use 1 to {layers} "
            "(1 = the last, 2 = the one before it, as most SD 1.x models are used)"
        )


def weighted_windows(tokenizer, texts: list[str], max_chunks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids and weights ``[batch, chunks, 77]`` of weighted prompts, every one given the windows the
    longest needs (at most ``max_chunks``)."""
    pieces = [weighted_token_chunks(tokenizer, text, max_chunks) for text in texts]
    chunks = max(ids.shape[0] for ids, _ in pieces)
    pieces = [
        piece
        if piece[0].shape[0] == chunks
        else weighted_token_chunks(tokenizer, text, chunks, min_chunks=chunks)
        for text, piece in zip(texts, pieces)
    ]
    return torch.stack([p[0] for p in pieces]), torch.stack([p[1] for p in pieces])
