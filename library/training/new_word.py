"""The new word's vectors: adding its tokens, choosing their start, and training only them.

kohya resizes the text encoder's 49,408-row embedding matrix, trains all of it and copies the
old rows back after every step. Optimizer state, gradient clipping and adaptive optimizers
(Prodigy, D-Adaptation) then see 49,408 rows instead of N, which breaks their step-size
estimates. Here the N new vectors are their own fp32 ``[N, dim]`` parameter spliced into the
token lookup (``SplicedTokenEmbedding``); the original rows are never touched, so they stay
bit-identical, and the frozen encoder can run in fp16/bf16 while the vectors stay fp32.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from library.embeddings.formats import load_embedding_file, rows_for_model
from library.errors import UserError
from library.text.tokenizer import CHUNK_TOKENS
from library.text.tokens import add_word_tokens, placeholder_names, taken_names

logger = logging.getLogger(__name__)


def add_placeholder_tokens(tokenizers: list, token_string: str, num_vectors: int) -> list[int]:
    """Add ``token_string``, ``token_string1`` ... as whole words to every tokenizer of the model (they
    share one vocabulary, so the ids agree); refuse names the tokenizer knows."""
    if num_vectors < 1 or num_vectors > CHUNK_TOKENS:
        raise UserError(
            f"--num_vectors_per_token must be between 1 and {CHUNK_TOKENS} (a prompt window holds {CHUNK_TOKENS} tokens)"
        )
    names = placeholder_names(token_string, num_vectors)
    taken = taken_names(tokenizers[0], names)
    if taken:
        raise UserError(
            f"--token_string {token_string}: the token {taken[0]!r} already exists in the tokenizer; "
            f"choose a new word, e.g. --token_string {suggest_free_token(tokenizers[0], token_string, num_vectors)}"
        )
    added = [add_word_tokens(tokenizer, names) for tokenizer in tokenizers]
    if added[0] is None or any(ids != added[0] for ids in added):  # a name normalised onto an existing one
        raise UserError(
            f"--token_string {token_string}: could not add all {num_vectors} tokens; choose another word"
        )
    return added[0]


def suggest_free_token(tokenizer, token_string: str, num_vectors: int) -> str:
    """A nearby word whose placeholder names are all free (``xyz`` → ``xyzx``, ``xyz_ti`` ...)."""
    for candidate in (f"{token_string}x", f"{token_string}_ti", f"{token_string}zq", f"zq{token_string}"):
        if not taken_names(tokenizer, placeholder_names(candidate, num_vectors)):
            return candidate
    return f"{token_string}_emb"


INIT_WORD_MODES = ("cycle", "spread", "mean")


@dataclass(frozen=True)
class WordSettings:
    """The new word: its name, vectors and start (fields named like the options)."""

    token_string: str | None = None
    init_word: str | None = None
    init_word_mode: str = "cycle"
    num_vectors_per_token: int = 1
    weights: str | None = None
    use_object_template: bool = False
    use_style_template: bool = False
    cross_init: bool = False

    @property
    def template(self) -> str | None:
        """``object`` or ``style`` when captions come from kohya's templates, else None."""
        return "object" if self.use_object_template else "style" if self.use_style_template else None


def init_token_plan(k: int, num_vectors: int, mode: str) -> list[list[int]]:
    """Which of the init phrase's ``k`` tokens each of the ``num_vectors`` vectors starts from.

    * ``cycle`` (kohya's rule, the default): vector i is token ``i % k``; a phrase longer than
      the vectors is cut, a shorter one repeats (``hello world`` over 3 vectors: hello, world, hello);
    * ``spread`` (the WebUI's rule): vector i is token ``i * k // N``, so the phrase keeps its
      order and each token covers a run of vectors (hello, hello, world); a longer phrase is
      sampled at even steps;
    * ``mean``: every vector is the mean of all the phrase's tokens.
    """
    if mode == "cycle":
        return [[i % k] for i in range(num_vectors)]
    if mode == "spread":
        return [[i * k // num_vectors] for i in range(num_vectors)]
    if mode == "mean":
        return [list(range(k))] * num_vectors
    raise ValueError(f"unknown init word mode {mode!r}")


def init_word_vectors(
    tokenizer,
    token_embedding: torch.Tensor,
    init_word: str,
    num_vectors: int,
    mode: str = "cycle",
    announce: bool = True,
) -> torch.Tensor:
    """Start vectors from ``--init_word`` laid over the vectors by ``mode`` (``init_token_plan``).

    As kohya does, a phrase whose token count is neither 1 nor the number of vectors gets a
    warning (its tokens are repeated or cut); a log line shows which token went where (once per
    run: ``announce`` is off for a family's second encoder, whose tokens are the same).
    """
    ids = tokenizer(init_word, add_special_tokens=False).input_ids
    if not ids:
        raise UserError(f"--init_word {init_word!r} has no tokens; give a word such as 'person' or 'style'")
    words = [w.removesuffix("</w>") for w in tokenizer.convert_ids_to_tokens(ids)]
    rows = token_embedding[torch.tensor(ids)].float()
    k = len(ids)
    plan = init_token_plan(k, num_vectors, mode)
    if announce and k > 1 and k != num_vectors and mode != "mean":
        logger.warning(
            "--init_word %r has %d tokens but --num_vectors_per_token is %d: the init words are %s "
            "(--init_word_mode %s)",
            init_word,
            k,
            num_vectors,
            "repeated" if k < num_vectors else "truncated",
            mode,
        )
    if announce and (k > 1 or num_vectors > 1):
        logger.info(
            "--init_word %r: %s",
            init_word,
            ", ".join(f"vector {i}: {'+'.join(words[j] for j in p)}" for i, p in enumerate(plan)),
        )
    return torch.stack([rows[p].mean(dim=0) for p in plan])


def init_word_outputs(
    tokenizer, encoder, init_word: str, num_vectors: int, mode: str = "cycle"
) -> torch.Tensor:
    """``--cross_init`` (CrossInit, arXiv 2312.15905): start from what the text encoder makes of the
    init word, its output states at the word's tokens (``[BOS] word [EOS]``, last layer after the
    final norm), laid over the vectors by ``mode``. The UNet was trained on such outputs, so the
    vectors start near the place the encoder maps them to."""
    ids = tokenizer(init_word, add_special_tokens=False).input_ids
    if not ids:
        raise UserError(f"--init_word {init_word!r} has no tokens; give a word such as 'person' or 'style'")
    tokens = torch.tensor([[tokenizer.bos_token_id, *ids, tokenizer.eos_token_id]], device=encoder.device)
    with torch.no_grad():
        states = encoder(tokens).last_hidden_state[0, 1 : 1 + len(ids)].float()
    return torch.stack([states[p].mean(dim=0) for p in init_token_plan(len(ids), num_vectors, mode)])


def initial_vectors(
    word: WordSettings,
    tokenizer,
    tables: dict[str, torch.Tensor],
    num_vectors: int,
    seed: int,
    family,
    encoders: list | None = None,
) -> dict[str, torch.Tensor]:
    """The start of each text encoder's rows (by embedding-file key): ``--weights`` (continue), else
    ``--init_word`` in each encoder's token table (with ``--cross_init``: in each of ``encoders``'
    outputs), else random vectors with the vocabulary's norm."""
    if word.weights:
        return continued_vectors(word.weights, tables, num_vectors, family)
    if word.init_word and word.cross_init:
        logger.info("--cross_init: the vectors start from the text encoder's output for %r", word.init_word)
        return {
            key: init_word_outputs(tokenizer, encoder, word.init_word, num_vectors, word.init_word_mode)
            for key, encoder in zip(tables, encoders)
        }
    if word.init_word:
        return {
            key: init_word_vectors(
                tokenizer, table, word.init_word, num_vectors, word.init_word_mode, announce=index == 0
            )
            for index, (key, table) in enumerate(tables.items())
        }
    logger.info("no --init_word: starting from random vectors with the vocabulary's mean norm")
    return {key: random_vectors(table, num_vectors, seed) for key, table in tables.items()}


def continued_vectors(
    path: str, tables: dict[str, torch.Tensor], num_vectors: int, family
) -> dict[str, torch.Tensor]:
    """``--weights``: an embedding file's rows for each text encoder, checked against the model
    (family, widths) and ``--num_vectors_per_token``."""
    loaded = load_embedding_file(path)
    widths = {key: int(table.shape[1]) for key, table in tables.items()}
    try:
        rows = rows_for_model(loaded, widths, family.name, path)
    except UserError as exc:
        raise UserError(f"--weights {exc}") from None
    found = next(iter(rows.values())).shape[0]
    if found != num_vectors:
        raise UserError(
            f"--weights {path}: {found} vectors, but --num_vectors_per_token is "
            f"{num_vectors}; use --num_vectors_per_token {found}"
        )
    return {key: vectors.float() for key, vectors in rows.items()}


def random_vectors(token_embedding: torch.Tensor, num_vectors: int, seed: int) -> torch.Tensor:
    """Without ``--init_word``: random directions with the vocabulary's mean row norm."""
    gen = torch.Generator().manual_seed(seed)
    vectors = torch.randn(num_vectors, token_embedding.shape[1], generator=gen)
    mean_norm = token_embedding.float().norm(dim=1).mean()
    return vectors / vectors.norm(dim=1, keepdim=True) * mean_norm


class SplicedTokenEmbedding(nn.Module):
    """A token lookup where ids below ``first_new_id`` read the frozen table and the rest read ``vectors``."""

    def __init__(self, frozen: nn.Embedding, vectors: torch.Tensor):
        super().__init__()
        self.frozen = frozen.requires_grad_(False)
        self.first_new_id = frozen.num_embeddings
        self.vectors = nn.Parameter(vectors.detach().clone().float())

    @property
    def weight(self) -> torch.Tensor:
        """The frozen table (for code that asks the embedding for its dtype or device)."""
        return self.frozen.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        is_new = (input_ids >= self.first_new_id).unsqueeze(-1)
        old = self.frozen(input_ids.clamp(max=self.first_new_id - 1))
        new = F.embedding((input_ids - self.first_new_id).clamp(min=0), self.vectors).to(old.dtype)
        return torch.where(is_new, new, old)


def splice_new_vectors(text_encoder, vectors: torch.Tensor) -> SplicedTokenEmbedding:
    """Put the trainable ``vectors`` into ``text_encoder``'s token lookup; return the splice."""
    frozen = text_encoder.get_input_embeddings()
    if isinstance(frozen, SplicedTokenEmbedding):
        frozen = frozen.frozen
    spliced = SplicedTokenEmbedding(frozen, vectors.to(frozen.weight.device))
    text_encoder.set_input_embeddings(spliced)
    return spliced


class NewWord:
    """The new word's trainable rows in each text encoder, by embedding-file key (``emb_params``;
    SDXL's ``clip_l`` and ``clip_g``): what the optimizer, the saves and the checks see."""

    def __init__(self, splices: dict[str, SplicedTokenEmbedding]):
        self.splices = splices
        self.vectors: dict[str, nn.Parameter] = {key: splice.vectors for key, splice in splices.items()}

    @classmethod
    def start(cls, model, tokenizer, word: WordSettings, num_vectors: int, seed: int) -> NewWord:
        """The word's start rows (``initial_vectors``) spliced into each of the model's text encoders."""
        tables = {
            key: encoder.get_input_embeddings().weight.detach()
            for key, encoder in zip(model.family.encoder_keys, model.text_encoders)
        }
        start = initial_vectors(word, tokenizer, tables, num_vectors, seed, model.family, model.text_encoders)
        return cls.splice_into(model.text_encoders, start)

    @classmethod
    def splice_into(cls, encoders: list, start: dict[str, torch.Tensor]) -> NewWord:
        """Each encoder's token lookup gets its start rows as trainable vectors."""
        return cls(
            {key: splice_new_vectors(encoder, rows) for encoder, (key, rows) in zip(encoders, start.items())}
        )

    @property
    def parameters(self) -> list[nn.Parameter]:
        return list(self.vectors.values())

    @property
    def num_vectors(self) -> int:
        return int(self.parameters[0].shape[0])

    def set_trainable(self, trainable: bool) -> None:
        """Frozen rows get no gradient, so the optimizer leaves them (and weight decay) alone and the
        text encoders run without recording a backward pass."""
        for vectors in self.parameters:
            vectors.requires_grad_(trainable)

    def snapshot(self) -> dict[str, torch.Tensor]:
        """A detached copy of every encoder's rows."""
        return {key: vectors.detach().clone() for key, vectors in self.vectors.items()}

    def norms(self) -> dict[str, torch.Tensor]:
        """Each vector's norm, by encoder key."""
        return {key: vectors.detach().float().norm(dim=1) for key, vectors in self.vectors.items()}

    def vocabulary_norms(self) -> dict[str, float]:
        """Each encoder's mean token norm: what an ordinary word weighs."""
        return {
            key: float(s.frozen.weight.detach().float().norm(dim=1).mean()) for key, s in self.splices.items()
        }
