"""Attention weights in prompts (WebUI / kohya "lpw"): ``(word)`` x1.1, ``((word))`` x1.21,
``[word]`` /1.1, ``(word:1.3)``, escapes ``\\(`` ``\\)`` ``\\[`` ``\\]``, and ``BREAK``, which starts a
new 75-token window. The windows are laid out and joined by ``library.text.encoding``, as captions are.
"""

from __future__ import annotations

import logging
import re

import torch

from library.text.encoding import token_windows
from library.text.tokenizer import CHUNK_TOKENS

logger = logging.getLogger(__name__)

ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1
BREAK = "BREAK"
BREAK_PIECE = (BREAK, -1.0)  # how parse_prompt_attention marks a BREAK (as the WebUI does)

_ATTENTION_TOKENS = re.compile(
    r"""
      \\[()\[\]\\]                  # escaped bracket or backslash: the character itself
    | \\                            # any other backslash is dropped
    | \( | \[                       # opening brackets
    | :\s*(?P<weight>[+-]?(?:\d+(?:\.\d*)?|\.\d+))\s*\)   # ':1.3)' closes '(' with that weight
    | \) | \]                       # closing brackets
    | [^\\()\[\]:]+                 # plain text
    | :                             # a colon that does not start a weight
    """,
    re.VERBOSE,
)
_BREAK_WORD = re.compile(r"\s*\bBREAK\b\s*")


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """Split a prompt into ``(text, weight)`` pieces, the WebUI way.

    Weights multiply through nesting: ``((a))`` is 1.21, ``[(a)]`` is 1.0; an unclosed bracket
    applies to the rest of the prompt; a closing bracket without its opener is plain text.
    Adjacent pieces of equal weight are merged (so ``(a)(b)`` is one piece ``ab``). Each
    whole-word ``BREAK`` becomes ``BREAK_PIECE`` (``("BREAK", -1.0)``) at any nesting depth.
    """
    pieces: list[list] = []  # [text, weight] pairs, mutable so brackets can scale them
    breaks: set[int] = set()  # indexes of BREAK markers, which brackets never scale
    open_round: list[int] = []
    open_square: list[int] = []

    def scale_from(start: int, factor: float) -> None:
        for index in range(start, len(pieces)):
            if index not in breaks:
                pieces[index][1] *= factor

    def add_text(chunk: str) -> None:
        for i, part in enumerate(_BREAK_WORD.split(chunk)):
            if i > 0:
                breaks.add(len(pieces))
                pieces.append(list(BREAK_PIECE))
            pieces.append([part, 1.0])

    for match in _ATTENTION_TOKENS.finditer(text):
        token, weight = match.group(0), match.group("weight")
        if token.startswith("\\"):
            pieces.append([token[1:], 1.0])
        elif token == "(":
            open_round.append(len(pieces))
        elif token == "[":
            open_square.append(len(pieces))
        elif weight is not None and open_round:
            scale_from(open_round.pop(), float(weight))
        elif token == ")" and open_round:
            scale_from(open_round.pop(), ROUND_MULTIPLIER)
        elif token == "]" and open_square:
            scale_from(open_square.pop(), SQUARE_MULTIPLIER)
        else:
            add_text(token)
    for start in open_round:
        scale_from(start, ROUND_MULTIPLIER)
    for start in open_square:
        scale_from(start, SQUARE_MULTIPLIER)

    merged: list[tuple[str, float]] = []
    for index, (piece, weight) in enumerate(pieces):
        is_break = index in breaks
        if not is_break and merged and merged[-1] != BREAK_PIECE and merged[-1][1] == weight:
            merged[-1] = (merged[-1][0] + piece, weight)
        else:
            merged.append(BREAK_PIECE if is_break else (piece, weight))
    result = [piece for piece in merged if piece == BREAK_PIECE or piece[0]]
    return result or [("", 1.0)]


def weighted_token_chunks(
    tokenizer, prompt: str, max_chunks: int, *, min_chunks: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and per-token weights of a weighted prompt, as 77-token windows.

    Returns ``(ids [chunks, 77] long, weights [chunks, 77] float)``. Each window is
    ``BOS + up to 75 tokens + EOS``, then the tokenizer's pad token (for SD 1.x that is EOS
    again; SD 2.x pads with ``!``), like kohya's long-prompt encoder. BOS, EOS and padding weigh
    1.0. ``BREAK`` closes the current window (padding it) as the WebUI does. Windows beyond
    ``max_chunks`` are dropped with a warning; ``min_chunks`` pads with empty windows so that a
    prompt and its negative prompt can be given the same length.
    """
    if max_chunks < 1 or min_chunks < 1 or min_chunks > max_chunks:
        raise ValueError(f"need 1 <= min_chunks <= max_chunks, got {min_chunks} and {max_chunks}")
    chunks: list[tuple[list[int], list[float]]] = []
    ids: list[int] = []
    weights: list[float] = []

    def close_chunk() -> None:
        chunks.append((ids.copy(), weights.copy()))
        ids.clear()
        weights.clear()

    for text, weight in parse_prompt_attention(prompt):
        if (text, weight) == BREAK_PIECE:
            close_chunk()
            continue
        for token_id in tokenizer(text, add_special_tokens=False, verbose=False).input_ids:
            if len(ids) == CHUNK_TOKENS:
                close_chunk()
            ids.append(token_id)
            weights.append(weight)
    if ids or not chunks:
        close_chunk()

    if len(chunks) > max_chunks:
        dropped = sum(len(chunk_ids) for chunk_ids, _ in chunks[max_chunks:])
        logger.warning(
            "prompt needs %d chunks of %d tokens but at most %d are allowed; the last %d tokens are "
            "ignored (shorten the prompt or allow more chunks): %s",
            len(chunks),
            CHUNK_TOKENS,
            max_chunks,
            dropped,
            prompt,
        )
        chunks = chunks[:max_chunks]
    chunks += [([], [])] * (min_chunks - len(chunks))

    ids_rows = token_windows(tokenizer, [chunk_ids for chunk_ids, _ in chunks])
    weight_rows = torch.ones(ids_rows.shape, dtype=torch.float32)  # BOS, EOS and padding weigh 1.0
    for row, (_, chunk_weights) in enumerate(chunks):
        weight_rows[row, 1 : 1 + len(chunk_weights)] = torch.tensor(chunk_weights, dtype=torch.float32)
    return ids_rows, weight_rows


def apply_token_weights(hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Scale each position of the text encoder output by its weight, keeping each sample's mean.

    kohya's (and the lpw pipeline's) rule: ``hidden * weight``, then multiply by
    ``previous_mean / new_mean`` per sample, so emphasis shifts attention between tokens
    without changing the overall magnitude. ``hidden`` is ``[B, L, D]``, ``weights`` ``[B, L]``.
    Computed in fp32 and returned in ``hidden``'s dtype; a sample whose weighted mean is 0 is
    left unrescaled instead of becoming NaN.
    """
    if hidden.dim() != 3 or weights.shape != hidden.shape[:2]:
        raise ValueError(
            f"weights {tuple(weights.shape)} must match the first two dims of hidden {tuple(hidden.shape)}"
        )
    values = hidden.float()
    previous_mean = values.mean(dim=(1, 2))
    weighted = values * weights.to(device=values.device, dtype=values.dtype).unsqueeze(-1)
    new_mean = weighted.mean(dim=(1, 2))
    ratio = torch.where(new_mean == 0, torch.ones_like(new_mean), previous_mean / new_mean)
    return (weighted * ratio[:, None, None]).to(hidden.dtype)
