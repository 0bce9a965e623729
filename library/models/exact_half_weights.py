"""Frozen layers that keep their weights in half precision and compute in fp32, exactly.

Why: Textual Inversion freezes every weight of the text encoder and the UNet. A full-precision
(fp32) run on a CPU holds them as fp32, 3.9 GB for SD 1.5, although most checkpoints store them
as fp16: half of that memory holds zeros that the upcast appended. Here each frozen ``Conv2d`` and
``Linear`` whose weight is exactly representable in fp16 (or bf16) keeps it in that narrower type,
and casts it back to fp32 into one shared scratch buffer when the layer runs, forward and
backward. The numbers the layer computes with are the same fp32 numbers as before, so the results
are bit-identical; only the storage is narrower (SD 1.5: 1.9 GB less).

The layers also save nothing for backward: a frozen layer's input gradient needs the weight, not
the input (PyTorch's convolution keeps its input all the same). The cast costs a copy of each
weight per forward and per backward: memory traffic that shows on a CPU when layers wait on
memory (an SD 1.5 step at 256 px, batch 1 takes about 1.14x as long) and hides behind the
arithmetic at 512 px (docs/benchmarks.md, "Memory"). ``--highvram`` turns this off.

Not diffusers' layerwise casting (``enable_layerwise_casting``): it casts the module's parameters
in place before each call, so autograd keeps the fp32 copies of every layer until the backward
and training memory does not shrink.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

STORAGE_DTYPES = (torch.float16, torch.bfloat16)  # tried in this order; the first exact one is kept
# Smaller weights stay fp32: the custom autograd call costs a fixed few microseconds per layer,
# which on a small model (the 16 MB shapes demo) made a step 1.27x slower to save 10 MB. From
# 2^18 elements (0.5 MiB saved per layer) SD 1.5 keeps 99 % of its saving.
MIN_NARROWED_ELEMENTS = 1 << 18


class _Scratch:
    """One reusable fp32 buffer per device, as large as the largest stored weight.

    Allocating a fresh 100 MB tensor for every cast costs page faults (about 5x the copy itself on
    the CPU); layers run one at a time, so one buffer serves them all.
    """

    def __init__(self) -> None:
        self.buffers: dict[torch.device, torch.Tensor] = {}

    def upcast(self, weight: torch.Tensor) -> torch.Tensor:
        buffer = self.buffers.get(weight.device)
        if buffer is None or buffer.numel() < weight.numel():
            buffer = torch.empty(weight.numel(), dtype=torch.float32, device=weight.device)
            self.buffers[weight.device] = buffer
        view = buffer[: weight.numel()].view(weight.shape)
        view.copy_(weight)
        return view


_scratch = _Scratch()


class _Conv2dFromHalf(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: nn.Conv2d) -> torch.Tensor:
        ctx.layer, ctx.input_shape = layer, x.shape
        weight = _scratch.upcast(layer.weight)
        return F.conv2d(x, weight, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        layer = ctx.layer
        weight = _scratch.upcast(layer.weight)
        grad_input = torch.nn.grad.conv2d_input(
            ctx.input_shape, weight, grad, layer.stride, layer.padding, layer.dilation, layer.groups
        )
        return grad_input, None


class _LinearFromHalf(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
        ctx.layer = layer
        return F.linear(x, _scratch.upcast(layer.weight), layer.bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        weight = _scratch.upcast(ctx.layer.weight)
        flat = grad.reshape(-1, grad.shape[-1]).mm(weight)  # what autograd does for a linear layer
        return flat.view(*grad.shape[:-1], weight.shape[1]), None


def _refuse_trainable(layer: nn.Module) -> None:
    if layer.weight.requires_grad:  # its gradient would silently never be computed
        raise RuntimeError(f"{type(layer).__name__}: a half-stored weight is frozen; it cannot be trained")


class HalfStoredConv2d(nn.Conv2d):
    """A frozen ``Conv2d`` whose weight is stored in fp16/bf16 and used as fp32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _refuse_trainable(self)
        return _Conv2dFromHalf.apply(x, self)


class HalfStoredLinear(nn.Linear):
    """A frozen ``Linear`` whose weight is stored in fp16/bf16 and used as fp32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _refuse_trainable(self)
        return _LinearFromHalf.apply(x, self)


_STORED_CLASS = {nn.Conv2d: HalfStoredConv2d, nn.Linear: HalfStoredLinear}


def half_storable_layers(model: nn.Module, compute_dtype: torch.dtype) -> dict[str, nn.Module]:
    """The frozen ``Conv2d``/``Linear`` layers of ``model`` (by name) that may store a half weight.

    Only for fp32 compute (a half weight is no saving in a half-precision run), only weights of
    at least ``MIN_NARROWED_ELEMENTS``, and never the model's first parameter: diffusers and
    transformers read a model's dtype from it. The caller promises the layers stay frozen (the
    stored layers refuse to run with a trainable weight).
    """
    if compute_dtype != torch.float32:
        return {}
    first_weight = next(model.parameters(), None)
    layers = {}
    for name, module in model.named_modules():
        if type(module) not in _STORED_CLASS:  # subclasses have forwards of their own
            continue
        if isinstance(module, nn.Conv2d) and module.padding_mode != "zeros":
            continue
        if module.weight is not first_weight and module.weight.numel() >= MIN_NARROWED_ELEMENTS:
            layers[name] = module
    return layers


def exact_storage_dtype(weight: torch.Tensor) -> torch.dtype | None:
    """The first half-precision dtype that holds every value of ``weight`` exactly, or None.

    A weight read from an fp16 (bf16) file is kept as it is; an fp32 one qualifies only if no
    value changes on the way through the narrower type and back (never for NaN or overflow).
    """
    if weight.dtype in STORAGE_DTYPES:
        return weight.dtype
    for dtype in STORAGE_DTYPES:
        if torch.equal(weight.to(dtype).to(weight.dtype), weight):
            return dtype
    return None


def use_stored_half_weight(layer: nn.Module) -> None:
    """Make ``layer`` (from ``half_storable_layers``, weight already narrowed) compute in fp32."""
    layer.__class__ = _STORED_CLASS[type(layer)]


def store_weights_in_exact_half(model: nn.Module, compute_dtype: torch.dtype = torch.float32) -> int:
    """Narrow every eligible fp32 layer weight of a built ``model`` where exact; the bytes saved.

    For models built by a library loader (diffusers folders); single files are narrowed as they are
    read (``library.models.loading``), so their fp32 copy never exists.
    """
    saved = 0
    for layer in half_storable_layers(model, compute_dtype).values():
        weight = layer.weight.detach()
        dtype = exact_storage_dtype(weight) if weight.dtype == torch.float32 else None
        if dtype is None:
            continue
        layer.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
        use_stored_half_weight(layer)
        saved += weight.numel() * (weight.element_size() - layer.weight.element_size())
    return saved
