"""Placeholder words: one rule shared by the trainer, the dataset and the generator.

An embedding of N vectors named ``mychar`` is typed as one word but occupies N tokens:
``mychar mychar1 ... mychar{N-1}`` (kohya's naming, also what the WebUI and our generator use).

A placeholder is a **whole word**, case-insensitive like the CLIP tokenizer: ``mychar`` matches in
``a mychar,`` and ``(MyChar:1.2)`` but not inside ``mychars``, ``supermychar`` or ``my_mychar``.
The caption check, the prompt expansion and the tokenizer all follow that rule (the tokens are
added with ``single_word=True``; kohya's ``str.replace`` and a plain ``add_tokens`` match inside
other words). A name is taken when the tokenizer already knows it, compared lower-cased as the
tokenizer compares: ``Dog`` is taken because ``dog`` is a word.
"""

from __future__ import annotations

import re
from collections.abc import Iterable


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


def words_in_no_text(words: Iterable[str], texts: Iterable[str]) -> list[str]:
    """The ``words`` that occur in none of ``texts``: a word no prompt or caption contains is never
    used, and nothing else says so (the most common reason an embedding "does nothing")."""
    texts = list(texts)
    return [word for word in words if not any(contains_word(text, word) for text in texts)]


def expand_placeholder(text: str, token_string: str, num_vectors: int) -> str:
    """Replace each whole-word ``token_string`` with all of its placeholder names."""
    if num_vectors <= 1:
        return text
    replacement = " ".join(placeholder_names(token_string, num_vectors))
    return _word_pattern(token_string).sub(lambda _m: replacement, text)


def taken_names(tokenizer, names: list[str]) -> list[str]:
    """The names the tokenizer already knows (a vocabulary word or an added token), lower-cased."""
    vocab = tokenizer.get_vocab()
    return [n for n in names if n in vocab or n.lower() in vocab or f"{n.lower()}</w>" in vocab]


def add_word_tokens(tokenizer, names: list[str]) -> list[int] | None:
    """Add ``names`` as whole-word tokens; their ids, or ``None`` if the tokenizer merged any of them."""
    from transformers import AddedToken  # imported here: option parsing imports this module

    added = tokenizer.add_tokens([AddedToken(name, single_word=True) for name in names])
    if added != len(names):
        return None
    return tokenizer.convert_tokens_to_ids(names)
