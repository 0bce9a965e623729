"""Prompt tokenization and text encoding with kohya's semantics, one rule for both programs.

Long prompts (``--max_token_length`` 150 or 225) are cut into chunks of 75 tokens; each chunk is
wrapped as ``<BOS> 75 tokens <EOS>`` (``token_windows``) and encoded separately, then the hidden
states are glued back into one sequence of ``1 + 75 * chunks + 1`` positions (``join_windows``),
as kohya's scripts do, so that embeddings trained here behave the same in kohya's generator and
in the WebUI. Captions (training) and weighted prompts (generation) use the same two functions.
"""

from __future__ import annotations

import torch

from library.text.tokenizer import CHUNK_TOKENS, MODEL_MAX_LENGTH


def num_chunks(max_token_length: int | None) -> int:
    """How many 77-token windows a prompt of ``max_token_length`` tokens uses (1, 2 or 3)."""
    if max_token_length is None:
        return 1
    if max_token_length not in (75, 150, 225):
        raise ValueError("max_token_length must be 75, 150 or 225")
    return max_token_length // CHUNK_TOKENS


def token_windows(tokenizer, runs: list[list[int]]) -> torch.Tensor:
    """Runs of at most 75 token ids as 77-token windows ``[len(runs), 77]``: the one layout of both
    programs, for captions and for weighted prompts.

    Each window is ``BOS, the run, EOS``, then the tokenizer's padding: EOS again for SD 1.x, ``!``
    for SD 2.x. An empty run (a window past the end of the text) reads ``BOS EOS PAD ...``, as SD 2.x
    saw such windows in training.
    """
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    rows = []
    for run in runs:
        if len(run) > CHUNK_TOKENS:
            raise ValueError(f"a window holds at most {CHUNK_TOKENS} tokens, got {len(run)}")
        rows.append([bos, *run, eos] + [pad] * (MODEL_MAX_LENGTH - 2 - len(run)))
    return torch.tensor(rows, dtype=torch.long)


def tokenize_prompts(tokenizer, texts: list[str], max_token_length: int | None = None) -> torch.Tensor:
    """Token ids shaped ``[batch, chunks, 77]``: each text's tokens cut into runs of 75 (the end of a
    text longer than ``75 * chunks`` is dropped), every text given all ``chunks`` windows."""
    chunks = num_chunks(max_token_length)
    windows = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False, verbose=False).input_ids[: CHUNK_TOKENS * chunks]
        runs = [ids[start : start + CHUNK_TOKENS] for start in range(0, len(ids), CHUNK_TOKENS)]
        windows.append(token_windows(tokenizer, runs + [[]] * (chunks - len(runs))))
    return torch.stack(windows)


def empty_windows(tokenizer, input_ids: torch.Tensor) -> torch.Tensor | None:
    """``[batch, chunks]``: which windows hold no text (``BOS EOS PAD ...``), when padding differs
    from EOS (SD 2.x); None for SD 1.x, where such a window needs no special joining."""
    if tokenizer.pad_token_id == tokenizer.eos_token_id:
        return None
    return input_ids[:, :, 1] == tokenizer.eos_token_id


def join_windows(per_window: torch.Tensor, empty: torch.Tensor | None = None) -> torch.Tensor:
    """Per-window values ``[batch, chunks, 77, ...]`` joined as one sequence ``[batch, 2 + 75 *
    chunks, ...]``: the first BOS, each window's 75 middle positions, the last window's last.

    kohya's rule for text encoder states, also used for prompt weights so that both line up. An
    ``empty`` window (see ``empty_windows``) contributes padding only: its EOS, which would sit in
    the middle of the prompt, is replaced by the padding after it (kohya intended this, but
    compares ids to a string).
    """
    chunks = per_window.shape[1]
    if chunks == 1:
        return per_window[:, 0]
    pieces = [per_window[:, 0, :1]]
    for i in range(chunks):
        body = per_window[:, i, 1:-1]
        if empty is not None:
            mask = empty[:, i].to(body.device).reshape(-1, *([1] * (body.dim() - 1)))
            first = torch.where(mask[:, 0], body[:, 1], body[:, 0])
            body = torch.cat([first[:, None], body[:, 1:]], dim=1)
        pieces.append(body)
    pieces.append(per_window[:, -1, -1:])
    return torch.cat(pieces, dim=1)


def final_layer_norm(text_encoder) -> torch.nn.Module:
    """The CLIP text encoder's last LayerNorm (transformers 4 nests it under ``text_model``)."""
    inner = getattr(text_encoder, "text_model", text_encoder)
    return inner.final_layer_norm


def encode_prompts(
    text_encoder, tokenizer, input_ids: torch.Tensor, clip_skip: int | None = None, final_norm: bool = True
) -> torch.Tensor:
    """Hidden states for ``input_ids`` ``[batch, chunks, 77]`` -> ``[batch, 77 or 2 + 75 * chunks, dim]``.

    ``clip_skip`` k (kohya's meaning) takes the output of the k-th layer from the end and applies
    the final LayerNorm (not with ``final_norm=False``: SDXL's penultimate states); k=1 (or None)
    is the normal last layer. Chunks are encoded as separate 77-token prompts and joined by
    ``join_windows``.
    """
    batch, chunks, length = input_ids.shape
    flat = input_ids.reshape(-1, length).to(text_encoder.device)
    states = None
    if len(flat) > 1:  # the same window twice is encoded once (see encode_windows)
        # on CUDA, unique() waits for the device: at the start of a step, which is idle by then
        windows, where = torch.unique(flat, dim=0, return_inverse=True)
        if len(windows) < len(flat):
            states = encode_windows(text_encoder, windows, clip_skip, final_norm)[where]
    if states is None:
        states = encode_windows(text_encoder, flat, clip_skip, final_norm)
    return join_windows(states.reshape(batch, chunks, length, -1), empty_windows(tokenizer, input_ids))


def encode_windows(
    text_encoder, ids: torch.Tensor, clip_skip: int | None, final_norm: bool = True
) -> torch.Tensor:
    """Hidden states of 77-token windows ``[n, 77]`` -> ``[n, 77, dim]``, with kohya's ``clip_skip``.

    Callers pass each distinct window once. Textual Inversion batches often repeat a caption (a
    folder without caption files captions every image with its class tokens), and long-prompt
    windows past the end of the text are all alike; the text encoder's forward and backward are
    then paid once per distinct window, and the gradient of the copies adds up in the one.
    """
    if clip_skip is None or clip_skip <= 1:
        return text_encoder(ids)[0]
    hidden = text_encoder(ids, output_hidden_states=True).hidden_states[-clip_skip]
    return final_layer_norm(text_encoder)(hidden) if final_norm else hidden


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
