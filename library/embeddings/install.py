"""Putting trained embeddings into a loaded model, so that prompts can use their words.

The generator, the concept evaluation and the trainer's sample images all do it the same way:
the word gets ``N`` tokens (``word word1 ... word{N-1}``, ``library.text.tokens``) in every
tokenizer of the model, each text encoder's token table grows by ``N`` rows, and those rows
receive the file's vectors for that encoder (SDXL: ``clip_l`` and ``clip_g``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from library.embeddings.formats import LoadedEmbedding, load_embedding_file, rows_for_model
from library.errors import UserError
from library.text.tokens import add_word_tokens, placeholder_names, taken_names

logger = logging.getLogger(__name__)


def install_embeddings(
    model,
    paths: list[str | os.PathLike],
    words: list[str] | None = None,
    bundled: list[tuple[str, LoadedEmbedding]] = (),
) -> dict[str, int]:
    """Add each embedding's words to the model's tokenizers and its vectors to its text encoders.

    The word is the file stem (kohya, WebUI, ComfyUI) unless ``words`` names it; ``bundled`` are
    embeddings already read from elsewhere (a LoRA file's ``bundle_emb.*``: ``(where, embedding)``,
    the word being ``embedding.word``). Returns ``{word: N}`` for the prompt expansion. A word that
    already means something to the tokenizer would silently change meaning, so it is an error, as
    in kohya.
    """
    tokenizer = model.tokenizer  # the others share its vocabulary, so the new ids agree
    paths, words = _without_repeats(paths, words)
    sources = [(path, load_embedding_file(path), word) for path, word in zip(paths, words)]
    sources += [(where, embedding, embedding.word) for where, embedding in bundled]
    paths = [path for path, _, _ in sources]
    loaded: list[tuple[list[int], dict[str, torch.Tensor]]] = []
    installed: dict[str, int] = {}
    source_of: dict[str, str] = {}
    for path, embedding, word in sources:
        rows = rows_for_model(embedding, model.text_dims, model.family.name, path)
        if embedding.layout == "webui-image" and embedding.word != word:
            logger.warning(
                "%s: the image carries the name '%s', but the word to use in prompts is '%s'",
                path,
                embedding.word,
                word,
            )
        names = placeholder_names(word, embedding.num_vectors)
        clash = next((source_of[name.lower()] for name in names if name.lower() in source_of), None)
        if clash is not None:
            raise UserError(
                f"{path}: gives the word '{word}', as {clash} does; rename one of the two files (the file name "
                "is the word)"
            )
        taken = taken_names(tokenizer, names)
        if taken:
            raise UserError(
                f"{path}: the word '{taken[0]}' (from the file name) is already a token of the "
                f"tokenizer or of another embedding; {_rename_advice(path, embedding)}"
            )
        token_ids = [add_word_tokens(each, names) for each in model.tokenizers]
        if token_ids[0] is None or any(ids != token_ids[0] for ids in token_ids):
            raise UserError(f"{path}: could not add the words {names} to the tokenizer; rename the file")
        loaded.append((token_ids[0], rows))
        installed[word] = embedding.num_vectors
        source_of.update({name.lower(): str(path) for name in names})
        logger.info(
            "embedding %s: word '%s', %d vector(s) (%s layout)",
            path,
            word,
            embedding.num_vectors,
            embedding.layout,
        )
    _write_rows(model, loaded, paths)
    return installed


def _write_rows(model, loaded: list[tuple[list[int], dict[str, torch.Tensor]]], paths: list) -> None:
    """Each text encoder's table grows to the tokenizer's size; the new ids get that encoder's rows."""
    for key, text_encoder in zip(model.family.encoder_keys, model.text_encoders):
        typical_norm = float(text_encoder.get_input_embeddings().weight.detach().float().norm(dim=1).mean())
        for (_, rows), path in zip(loaded, paths):
            _warn_if_oversized(path, rows[key], typical_norm)
        text_encoder.resize_token_embeddings(len(model.tokenizer), mean_resizing=False)
        table = text_encoder.get_input_embeddings().weight
        with torch.no_grad():
            for token_ids, rows in loaded:
                table[token_ids] = rows[key].to(device=table.device, dtype=table.dtype)


def embedding_words(paths: list, bundled: list[tuple[str, LoadedEmbedding]] = ()) -> list[str]:
    """The words ``install_embeddings(model, paths, bundled=bundled)`` will add: each file's stem
    (the rule of kohya, the WebUI and ComfyUI), then each bundled embedding's word."""
    return [Path(path).stem for path in paths] + [embedding.word for _, embedding in bundled]


def _without_repeats(paths: list, words: list[str] | None) -> tuple[list, list[str]]:
    """The paths (and their words: the file stems unless given) with a file named twice kept once."""
    words = words or embedding_words(paths)
    kept: dict[Path, tuple] = {}
    for path, word in zip(paths, words):
        key = Path(path).resolve()
        if key in kept:
            logger.info("%s is given more than once; it is loaded once", path)
            continue
        kept[key] = (path, word)
    return [path for path, _ in kept.values()], [word for _, word in kept.values()]


def _rename_advice(path, embedding) -> str:
    """What to rename the file to: the word it records, when that word is free (usually the token string)."""
    stored = embedding.stored_name
    if stored and stored != Path(path).stem:
        return f"the file records the word '{stored}': rename it to {stored}{Path(path).suffix}"
    return "rename the file to a word that is not in the vocabulary"


OVERSIZED_NORM_RATIO = 100  # vectors this many times the vocabulary's norm drown (or overflow) a prompt


def _warn_if_oversized(path, vectors: torch.Tensor, typical_norm: float) -> None:
    largest = float(vectors.float().norm(dim=1).max())
    if largest > OVERSIZED_NORM_RATIO * typical_norm:
        logger.warning(
            "%s: a vector's norm is %.3g, %.0f times the vocabulary's typical %.3g; the word will drown the rest "
            "of the prompt or overflow to black images (a diverged training run?)",
            path,
            largest,
            largest / typical_norm,
            typical_norm,
        )
