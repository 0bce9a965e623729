"""The UNet's gated feed-forward (GEGLU) keeping one tensor for backward instead of two.

Why: every transformer block of the UNet ends in ``value * gelu(gate)``, where ``value`` and
``gate`` are the two halves of one projection. Autograd keeps the projection (for the product's
and gelu's gradients) and also ``gelu(gate)``, half the projection's size: on SDXL at 512 px the
feed-forwards keep more for the backward than any other kind of layer. ``gelu(gate)`` is cheap
to compute again from the projection, so here the backward recomputes it and the feed-forwards
keep a third less. The gradients are the same operations on the same numbers as autograd's
(``mul``'s and ``gelu_backward``), so they are bit-identical; the forward is unchanged.
"""

from __future__ import annotations

import types
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

if TYPE_CHECKING:
    from diffusers.models.activations import GEGLU


class _GatedGelu(torch.autograd.Function):
    """``value * gelu(gate)`` for ``value, gate = projected.chunk(2, -1)``, keeping only ``projected``."""

    @staticmethod
    def forward(ctx, projected: torch.Tensor) -> torch.Tensor:
        value, gate = projected.chunk(2, dim=-1)
        ctx.save_for_backward(projected)
        return value * F.gelu(gate)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (projected,) = ctx.saved_tensors
        value, gate = projected.chunk(2, dim=-1)
        grad_value = grad * F.gelu(gate)
        grad_gate = torch.ops.aten.gelu_backward(grad * value, gate)
        return torch.cat([grad_value, grad_gate], dim=-1)


def _lean_forward(self: GEGLU, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    projected = self.proj(hidden_states)
    if not projected.requires_grad:  # nothing to keep: inference, or no gradient reaches here
        value, gate = projected.chunk(2, dim=-1)
        return value * F.gelu(gate)
    return _GatedGelu.apply(projected)


def keep_less_for_backward(model: nn.Module) -> int:
    """Give every diffusers ``GEGLU`` of ``model`` the lean backward; returns how many."""
    from diffusers.models.activations import GEGLU  # imported here: option parsing imports this module

    count = 0
    for module in model.modules():
        if type(module) is GEGLU:
            module.forward = types.MethodType(_lean_forward, module)
            count += 1
    return count
