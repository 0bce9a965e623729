"""The new word's tokens and vectors: naming, initialisation, and training only the new rows."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel

from library.errors import UserError
from library.text.tokenizer import shipped_tokenizer
from library.training.new_word import (
    add_placeholder_tokens,
    init_word_vectors,
    random_vectors,
    splice_new_vectors,
)


@pytest.fixture
def tokenizer():
    return shipped_tokenizer(v2=False)


def tiny_text_encoder(vocab: int = 49408) -> CLIPTextModel:
    torch.manual_seed(0)
    config = CLIPTextConfig(
        vocab_size=vocab,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=1,
        max_position_embeddings=77,
    )
    return CLIPTextModel(config).eval()


def test_tokens_are_named_like_kohya_and_get_new_ids(tokenizer):
    ids = add_placeholder_tokens([tokenizer], "mychar", 3)
    assert ids == [49408, 49409, 49410]
    assert tokenizer.convert_ids_to_tokens(ids) == ["mychar", "mychar1", "mychar2"]
    assert tokenizer("a mychar mychar1 mychar2").input_ids[2:5] == ids


def test_existing_word_is_refused_with_a_free_suggestion(tokenizer):
    with pytest.raises(UserError) as info:
        add_placeholder_tokens([tokenizer], "cat", 2)
    message = str(info.value)
    assert "'cat' already exists" in message and "--token_string catx" in message
    assert len(tokenizer) == 49408  # nothing was added


def test_too_many_vectors_is_refused(tokenizer):
    with pytest.raises(UserError, match="between 1 and 75"):
        add_placeholder_tokens([tokenizer], "mychar", 76)


def test_one_init_token_is_copied_to_every_vector(tokenizer):
    table = torch.randn(49408, 8)
    vectors = init_word_vectors(tokenizer, table, "cute", 4)
    cute = tokenizer("cute", add_special_tokens=False).input_ids[0]
    assert all(torch.equal(v, table[cute]) for v in vectors)


def _which_tokens(vectors, table, ids) -> list[int]:
    """For each vector, the position in ``ids`` of the token row it equals (-1: none)."""
    return [next((j for j, t in enumerate(ids) if torch.equal(v, table[t])), -1) for v in vectors]


def test_phrase_is_cycled_over_the_vectors_by_default_with_kohyas_warning(tokenizer, caplog):
    """kohya: vector i starts as token i % k ("hello world" over 3 vectors: hello, world, hello)."""
    table = torch.randn(49408, 8)
    ids = tokenizer("hello world", add_special_tokens=False).input_ids
    with caplog.at_level(logging.INFO):
        vectors = init_word_vectors(tokenizer, table, "hello world", 3)
    assert _which_tokens(vectors, table, ids) == [0, 1, 0]
    assert "repeated" in caplog.text and "vector 2: hello" in caplog.text
    long = tokenizer("a big red dog", add_special_tokens=False).input_ids
    caplog.clear()
    with caplog.at_level(logging.INFO):
        vectors = init_word_vectors(tokenizer, table, "a big red dog", 2)
    assert _which_tokens(vectors, table, long) == [0, 1] and "truncated" in caplog.text


def test_phrase_of_as_many_tokens_as_vectors_gives_no_warning(tokenizer, caplog):
    table = torch.randn(49408, 8)
    with caplog.at_level(logging.WARNING):
        init_word_vectors(tokenizer, table, "red dog", 2)
    assert "repeated" not in caplog.text and "truncated" not in caplog.text


def test_spread_mode_keeps_the_phrase_in_order(tokenizer):
    """The WebUI's rule: vector i is token i * k // N."""
    table = torch.randn(49408, 8)
    ids = tokenizer("hello world", add_special_tokens=False).input_ids
    vectors = init_word_vectors(tokenizer, table, "hello world", 3, mode="spread")
    assert _which_tokens(vectors, table, ids) == [0, 0, 1]
    long = tokenizer("a big red dog", add_special_tokens=False).input_ids
    vectors = init_word_vectors(tokenizer, table, "a big red dog", 2, mode="spread")
    assert _which_tokens(vectors, table, long) == [0, 2]


def test_mean_mode_starts_every_vector_from_the_phrase_mean(tokenizer):
    table = torch.randn(49408, 8)
    ids = tokenizer("a big red dog", add_special_tokens=False).input_ids
    vectors = init_word_vectors(tokenizer, table, "a big red dog", 3, mode="mean")
    assert all(torch.allclose(v, table[ids].mean(0)) for v in vectors)


def test_random_start_has_the_vocabulary_norm():
    table = torch.randn(1000, 8)
    vectors = random_vectors(table, 3, seed=1)
    assert torch.allclose(vectors.norm(dim=1), table.norm(dim=1).mean().expand(3))
    assert torch.equal(vectors, random_vectors(table, 3, seed=1))


def test_splice_trains_only_the_new_rows_and_keeps_old_rows_bit_identical(tokenizer):
    encoder = tiny_text_encoder()
    original = encoder.get_input_embeddings().weight.detach().clone()
    ids = add_placeholder_tokens([tokenizer], "mychar", 2)
    prompt = tokenizer(
        ["a photo of mychar"], padding="max_length", max_length=77, return_tensors="pt"
    ).input_ids
    plain = tokenizer(["a photo of a"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        before_plain = encoder(plain)[0]
    encoder.requires_grad_(False)
    spliced = splice_new_vectors(encoder, torch.randn(2, 16))
    optimizer = torch.optim.AdamW([spliced.vectors], lr=0.1)
    start = spliced.vectors.detach().clone()
    for _ in range(3):
        encoder(prompt)[0].pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    assert not torch.equal(spliced.vectors.detach(), start)
    assert torch.equal(encoder.get_input_embeddings().weight, original)
    with torch.no_grad():
        assert torch.equal(encoder(plain)[0], before_plain)  # prompts without the word are unchanged
    # optimizer state: exactly two fp32 slots of N x dim
    state = optimizer.state[spliced.vectors]
    assert state["exp_avg"].shape == (2, 16) and state["exp_avg_sq"].shape == (2, 16)
    assert ids == [49408, 49409]


def test_splice_reads_new_vectors_for_new_ids():
    encoder = tiny_text_encoder()
    vectors = torch.randn(2, 16)
    spliced = splice_new_vectors(encoder, vectors)
    looked_up = spliced(torch.tensor([[0, 49408, 49409]]))
    assert torch.equal(looked_up[0, 1:], vectors)
    assert torch.equal(looked_up[0, 0], spliced.frozen.weight[0])


def test_half_precision_encoder_keeps_fp32_vectors():
    encoder = tiny_text_encoder().to(torch.bfloat16)
    spliced = splice_new_vectors(encoder, torch.randn(2, 16))
    assert spliced.vectors.dtype == torch.float32
    out = encoder(torch.tensor([[49406, 49408, 49407]]))[0]
    out.float().sum().backward()
    assert spliced.vectors.grad is not None and spliced.vectors.grad.dtype == torch.float32


@pytest.mark.parametrize(
    "text, count",
    [
        ("mychar4x and mychar4, 1girl", 1),  # a suffix glued on: not the word
        ("supermychar4 girl", 0),  # a prefix
        ("my_mychar4 girl", 0),  # an underscore is part of a word
        ("(mychar4:1.2), mychar4's hat, mychar4.", 3),  # punctuation around it: the word
        ("MyChar4 at night", 1),  # the tokenizer lower-cases, so does the rule
    ],
)
def test_the_token_string_is_matched_only_as_a_whole_word(tokenizer, text, count):
    ids = add_placeholder_tokens([tokenizer], "mychar4", 1)
    assert tokenizer(text, add_special_tokens=False).input_ids.count(ids[0]) == count


def test_a_token_string_that_is_a_word_in_other_case_is_refused(tokenizer):
    """The generator compares lower-cased, so the trainer must too (or its file would be refused there)."""
    with pytest.raises(UserError, match="'Dog' already exists"):
        add_placeholder_tokens([tokenizer], "Dog", 1)
