"""SDXL's text conditioning: two tokenizers and text encoders, their states side by side, and the
second's pooled output with the picture's sizes as the UNet's added conditioning.

The encoders are CLIP ViT-L (``clip_l``) and OpenCLIP ViT-bigG (``clip_g``, with a projection).
The UNet's context is both encoders' penultimate hidden states (without the final LayerNorm)
concatenated, 768 + 1280 = 2048 wide. Its added conditioning is ``text_embeds``, the second
encoder's final states at the first end-of-text token of the first window, projected, and
``time_ids``, six numbers per picture: original height and width, crop top and left, target
height and width. The pooled position is found by the end-of-text id, not by the highest id as
CLIP's own pooling does, because the new word's ids are the highest. Long prompts follow the same
window rule as SD 1.x (``library.text.encoding``); the pooled output is the first window's, as
kohya takes it.
"""

from __future__ import annotations

from typing import Any

import torch

from library.errors import UserError
from library.text.conditioning import Conditioning, TextConditioner, weighted_windows
from library.text.encoding import empty_windows, encode_prompts, join_windows, tokenize_prompts
from library.text.weighting import apply_token_weights

SDXL_HIDDEN_LAYER = 2  # the penultimate layer of both encoders, counted from the end


class SDXLTextConditioner(TextConditioner):
    """SDXL: ``tokenizers``/``encoders`` are [CLIP ViT-L, OpenCLIP bigG]; ``sizes`` ``[batch, 6]``
    condition every picture on its size and crop (see the module's docstring)."""

    def __init__(
        self,
        tokenizers: list,
        encoders: list,
        *,
        clip_skip: int | None = None,
        max_token_length: int | None = None,
        max_chunks: int = 1,
    ):
        refuse_clip_skip(clip_skip)
        super().__init__(tokenizers, encoders, max_token_length=max_token_length, max_chunks=max_chunks)

    def drop_unused_layers(self) -> None:
        """Nothing to drop: the pooled output needs the second encoder's last layer."""

    def captions(self, texts: list[str], sizes: Any = None) -> Conditioning:
        if sizes is None:
            raise ValueError("SDXL training needs each picture's sizes (original, crop, target)")
        ids = [tokenize_prompts(tokenizer, texts, self.max_token_length) for tokenizer in self.tokenizers]
        return self._conditioning(ids, None, sizes)

    def prompts(self, texts: list[str], sizes: Any = None) -> Conditioning:
        """Generation: without ``sizes`` the conditioning holds no ``time_ids`` (the SDXL pipelines
        make them from the image size and kohya's size options)."""
        pieces = [weighted_windows(tokenizer, texts, self.max_chunks) for tokenizer in self.tokenizers]
        return self._conditioning([ids for ids, _ in pieces], pieces[0][1], sizes)

    def _conditioning(
        self, ids: list[torch.Tensor], weights: torch.Tensor | None, sizes: Any
    ) -> Conditioning:
        (tokenizer_l, tokenizer_g), (encoder_l, encoder_g) = self.tokenizers, self.encoders
        hidden_l = encode_prompts(encoder_l, tokenizer_l, ids[0], SDXL_HIDDEN_LAYER, final_norm=False)
        hidden_g, pooled = encode_with_pooled(encoder_g, tokenizer_g, ids[1])
        if weights is not None and bool((weights != 1.0).any()):
            hidden_l = apply_token_weights(
                hidden_l, join_windows(weights, empty_windows(tokenizer_l, ids[0]))
            )
            hidden_g = apply_token_weights(
                hidden_g, join_windows(weights, empty_windows(tokenizer_g, ids[1]))
            )
        added = {"text_embeds": pooled}
        if sizes is not None:
            added["time_ids"] = torch.as_tensor(sizes, dtype=torch.float32, device=pooled.device).reshape(
                -1, 6
            )
        return Conditioning(torch.cat([hidden_l, hidden_g.to(hidden_l.dtype)], dim=-1), added)


def encode_with_pooled(encoder, tokenizer, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The second encoder's joined penultimate states ``[batch, positions, dim]`` and its pooled,
    projected output ``[batch, projection]`` (first window, first end-of-text token)."""
    batch, chunks, length = input_ids.shape
    output = encoder(input_ids.reshape(-1, length).to(encoder.device), output_hidden_states=True)
    penultimate = output.hidden_states[-SDXL_HIDDEN_LAYER].reshape(batch, chunks, length, -1)
    hidden = join_windows(penultimate, empty_windows(tokenizer, input_ids))
    first_window = output.last_hidden_state.reshape(batch, chunks, length, -1)[:, 0]
    first_ids = input_ids[:, 0].to(first_window.device)
    end = (first_ids == tokenizer.eos_token_id).int().argmax(dim=1)
    final = first_window[torch.arange(batch, device=first_window.device), end]
    return hidden, encoder.text_projection(final)  # in the encoder's compute dtype, as its layers run


def refuse_clip_skip(clip_skip: int | None) -> None:
    """Trainer and generator alike: ``--clip_skip`` has no meaning for SDXL."""
    if clip_skip is not None:
        raise UserError(
            "--clip_skip: SDXL models are always conditioned on the penultimate layer of both text "
            "encoders (kohya ignores it with a warning); remove --clip_skip"
        )
