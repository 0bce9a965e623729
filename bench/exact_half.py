"""What keeping frozen weights in exact half precision costs in time: ``python -m bench.exact_half``.

The trainer keeps the frozen layers' fp16 weights and widens them to fp32 as each layer runs
(``library.models.exact_half_weights``). This times a TI step's model passes with the model as
the trainer holds it and with chosen layers switched to fp32 copies of their weights, in one
process: the model is loaded once, half-stored, and every pass runs on the same weights in the
same place, only the layers' storage differs. The settings alternate within each round, in
turns reversed from round to round, so a drifting machine hits all alike. Reported per
setting: the extra memory its fp32 copies take, the seconds of each pass, and the median of
the per-round ratios to the half-stored model.

The pass: SD 1.x/2.x, the text encoder forward + backward to a new vector and the UNet forward
+ backward to the text conditioning; SDXL (``--family sdxl``, the 6.9 GB random file), the UNet
forward + backward to both conditionings (the two text encoders stay half-stored), which keeps
one process within 24 GB with every UNet weight also in fp32.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch import nn

from bench.checkpoint import SDXL_CHECKPOINT, ensure_checkpoint
from bench.machine import describe_machine, preloaded_allocator
from library.allocator import restart_under_installed_allocator
from library.host_memory import keep_freed_memory_in_process
from library.models.exact_half_weights import HalfStoredConv2d, HalfStoredLinear
from library.models.loading import load_sd_model
from library.training.new_word import splice_new_vectors

# Which half-stored layers a setting keeps in fp32, by the layer's dotted name and class.
LAYER_GROUPS: dict[str, Callable[[str, nn.Module], bool]] = {
    "all": lambda name, layer: True,  # what --highvram holds
    "linear": lambda name, layer: isinstance(layer, nn.Linear),
    "conv": lambda name, layer: isinstance(layer, nn.Conv2d),
    "feed_forward": lambda name, layer: ".ff." in name,
    "cross_attention_kv": lambda name, layer: ".attn2.to_k" in name or ".attn2.to_v" in name,
}
HALF_STORED = "none"  # the setting that keeps every layer as the trainer does


class WeightSwitch:
    """Moves chosen half-stored layers onto fp32 copies of their weights, and back, in place."""

    def __init__(self, parts: dict[str, nn.Module]) -> None:
        self.layers = {
            f"{part}.{name}": layer
            for part, module in parts.items()
            for name, layer in module.named_modules()
            if isinstance(layer, (HalfStoredLinear, HalfStoredConv2d))
        }
        self.half = {name: layer.weight for name, layer in self.layers.items()}
        self.stored_class = {name: type(layer) for name, layer in self.layers.items()}
        self.fp32: dict[str, nn.Parameter] = {}

    def chosen(self, group: str) -> list[str]:
        if group == HALF_STORED:
            return []
        keep = LAYER_GROUPS[group]
        return [name for name, layer in self.layers.items() if keep(name, layer)]

    def extra_bytes(self, group: str) -> int:
        """What the group's fp32 copies take beyond the half weights they stand in for."""
        return sum(
            self.half[name].numel() * (4 - self.half[name].element_size()) for name in self.chosen(group)
        )

    def use(self, group: str) -> None:
        in_fp32 = set(self.chosen(group))
        for name, layer in self.layers.items():
            if name in in_fp32:
                if name not in self.fp32:
                    self.fp32[name] = nn.Parameter(self.half[name].detach().float(), requires_grad=False)
                layer.weight = self.fp32[name]
                layer.__class__ = nn.Linear if self.stored_class[name] is HalfStoredLinear else nn.Conv2d
            else:
                layer.weight = self.half[name]
                layer.__class__ = self.stored_class[name]


def sd_pass(model, size: int, batch: int) -> Callable[[], float]:
    """SD 1.x/2.x: the text encoder and UNet work of a TI step (no optimizer, no data)."""
    unet, text_encoder = model.unet.requires_grad_(False), model.text_encoder.requires_grad_(False)
    first_new = text_encoder.get_input_embeddings().num_embeddings
    vectors = splice_new_vectors(text_encoder, torch.randn(1, text_encoder.config.hidden_size)).vectors
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, first_new, (batch, 77), generator=generator)
    ids[:, 4] = first_new
    latents = torch.randn(batch, 4, size // 8, size // 8, generator=generator)
    timesteps = torch.randint(0, 1000, (batch,), generator=generator)

    def call() -> float:
        started = time.perf_counter()
        hidden = text_encoder(ids).last_hidden_state
        unet(latents, timesteps, hidden).sample.square().mean().backward()
        vectors.grad = None
        return time.perf_counter() - started

    return call


def sdxl_unet_pass(model, size: int, batch: int) -> Callable[[], float]:
    """SDXL: the UNet forward + backward to the text context and the pooled text embedding."""
    unet = model.unet.requires_grad_(False)  # trainable biases would add every weight gradient
    config = unet.config
    pooled_width = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(batch, 4, size // 8, size // 8, generator=generator)
    timesteps = torch.randint(0, 1000, (batch,), generator=generator)
    context = torch.randn(batch, 77, config.cross_attention_dim, generator=generator, requires_grad=True)
    pooled = torch.randn(batch, pooled_width, generator=generator, requires_grad=True)
    time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=torch.float32).repeat(batch, 1)

    def call() -> float:
        started = time.perf_counter()
        conditioning = {"text_embeds": pooled, "time_ids": time_ids}
        unet(latents, timesteps, context, added_cond_kwargs=conditioning).sample.square().mean().backward()
        context.grad = pooled.grad = None
        return time.perf_counter() - started

    return call


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=["sd1", "sdxl"], default="sd1")
    parser.add_argument("--checkpoint", help="a .safetensors to time instead of the family's random one")
    parser.add_argument("--size", type=int, default=None, help="pixels (default: 256 SD 1.x, 512 SDXL)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=4, help="rounds; each runs every setting once")
    parser.add_argument(
        "--fp32",
        nargs="+",
        choices=sorted(LAYER_GROUPS),
        default=["all"],
        help="settings to compare with the half-stored model: which layers keep fp32 weights",
    )
    args = parser.parse_args(argv)
    restart_under_installed_allocator()  # as the trainer does: the same allocator as a training run
    sdxl = args.family == "sdxl"
    size = args.size or (512 if sdxl else 256)
    checkpoint = args.checkpoint or (
        ensure_checkpoint(SDXL_CHECKPOINT, family="sdxl") if sdxl else ensure_checkpoint()
    )
    machine = describe_machine()
    print(
        f"{machine['date']}  {machine['cpu']['model']}  torch {machine['torch']}  allocator "
        f"{preloaded_allocator()}  {args.family} {size} px, batch {args.batch}"
    )
    model = load_sd_model(checkpoint, with_vae=False, exact_half_storage=True)
    keep_freed_memory_in_process()  # as the trainer does on a CPU once the model is loaded
    parts = {"unet": model.unet} if sdxl else {"unet": model.unet, "text_encoder": model.text_encoder}
    switch = WeightSwitch(parts)
    call = (sdxl_unet_pass if sdxl else sd_pass)(model, size, args.batch)
    settings = [HALF_STORED, *args.fp32]
    seconds: dict[str, list[float]] = {setting: [] for setting in settings}
    for round_ in range(args.rounds):
        for setting in settings if round_ % 2 == 0 else reversed(settings):
            switch.use(setting)
            call()  # the first pass after a switch warms the new layout up; the second is timed
            seconds[setting].append(call())
    print("| fp32 layers | extra memory | s per pass | × half-stored (median of rounds) |\n|---|---|---|---|")
    for setting in settings:
        ratios = [s / h for s, h in zip(seconds[setting], seconds[HALF_STORED], strict=True)]
        print(
            f"| {setting} | {switch.extra_bytes(setting) / 1e9:.2f} GB "
            f"| {', '.join(f'{s:.2f}' for s in seconds[setting])} | {statistics.median(ratios):.3f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
