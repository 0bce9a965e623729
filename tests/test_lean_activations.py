"""The lean GEGLU: the same outputs and gradients as autograd's, a third less kept for backward."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers.models.activations import GEGLU

from library.models.lean_activations import keep_less_for_backward
from tests.tiny_models import tiny_sdxl_components


def _bytes_kept_for_backward(run, model) -> int:
    """Bytes of the distinct storages, other than ``model``'s weights, that autograd keeps while
    ``run()`` builds its graph."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run()
    return sum(kept.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_geglu_gives_autograds_exact_outputs_and_gradients_and_keeps_a_third_less(dtype):
    torch.manual_seed(0)
    plain = GEGLU(32, 64).to(dtype).requires_grad_(False)
    lean = copy.deepcopy(plain)
    assert keep_less_for_backward(torch.nn.Sequential(lean)) == 1
    x = torch.randn(2, 10, 32, dtype=dtype, requires_grad=True)
    grad_out = torch.randn(2, 10, 64, dtype=dtype)

    outputs, grads = [], []
    for module in (plain, lean):
        y = module(x)
        outputs.append(y)
        grads.append(torch.autograd.grad(y, x, grad_out)[0])
    assert torch.equal(outputs[0], outputs[1])
    assert torch.equal(grads[0], grads[1])

    kept_plain = _bytes_kept_for_backward(lambda: plain(x), plain)
    kept_lean = _bytes_kept_for_backward(lambda: lean(x), lean)
    projection = 2 * 10 * 128 * x.element_size()
    assert kept_plain == projection * 3 // 2  # the projection and gelu(gate)
    assert kept_lean == projection


def test_in_a_unet_the_context_gradient_and_inference_are_unchanged_and_less_is_kept():
    unet = tiny_sdxl_components()[0].requires_grad_(False)
    lean = copy.deepcopy(unet)
    assert keep_less_for_backward(lean) > 0
    torch.manual_seed(1)
    latents = torch.randn(1, 4, 8, 8)
    context = torch.randn(1, 77, unet.config.cross_attention_dim, requires_grad=True)
    pooled_width = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
    added = {
        "text_embeds": torch.randn(1, pooled_width),
        "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]]),
    }

    def predict(model):
        return model(latents, torch.tensor([500]), context, added_cond_kwargs=added).sample

    grads = [torch.autograd.grad(predict(model).square().mean(), context)[0] for model in (unet, lean)]
    assert torch.equal(grads[0], grads[1])
    assert _bytes_kept_for_backward(lambda: predict(lean), lean) < _bytes_kept_for_backward(
        lambda: predict(unet), unet
    )
    with torch.no_grad():
        assert torch.equal(predict(unet), predict(lean))
