"""The vectors' start and norm controls (library/training/steering.py, --cross_init): the rules,
on small tensors and a tiny text encoder; the CLI run is in test_train_cli.py."""

from __future__ import annotations

import pytest
import torch

from library.training.new_word import init_word_outputs, init_word_vectors
from library.training.steering import SteeringSettings, VectorSteering, tangent_part

KEY = "emb_params"


def steering(rows: torch.Tensor, **settings) -> tuple[VectorSteering, dict[str, torch.nn.Parameter]]:
    """Controls over ``rows`` as they start; the vocabulary's mean norm is 0.5."""
    vectors = {KEY: torch.nn.Parameter(rows.clone())}
    start_norms = {KEY: rows.norm(dim=1)}
    return VectorSteering.for_run(
        SteeringSettings(**settings), {KEY: rows.clone()}, start_norms, {KEY: 0.5}
    ), vectors


def test_the_tangent_part_is_orthogonal_to_each_row_and_only_the_radial_part_is_removed():
    rows, gradient = torch.randn(3, 8), torch.randn(3, 8)
    tangent = tangent_part(gradient, rows)
    assert torch.allclose((tangent * rows).sum(dim=1), torch.zeros(3), atol=1e-5)
    removed = gradient - tangent
    unit = rows / rows.norm(dim=1, keepdim=True)
    assert torch.allclose(removed, (gradient * unit).sum(dim=1, keepdim=True) * unit, atol=1e-6)


def test_direction_only_starts_and_stays_on_the_vocabularys_norm_and_a_step_turns_the_vector():
    rows = torch.randn(2, 8)
    control, vectors = steering(rows, direction_only=True)
    control.place(vectors)
    assert torch.allclose(vectors[KEY].norm(dim=1), torch.full((2,), 0.5))
    vectors[KEY].grad = torch.randn(2, 8)
    control.before_step(vectors)
    assert torch.allclose((vectors[KEY].grad * vectors[KEY]).sum(dim=1), torch.zeros(2), atol=1e-6)
    before = vectors[KEY].detach().clone()
    with torch.no_grad():
        vectors[KEY].sub_(0.1 * vectors[KEY].grad.sign())  # an Adam-like step leaves the sphere
    control.after_step(vectors)
    assert torch.allclose(vectors[KEY].norm(dim=1), torch.full((2,), 0.5))
    assert not torch.allclose(vectors[KEY], before)


def test_direction_only_at_the_init_norm_holds_each_vectors_starting_norm():
    rows = torch.tensor([[3.0, 4.0], [0.0, 2.0]])
    control, vectors = steering(rows, direction_only=True, direction_norm="init")
    with torch.no_grad():
        vectors[KEY].mul_(7)
    control.after_step(vectors)
    assert torch.allclose(vectors[KEY].norm(dim=1), torch.tensor([5.0, 2.0]))


def test_the_pull_adds_the_gradient_of_its_penalty():
    """--init_pull W adds the gradient of W * mean over vectors of ||v - v0||^2."""
    rows = torch.randn(3, 4)
    control, vectors = steering(rows, init_pull=0.7)
    with torch.no_grad():
        vectors[KEY].add_(torch.randn(3, 4))
    moved = vectors[KEY].detach().clone().requires_grad_(True)
    (0.7 * ((moved - rows) ** 2).sum(dim=1).mean()).backward()
    vectors[KEY].grad = torch.zeros(3, 4)
    control.before_step(vectors)
    assert torch.allclose(vectors[KEY].grad, moved.grad, atol=1e-6)


def test_without_controls_nothing_changes():
    rows = torch.randn(2, 4)
    control, vectors = steering(rows)
    vectors[KEY].grad = gradient = torch.randn(2, 4)
    control.place(vectors)
    control.before_step(vectors)
    with torch.no_grad():
        vectors[KEY].mul_(3)
    control.after_step(vectors)
    assert torch.equal(vectors[KEY].grad, gradient) and torch.equal(vectors[KEY], rows * 3)


@pytest.fixture(scope="module")
def tiny_encoder():
    from transformers import CLIPTextConfig, CLIPTextModel

    from library.text.tokenizer import shipped_tokenizer

    torch.manual_seed(0)
    config = CLIPTextConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2)
    return shipped_tokenizer(v2=False), CLIPTextModel(config).eval()


def test_cross_init_starts_from_the_encoders_output_at_the_words_tokens(tiny_encoder):
    tokenizer, encoder = tiny_encoder
    ids = tokenizer("cute dog", add_special_tokens=False).input_ids
    assert len(ids) == 2
    with torch.no_grad():  # the words inside a longer prompt: causal attention sees only what precedes
        states = encoder(torch.tensor([[tokenizer.bos_token_id, *ids, 320, 321]])).last_hidden_state[0]
    start = init_word_outputs(tokenizer, encoder, "cute dog", 3)  # cycled like --init_word_mode cycle
    assert torch.allclose(start, states[[1, 2, 1]], atol=1e-5)
    mean = init_word_outputs(tokenizer, encoder, "cute dog", 2, mode="mean")
    assert torch.allclose(mean, states[1:3].mean(dim=0).expand(2, -1), atol=1e-5)
    rows = init_word_vectors(tokenizer, encoder.get_input_embeddings().weight.detach(), "cute dog", 3)
    assert not torch.allclose(start, rows)  # not the token rows
