"""Placeholder-token naming: one rule shared by the trainer, the dataset and the generator.

An embedding of N vectors named ``mychar`` is typed as one word but occupies N tokens:
``mychar mychar1 ... mychar{N-1}`` (kohya's naming, also what the WebUI and our generator use).
"""

from __future__ import annotations

import re


def placeholder_names(token_string: str, num_vectors: int) -> list[str]:
    """``["mychar", "mychar1", ..., "mychar{N-1}"]`` for an embedding of ``num_vectors`` rows."""
    return [token_string] + [f"{token_string}{i}" for i in range(1, num_vectors)]


def _word_pattern(word: str) -> re.Pattern[str]:
    # A whole word: not glued to letters, digits or underscores on either side, so that
    # "mychar" does not match inside "mychars" or "mychar1" (kohya's str.replace does).
    # case-insensitive like the CLIP tokenizer, which lowercases prompts before matching tokens
    return re.compile(rf"(?<![\w]){re.escape(word)}(?![\w])", re.IGNORECASE)


def contains_word(text: str, word: str) -> bool:
    """True when ``word`` occurs in ``text`` as a whole word."""
    return _word_pattern(word).search(text) is not None


def expand_placeholder(text: str, token_string: str, num_vectors: int) -> str:
    """Replace each whole-word ``token_string`` with all of its placeholder names."""
    if num_vectors <= 1:
        return text
    replacement = " ".join(placeholder_names(token_string, num_vectors))
    return _word_pattern(token_string).sub(lambda _m: replacement, text)
