"""Build the project's small real model: a Stable Diffusion 1.x-layout model that draws shapes.

    python -m tools.build_shapes_model              # the committed model: about 55 min, 2 CPU cores
    python -m tools.build_shapes_model --quick      # a few minutes and a poor model: checks the script

The pictures and captions are those of ``tools/shapes.py``. Three stages, each a small, plain
diffusion training loop (no tricks beyond the ones named):

1. **VAE** (``AutoencoderKL``, 4x down to 4 x 16 x 16 latents) learns to reconstruct the
   pictures. Its latents are then rescaled, exactly, inside the network (the mean half of
   ``quant_conv`` and the input of ``post_quant_conv``), so that SD 1.x's scaling factor
   0.18215, which every SD tool assumes, gives them unit variance.
2. **Text encoder and UNet** learn together to predict the noise of SD 1.x's schedule (1000
   steps, scaled-linear betas, epsilon prediction): a narrow ``CLIPTextModel`` over the shipped
   CLIP vocabulary (trained jointly, so a word means the same wherever it stands in a caption)
   and a ``UNet2DConditionModel`` with cross-attention. Captions are dropped 10 % of the time
   so that classifier-free guidance works; the loss is weighted by min-SNR (gamma 5), which
   speeds up training; the weights' exponential moving average is what gets saved.
3. **Export and check**: one fp16 single-file checkpoint in the LDM key layout, read back
   through the trainer's own loader (exactly the path a downloaded SD 1.5 file takes), then
   judged: every named shape in every colour, with fixed seeds.

Everything is a function of ``--seed`` (numpy and torch generators passed explicitly), so a
rebuild on the same machine and library versions gives the same file.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

from library.ldm_export import sd1_checkpoint
from library.models import SDModel, base_config, load_sd_model
from library.tokenizer import shipped_tokenizer
from tools import shapes
from tools.concept_eval import base_model_accuracy

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = ROOT / "models" / "shapes-sd1.safetensors"
SCALING_FACTOR = base_config("sd1")["vae"]["scaling_factor"]  # 0.18215, what every SD tool assumes


@dataclass(frozen=True)
class BuildConfig:
    seed: int = 0
    pictures: int = 12_000
    vae_steps: int = 800
    vae_batch: int = 32
    vae_crop: int = 32  # the VAE is convolutional: it learns on crops, 4x cheaper than whole pictures
    vae_lr: float = 2e-3
    kl_weight: float = 1e-6
    steps: int = 3200  # text encoder + UNet
    batch: int = 64
    lr: float = 1e-3
    warmup: int = 100
    caption_dropout: float = 0.1
    min_snr_gamma: float = 5.0
    ema_decay: float = 0.999
    text_width: int = 64
    text_layers: int = 3
    unet_channels: tuple[int, ...] = (64, 64, 128)
    vae_channels: tuple[int, ...] = (64, 64, 64)
    eval_images: int = 8  # per shape x colour
    progress_every: int = 1000  # judge the averaged weights on one picture per shape x colour


QUICK = BuildConfig(pictures=1000, vae_steps=60, steps=60, eval_images=2, progress_every=30)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# ---------------------------------------------------------------------------------------------
# the pictures


def render_pictures(count: int, rng: np.random.Generator) -> tuple[list[shapes.Scene], torch.Tensor]:
    """``count`` random scenes and their pictures as uint8 ``[count, 3, 64, 64]``."""
    scenes = [shapes.random_scene(rng) for _ in range(count)]
    pixels = np.stack([np.asarray(shapes.render(scene)) for scene in scenes])
    return scenes, torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()


def to_model_range(pixels: torch.Tensor) -> torch.Tensor:
    return pixels.float() / 127.5 - 1.0


def warmup_cosine(step: int, total: int, warmup: int) -> float:
    """The learning-rate factor: linear warm-up, then a cosine down to 0."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


# ---------------------------------------------------------------------------------------------
# 1. the VAE


def make_vae(config: BuildConfig) -> AutoencoderKL:
    """64 channels at every level, although 32 would be cheaper: SD's GroupNorm has 32 groups, and with
    32 channels each channel is normalised on its own, which loses absolute colour (a 32-channel VAE
    turned yellow on white into orange in 9 % of reconstructions; this one keeps 99 % right)."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=config.vae_channels,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1,
        norm_num_groups=32,
        sample_size=shapes.SIZE,
        scaling_factor=SCALING_FACTOR,
    )


def train_vae(pixels: torch.Tensor, config: BuildConfig, generator: torch.Generator) -> AutoencoderKL:
    """Reconstruction (MSE) plus a very small KL term that keeps the latents bounded."""
    vae = make_vae(config).train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, config.vae_steps, config.warmup)
    )
    for step in range(config.vae_steps):
        index = torch.randint(len(pixels), (config.vae_batch,), generator=generator)
        top, left = torch.randint(shapes.SIZE - config.vae_crop + 1, (2,), generator=generator).tolist()
        images = to_model_range(pixels[index, :, top : top + config.vae_crop, left : left + config.vae_crop])
        posterior = vae.encode(images).latent_dist
        latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        reconstruction = vae.decode(latents).sample
        loss = F.mse_loss(reconstruction, images) + config.kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == config.vae_steps - 1:
            log(f"vae step {step}: loss {loss.item():.5f}")
    return vae.eval()


@torch.no_grad()
def encode_means(vae: AutoencoderKL, pixels: torch.Tensor, batch: int = 256) -> torch.Tensor:
    return torch.cat(
        [
            vae.encode(to_model_range(pixels[i : i + batch])).latent_dist.mean
            for i in range(0, len(pixels), batch)
        ]
    )


@torch.no_grad()
def rescale_latents(vae: AutoencoderKL, factor: float) -> None:
    """Multiply the VAE's latents by ``factor`` inside the network, leaving its outputs unchanged:
    the posterior's mean (and standard deviation) grow by ``factor``, the decoder's first layer
    divides its input by it."""
    channels = vae.config.latent_channels
    vae.quant_conv.weight[:channels] *= factor
    vae.quant_conv.bias[:channels] *= factor
    vae.quant_conv.bias[channels:] += 2 * math.log(factor)  # log-variance
    vae.post_quant_conv.weight /= factor


@torch.no_grad()
def reconstruction_accuracy(vae: AutoencoderKL, scenes, pixels: torch.Tensor) -> tuple[float, float]:
    """Shape and colour accuracy of the judge on the VAE's reconstructions."""
    latents = encode_means(vae, pixels)
    images = vae.decode(latents).sample
    images = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    verdicts = [shapes.judge(_pil(image)) for image in images]
    shape = np.mean([v.shape == s.shape for v, s in zip(verdicts, scenes)])
    color = np.mean([v.color == s.color for v, s in zip(verdicts, scenes)])
    return float(shape), float(color)


def _pil(array: np.ndarray):
    from PIL import Image

    return Image.fromarray(array)


# ---------------------------------------------------------------------------------------------
# 2. the text encoder and the UNet


def make_text_encoder(config: BuildConfig) -> CLIPTextModel:
    text_config = dict(base_config("sd1")["text_encoder"])
    text_config.update(
        hidden_size=config.text_width,
        intermediate_size=4 * config.text_width,
        num_hidden_layers=config.text_layers,
        num_attention_heads=max(1, config.text_width // 64),  # the loader's rule for this width
    )
    return CLIPTextModel(CLIPTextConfig(**text_config))


def make_unet(config: BuildConfig) -> UNet2DConditionModel:
    """Cross-attention at 8 x 8 (and in the 4 x 4 middle block): enough for a global attribute like
    a shape or a colour, and the 16 x 16 attention it leaves out would cost as much as the rest.
    64 channels at the first level for the same GroupNorm reason as the VAE's."""
    return UNet2DConditionModel(
        sample_size=shapes.SIZE // 4,
        in_channels=4,
        out_channels=4,
        block_out_channels=config.unet_channels,
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=config.text_width,
        attention_head_dim=8,  # SD 1.x: 8 heads at every level (the loader assumes it)
        norm_num_groups=32,
    )


class CaptionTokens:
    """Token ids of captions, padded to SD's 77 with end-of-text (SD 1.x); each caption once."""

    def __init__(self):
        self.tokenizer = shipped_tokenizer(v2=False)
        self.cache: dict[str, torch.Tensor] = {}

    def __call__(self, captions: list[str]) -> torch.Tensor:
        for text in captions:
            if text not in self.cache:
                self.cache[text] = self.tokenizer(
                    text, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
                ).input_ids[0]
        return torch.stack([self.cache[text] for text in captions])


def as_sd_model(vae, text_encoder, unet) -> SDModel:
    """The modules as the loader would return them, to judge the model while it trains."""
    return SDModel(
        tokenizer=shipped_tokenizer(v2=False),
        text_encoder=text_encoder,
        vae=vae,
        unet=unet,
        scheduler_config=base_config("sd1")["scheduler"],
        family="sd1",
        v_parameterization=False,
        name="in training",
    )


@contextmanager
def swapped_in(params: list[torch.nn.Parameter], replacement: list[torch.Tensor]):
    """Temporarily give ``params`` the values of ``replacement`` (the moving average)."""
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        torch._foreach_copy_([p.data for p in params], replacement)
    try:
        yield
    finally:
        with torch.no_grad():
            torch._foreach_copy_([p.data for p in params], saved)


def train_text_and_unet(
    vae: AutoencoderKL,
    scenes: list[shapes.Scene],
    latents: torch.Tensor,
    config: BuildConfig,
    rng: np.random.Generator,
    generator: torch.Generator,
) -> tuple[CLIPTextModel, UNet2DConditionModel]:
    text_encoder, unet = make_text_encoder(config).train(), make_unet(config).train()
    params = list(text_encoder.parameters()) + list(unet.parameters())
    ema = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, config.steps, config.warmup)
    )
    scheduler_config = {k: v for k, v in base_config("sd1")["scheduler"].items() if k != "set_alpha_to_one"}
    noise_schedule = DDPMScheduler(**scheduler_config)
    alphas = noise_schedule.alphas_cumprod.float()
    tokens = CaptionTokens()
    latents = latents * SCALING_FACTOR
    start = time.time()
    for step in range(config.steps):
        index = rng.integers(len(scenes), size=config.batch)
        captions = [
            "" if rng.random() < config.caption_dropout else shapes.caption(scenes[i], rng) for i in index
        ]
        clean = latents[torch.from_numpy(index)]
        noise = torch.randn(clean.shape, generator=generator)
        timesteps = torch.randint(0, len(alphas), (config.batch,), generator=generator)
        alpha = alphas[timesteps].view(-1, 1, 1, 1)
        noisy = alpha.sqrt() * clean + (1 - alpha).sqrt() * noise
        hidden = text_encoder(tokens(captions)).last_hidden_state
        prediction = unet(noisy, timesteps, hidden).sample
        snr = alphas[timesteps] / (1 - alphas[timesteps])
        weight = snr.clamp(max=config.min_snr_gamma) / snr  # min-SNR weighting for epsilon targets
        loss = (weight * F.mse_loss(prediction, noise, reduction="none").mean(dim=(1, 2, 3))).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        decay = min(config.ema_decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
        if step % 100 == 0 or step == config.steps - 1:
            rate = (time.time() - start) / (step + 1)
            log(f"unet step {step}: loss {loss.item():.4f} ({rate:.2f} s/step)")
        if (step + 1) % config.progress_every == 0 and step + 1 < config.steps:
            with swapped_in(params, ema):
                report = base_model_accuracy(as_sd_model(vae, text_encoder.eval(), unet.eval()), 1)
            text_encoder.train(), unet.train()
            log(f"after {step + 1} steps, averaged weights: {report.summary()}")
    with torch.no_grad():
        for param, average in zip(params, ema):
            param.copy_(average)
    return text_encoder.eval(), unet.eval()


# ---------------------------------------------------------------------------------------------
# 3. export and check


def export(vae, text_encoder, unet, path: Path) -> str:
    """The fp16 single file (LDM layout); returns its sha256."""
    state = {k: v.half() for k, v in sd1_checkpoint(unet, vae, text_encoder).items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata={"format": "pt"})
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--seed", type=int, default=BuildConfig.seed)
    parser.add_argument("--quick", action="store_true", help="tiny budget: checks that the script runs")
    args = parser.parse_args(argv)
    config = replace(QUICK if args.quick else BuildConfig(), seed=args.seed)
    log(f"building {args.output} with {config}")
    torch.manual_seed(config.seed)  # module initialisation draws from the global generator
    rng = np.random.default_rng(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    began = time.time()

    scenes, pixels = render_pictures(config.pictures, rng)
    held_out_scenes, held_out = render_pictures(500, np.random.default_rng(config.seed + 1))
    log(f"rendered {len(scenes)} training pictures")

    vae = train_vae(pixels, config, generator)
    spread = float(encode_means(vae, pixels[:2000]).std())
    rescale_latents(vae, 1.0 / (SCALING_FACTOR * spread))
    shape_ok, color_ok = reconstruction_accuracy(vae, held_out_scenes, held_out)
    log(
        f"vae: latent std was {spread:.3f}; reconstructions judged {shape_ok:.1%} shape, {color_ok:.1%} colour"
    )

    latents = encode_means(vae, pixels)
    log(f"latents x scaling factor: std {float((latents * SCALING_FACTOR).std()):.3f}")
    text_encoder, unet = train_text_and_unet(vae, scenes, latents, config, rng, generator)

    digest = export(vae, text_encoder, unet, args.output)
    size = args.output.stat().st_size / 1e6
    log(f"wrote {args.output} ({size:.1f} MB), sha256 {digest}, built in {time.time() - began:.0f} s")

    model = load_sd_model(args.output)  # the trainer's own loader: the path any SD 1.x file takes
    report = base_model_accuracy(model, images_per_cell=config.eval_images)
    print(report.table(), flush=True)
    log(f"base model: {report.summary()}")


if __name__ == "__main__":
    main()
