"""Prompt tokenization and text encoding with kohya's semantics.

Long prompts (``--max_token_length`` 150 or 225) are cut into chunks of 75 tokens; each chunk is
wrapped as ``<BOS> 75 tokens <EOS>`` and encoded separately, then the hidden states are glued
back into one sequence of ``1 + 75 * chunks + 1`` positions, as kohya's scripts do, so that
embeddings trained here behave the same in kohya's generator and in the WebUI.
"""

from __future__ import annotations

import torch

from library.text.tokenizer import CHUNK_TOKENS


def num_chunks(max_token_length: int | None) -> int:
    """How many 77-token windows a prompt of ``max_token_length`` tokens uses (1, 2 or 3)."""
    if max_token_length is None:
        return 1
    if max_token_length not in (75, 150, 225):
        raise ValueError("max_token_length must be 75, 150 or 225")
    return max_token_length // CHUNK_TOKENS


def tokenize_prompts(tokenizer, texts: list[str], max_token_length: int | None = None) -> torch.Tensor:
    """Token ids shaped ``[batch, chunks, 77]``.

    The whole prompt is tokenized to ``75 * chunks + 2`` ids (padded, truncated), then each
    75-id window gets its own BOS and EOS. For the SD2 tokenizer (pad ``!`` differs from EOS),
    a window whose text ended inside it keeps an EOS before the padding, and a window that
    holds no text at all starts with EOS, matching how SD2 was trained.
    """
    chunks = num_chunks(max_token_length)
    length = CHUNK_TOKENS * chunks + 2
    ids = tokenizer(
        texts, padding="max_length", truncation=True, max_length=length, return_tensors="pt"
    ).input_ids
    if chunks == 1:
        return ids.unsqueeze(1)
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    windows = []
    for start in range(1, length - 1, CHUNK_TOKENS):
        body = ids[:, start : start + CHUNK_TOKENS]
        window = torch.cat([torch.full_like(ids[:, :1], bos), body, torch.full_like(ids[:, :1], eos)], dim=1)
        if pad != eos:
            # a window whose text ended before its last slot closes with PAD, not a second EOS;
            # a window holding no text at all reads BOS EOS PAD ... as SD2 saw in training
            ended = (window[:, -2] == eos) | (window[:, -2] == pad)
            window[:, -1] = torch.where(ended, pad, eos)
            window[:, 1] = torch.where(window[:, 1] == pad, eos, window[:, 1])
        windows.append(window)
    return torch.stack(windows, dim=1)


def final_layer_norm(text_encoder) -> torch.nn.Module:
    """The CLIP text encoder's last LayerNorm (transformers 4 nests it under ``text_model``)."""
    inner = getattr(text_encoder, "text_model", text_encoder)
    return inner.final_layer_norm


def encode_prompts(
    text_encoder, tokenizer, input_ids: torch.Tensor, clip_skip: int | None = None
) -> torch.Tensor:
    """Hidden states for ``input_ids`` ``[batch, chunks, 77]`` -> ``[batch, 77 or 2 + 75 * chunks, dim]``.

    ``clip_skip`` k (kohya's meaning) takes the output of the k-th layer from the end and applies
    the final LayerNorm; k=1 (or None) is the normal last layer. Chunks are encoded as separate
    77-token prompts and joined as ``BOS, 75 states per chunk, last EOS``. With the SD2 tokenizer,
    an empty chunk (``BOS EOS PAD ...``) contributes only padding states, so its EOS does not
    sit in the middle of the prompt (kohya intended this, but compares ids to a string).
    """
    batch, chunks, length = input_ids.shape
    flat = input_ids.reshape(-1, length).to(text_encoder.device)
    states = None
    if len(flat) > 1:  # the same window twice is encoded once (see encode_windows)
        # on CUDA, unique() waits for the device: at the start of a step, which is idle by then
        windows, where = torch.unique(flat, dim=0, return_inverse=True)
        if len(windows) < len(flat):
            states = encode_windows(text_encoder, windows, clip_skip)[where]
    if states is None:
        states = encode_windows(text_encoder, flat, clip_skip)
    states = states.reshape(batch, chunks, length, -1)
    if chunks == 1:
        return states[:, 0]
    pieces = [states[:, 0, :1]]
    for i in range(chunks):
        body = states[:, i, 1:-1]
        if tokenizer.pad_token_id != tokenizer.eos_token_id:
            empty = (input_ids[:, i, 1] == tokenizer.eos_token_id).to(body.device)[:, None]
            first = torch.where(empty, body[:, 1], body[:, 0])
            body = torch.cat([first[:, None], body[:, 1:]], dim=1)
        pieces.append(body)
    pieces.append(states[:, -1, -1:])
    return torch.cat(pieces, dim=1)


def encode_windows(text_encoder, ids: torch.Tensor, clip_skip: int | None) -> torch.Tensor:
    """Hidden states of 77-token windows ``[n, 77]`` -> ``[n, 77, dim]``, with kohya's ``clip_skip``.

    Callers pass each distinct window once. Textual Inversion batches often repeat a caption (a
    folder without caption files captions every image with its class tokens), and long-prompt
    windows past the end of the text are all alike; the text encoder's forward and backward are
    then paid once per distinct window, and the gradient of the copies adds up in the one.
    """
    if clip_skip is None or clip_skip <= 1:
        return text_encoder(ids)[0]
    hidden = text_encoder(ids, output_hidden_states=True).hidden_states
    return final_layer_norm(text_encoder)(hidden[-clip_skip])


def drop_unused_layers(text_encoder, clip_skip: int | None) -> int | None:
    """With ``clip_skip`` k > 1 the outputs of the last k - 1 layers are never read: remove them.

    The encoder's final LayerNorm then applies to the new last layer, which is exactly kohya's
    ``clip_skip`` output, so afterwards the encoder is called without it: the returned value
    (``None``) is the ``clip_skip`` to use from now on. Training saves those layers' memory and
    their share of every step's forward and backward.
    """
    if clip_skip is None or clip_skip <= 1:
        return clip_skip
    layers = getattr(text_encoder, "text_model", text_encoder).encoder.layers
    if clip_skip > len(layers):
        return clip_skip  # encode_windows reports the impossible request
    del layers[len(layers) - (clip_skip - 1) :]
    text_encoder.config.num_hidden_layers = len(layers)
    return None
