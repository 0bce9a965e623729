"""What keeping frozen weights in exact half precision costs in time: ``python -m bench.exact_half``.

The trainer keeps the frozen layers' fp16 weights and widens them to fp32 as each layer runs
(``library.models.exact_half_weights``). This times a TI step's two model passes (the UNet forward +
backward to the text conditioning, and the text encoder forward + backward to new vectors)
with the plain fp32 models and the half-stored ones, loaded from the same full-size SD 1.5 file,
in one process and alternating A B / B A, so a drifting machine hits both alike. Reported: the
median of the paired ratios half-stored / plain, and the weights' bytes of each.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from bench.checkpoint import ensure_checkpoint
from bench.machine import describe_machine
from library.host_memory import keep_freed_memory_in_process
from library.models.loading import load_sd_model
from library.training.new_word import splice_new_vectors


def model_pass(model, size: int, batch: int):
    """One call = the UNet and text encoder work of a TI step (no optimizer, no data)."""
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


def weight_bytes(model) -> int:
    return sum(
        p.numel() * p.element_size() for part in (model.unet, model.text_encoder) for p in part.parameters()
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="a .safetensors to time instead of the random SD 1.5 one")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=4, help="paired rounds (A B, then B A, ...)")
    args = parser.parse_args(argv)
    checkpoint = args.checkpoint or ensure_checkpoint()
    machine = describe_machine()
    print(
        f"{machine['date']}  {machine['cpu']['model']}  torch {machine['torch']}  {args.size} px, batch {args.batch}"
    )
    models = {
        name: load_sd_model(checkpoint, with_vae=False, exact_half_storage=name == "half-stored")
        for name in ("plain", "half-stored")
    }
    keep_freed_memory_in_process()  # as the trainer does on a CPU once the model is loaded
    calls = {name: model_pass(model, args.size, args.batch) for name, model in models.items()}
    for call in calls.values():
        call()  # warm-up: first-call kernels and allocations
    seconds: dict[str, list[float]] = {name: [] for name in calls}
    for round_ in range(args.rounds):
        order = ("plain", "half-stored") if round_ % 2 == 0 else ("half-stored", "plain")
        for name in order:
            seconds[name].append(calls[name]())
    ratios = [h / p for h, p in zip(seconds["half-stored"], seconds["plain"], strict=True)]
    for name, model in models.items():
        times = ", ".join(f"{s:.2f}" for s in seconds[name])
        print(f"{name:12s} weights {weight_bytes(model) / 1e9:.2f} GB   s/pass: {times}")
    print(
        f"half-stored / plain: median {statistics.median(ratios):.3f} (rounds {', '.join(f'{r:.3f}' for r in ratios)})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
