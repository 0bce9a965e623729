"""Build the project's small real model: a Stable Diffusion 1.x-layout model that draws shapes.

    python -m tools.build_shapes_model                  # models/shapes-sd1.safetensors: about 55 min, 2 cores
    python -m tools.build_shapes_model --family sdxl    # models/shapes-sdxl.safetensors, SDXL's layout
    python -m tools.build_shapes_model --quick          # a few minutes and a poor model: checks the script

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
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from library.models.family import SD1, SDXL
from library.models.ldm_export import sd1_checkpoint, sdxl_checkpoint
from library.models.loading import SDModel, base_config, load_sd_model
from library.text.tokenizer import family_tokenizers, shipped_tokenizer
from tools import shapes
from tools.concept_eval import base_model_accuracy

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = ROOT / "models" / "shapes-sd1.safetensors"
DEFAULT_OUTPUTS = {"sd1": DEFAULT_OUTPUT, "sdxl": ROOT / "models" / "shapes-sdxl.safetensors"}


def scaling_factor(family: str) -> float:
    """The latent scale every tool assumes for the family: SD 1.x 0.18215, SDXL 0.13025."""
    return base_config(family)["vae"]["scaling_factor"]


@dataclass(frozen=True)
class BuildConfig:
    family: str = "sd1"  # or "sdxl": two text encoders, pooled text and size conditioning
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
    sdxl_text_widths: tuple[int, int] = (32, 64)  # CLIP-L's and bigG's stand-ins: different, like 768/1280
    sdxl_time_embed_dim: int = 32  # each of the six size numbers (SDXL: 256)
    unet_channels: tuple[int, ...] = (64, 64, 128)
    vae_channels: tuple[int, ...] = (64, 64, 64)
    anneal_steps: int = 0  # then this many more text-encoder + UNet steps at anneal_lr, cosine to 0
    anneal_lr: float = 3e-4
    eval_images: int = 8  # per shape x colour
    progress_every: int = 1000  # judge the averaged weights on one picture per shape x colour


QUICK = BuildConfig(pictures=1000, vae_steps=60, steps=60, eval_images=2, progress_every=30)

# The SDXL layout learns colour words more slowly (its first encoder is half as wide), so its build
# gives the UNet more steps at a higher rate and takes them from the VAE, whose loss is flat after
# 600 steps, then anneals text encoders and UNet at a fifth of the rate (what lifts the weak green
# and purple cells); the whole build takes about an hour of two cores.
SDXL_RECIPE = dict(vae_steps=600, steps=4000, lr=1.5e-3, anneal_steps=400, anneal_lr=3e-4)


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
        scaling_factor=scaling_factor(config.family),
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
            vae.encode(to_model_range(pixels[i : i + batch]).to(vae.dtype)).latent_dist.mean
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
def reconstruct(vae: AutoencoderKL, pixels: torch.Tensor) -> np.ndarray:
    """uint8 ``[count, 3, H, W]`` pictures encoded (the posterior's mean) and decoded by ``vae``,
    as uint8 ``[count, H, W, 3]``: what the UNet learns of them."""
    images = vae.decode(encode_means(vae, pixels)).sample.float()
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def reconstruction_accuracy(vae: AutoencoderKL, scenes, pixels: torch.Tensor) -> tuple[float, float]:
    """Shape and colour accuracy of the judge on the VAE's reconstructions."""
    images = reconstruct(vae, pixels)
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
    if config.family == "sdxl":
        return make_sdxl_unet(config)
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


def make_sdxl_unet(config: BuildConfig) -> UNet2DConditionModel:
    """SDXL's UNet at the SD 1.x model's size: the same levels and attention, with SDXL's linear
    projections, 64-channel heads, the two encoders' joined width as context, and the added
    conditioning (encoder 2's pooled output and the six size numbers, embedded)."""
    width_l, width_g = config.sdxl_text_widths
    return UNet2DConditionModel(
        sample_size=shapes.SIZE // 4,
        in_channels=4,
        out_channels=4,
        block_out_channels=config.unet_channels,
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=width_l + width_g,
        attention_head_dim=[max(1, ch // 64) for ch in config.unet_channels],  # SDXL: 64-channel heads
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=config.sdxl_time_embed_dim,
        projection_class_embeddings_input_dim=width_g + 6 * config.sdxl_time_embed_dim,
        norm_num_groups=32,
    )


def make_sdxl_text_encoders(config: BuildConfig) -> tuple[CLIPTextModel, CLIPTextModelWithProjection]:
    """CLIP ViT-L's and OpenCLIP bigG's stand-ins: SDXL's activations, different widths, a projection
    on the second (its pooled output conditions the UNet)."""
    encoders = []
    for name, width, model_cls in (
        ("text_encoder", config.sdxl_text_widths[0], CLIPTextModel),
        ("text_encoder_2", config.sdxl_text_widths[1], CLIPTextModelWithProjection),
    ):
        text_config = dict(base_config("sdxl")[name])
        text_config.update(
            hidden_size=width,
            intermediate_size=4 * width,
            num_hidden_layers=config.text_layers,
            num_attention_heads=max(1, width // 64),
            projection_dim=width,
        )
        encoders.append(model_cls(CLIPTextConfig(**text_config)))
    return encoders[0], encoders[1]


class CaptionTokens:
    """Token ids of captions, padded to SD's 77 (with end-of-text, or with ``!`` for SD 2.x's and
    SDXL's second tokenizer); each caption tokenized once."""

    def __init__(self, v2: bool = False):
        self.tokenizer = shipped_tokenizer(v2=v2)
        self.cache: dict[str, torch.Tensor] = {}

    def __call__(self, captions: list[str]) -> torch.Tensor:
        for text in captions:
            if text not in self.cache:
                self.cache[text] = self.tokenizer(
                    text, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
                ).input_ids[0]
        return torch.stack([self.cache[text] for text in captions])


class SD1Conditioning:
    """SD 1.x's conditioning of the UNet: the text encoder's last hidden states."""

    def __init__(self, config: BuildConfig):
        self.text_encoder = make_text_encoder(config)
        self.tokens = CaptionTokens()
        self.encoders = [self.text_encoder]

    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, dict | None]:
        return self.text_encoder(self.tokens(captions)).last_hidden_state, None


class SDXLConditioning:
    """SDXL's: both encoders' penultimate hidden states side by side, and as added conditioning the
    second encoder's pooled (projected) output with the six size numbers (original size, crop
    corner, target size: always the whole 64 x 64 picture here)."""

    def __init__(self, config: BuildConfig):
        self.text_encoder, self.text_encoder_2 = make_sdxl_text_encoders(config)
        self.tokens, self.tokens_2 = CaptionTokens(), CaptionTokens(v2=True)
        self.encoders = [self.text_encoder, self.text_encoder_2]
        self.time_ids = torch.tensor(
            [shapes.SIZE, shapes.SIZE, 0, 0, shapes.SIZE, shapes.SIZE], dtype=torch.float32
        )

    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, dict | None]:
        hidden = self.text_encoder(self.tokens(captions), output_hidden_states=True).hidden_states[-2]
        second = self.text_encoder_2(self.tokens_2(captions), output_hidden_states=True)
        context = torch.cat([hidden, second.hidden_states[-2]], dim=-1)
        added = {"text_embeds": second.text_embeds, "time_ids": self.time_ids.repeat(len(captions), 1)}
        return context, added


def make_conditioning(config: BuildConfig) -> SD1Conditioning | SDXLConditioning:
    return SDXLConditioning(config) if config.family == "sdxl" else SD1Conditioning(config)


def as_sd_model(vae, conditioning, unet) -> SDModel:
    """The modules as the loader would return them, to judge the model while it trains."""
    family = SDXL if isinstance(conditioning, SDXLConditioning) else SD1
    return SDModel(
        tokenizers=family_tokenizers(family.name),
        text_encoders=list(conditioning.encoders),
        vae=vae,
        unet=unet,
        scheduler_config=base_config(family.name)["scheduler"],
        family=family,
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


def set_mode(modules: list[torch.nn.Module], train: bool) -> None:
    for module in modules:
        module.train(train)


def train_text_and_unet(
    vae: AutoencoderKL,
    scenes: list[shapes.Scene],
    latents: torch.Tensor,
    config: BuildConfig,
    rng: np.random.Generator,
    generator: torch.Generator,
    start: tuple | None = None,
) -> tuple[SD1Conditioning | SDXLConditioning, UNet2DConditionModel]:
    """Train the text encoder(s) and the UNet together (from ``start``, trained modules, when given)."""
    conditioning, unet = start if start is not None else (make_conditioning(config), make_unet(config))
    modules = [*conditioning.encoders, unet]
    set_mode(modules, train=True)
    params = [p for module in modules for p in module.parameters()]
    ema = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, config.steps, config.warmup)
    )
    scheduler_config = {k: v for k, v in base_config("sd1")["scheduler"].items() if k != "set_alpha_to_one"}
    noise_schedule = DDPMScheduler(**scheduler_config)
    alphas = noise_schedule.alphas_cumprod.float()
    latents = latents * scaling_factor(config.family)
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
        context, added = conditioning(captions)
        prediction = unet(noisy, timesteps, context, added_cond_kwargs=added).sample
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
                set_mode(modules, train=False)
                model = as_sd_model(vae, conditioning, unet)
                log(f"after {step + 1} steps, averaged weights: {base_model_accuracy(model, 1).summary()}")
            set_mode(modules, train=True)
    with torch.no_grad():
        for param, average in zip(params, ema):
            param.copy_(average)
    set_mode(modules, train=False)
    return conditioning, unet


# ---------------------------------------------------------------------------------------------
# 3. export and check


def export(vae, conditioning, unet, path: Path) -> str:
    """The fp16 single file (LDM layout; SDXL's SAI layout); returns its sha256."""
    if isinstance(conditioning, SDXLConditioning):
        tensors = sdxl_checkpoint(unet, vae, conditioning.text_encoder, conditioning.text_encoder_2)
    else:
        tensors = sd1_checkpoint(unet, vae, conditioning.text_encoder)
    state = {k: v.half() for k, v in tensors.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata={"format": "pt"})
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save_modules(path: Path, vae, conditioning, unet) -> None:
    """The trained modules in fp32 and diffusers names, to export again without training."""
    named = {"vae": vae, "unet": unet, **{f"encoder{i}": e for i, e in enumerate(conditioning.encoders)}}
    tensors = {
        f"{name}.{k}": v.detach().contiguous() for name, m in named.items() for k, v in m.state_dict().items()
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))


def load_modules(path: Path, config: BuildConfig):
    """The modules ``save_modules`` wrote, for a build config of the same architecture."""
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    vae, conditioning, unet = make_vae(config), make_conditioning(config), make_unet(config)
    named = {"vae": vae, "unet": unet, **{f"encoder{i}": e for i, e in enumerate(conditioning.encoders)}}
    for name, module in named.items():
        prefix = name + "."
        module.load_state_dict({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
        module.eval()
    return vae, conditioning, unet


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--family", choices=["sd1", "sdxl"], default="sd1", help="the model's layout")
    parser.add_argument("--output", type=Path, default=None, help="default: models/shapes-FAMILY.safetensors")
    parser.add_argument("--seed", type=int, default=BuildConfig.seed)
    parser.add_argument("--quick", action="store_true", help="tiny budget: checks that the script runs")
    parser.add_argument(
        "--modules",
        type=Path,
        default=None,
        help="also keep the trained modules here (fp32); with --export-only, read them instead of training",
    )
    parser.add_argument("--export-only", action="store_true", help="export and judge --modules; no training")
    parser.add_argument(
        "--continue-steps",
        type=int,
        default=0,
        help="train --modules' text encoders and UNet this many steps more (learning rate --continue-lr, "
        "cosine to 0), write them back to --modules, export and judge",
    )
    parser.add_argument("--continue-lr", type=float, default=3e-4)
    args = parser.parse_args(argv)
    config = replace(QUICK if args.quick else BuildConfig(), seed=args.seed, family=args.family)
    if args.family == "sdxl" and not args.quick:
        config = replace(config, **SDXL_RECIPE)
    output = args.output or DEFAULT_OUTPUTS[config.family]
    began = time.time()
    if args.continue_steps:
        vae, conditioning, unet = continue_training(
            args.modules, config, args.continue_steps, args.continue_lr
        )
        save_modules(args.modules, vae, conditioning, unet)
    elif args.export_only:
        vae, conditioning, unet = load_modules(args.modules, config)
    else:
        vae, conditioning, unet = build(config, output)
        if args.modules:
            save_modules(args.modules, vae, conditioning, unet)

    digest = export(vae, conditioning, unet, output)
    size = output.stat().st_size / 1e6
    log(f"wrote {output} ({size:.1f} MB), sha256 {digest}, built in {time.time() - began:.0f} s")

    model = load_sd_model(output)  # the trainer's own loader: the path any downloaded file takes
    report = base_model_accuracy(model, images_per_cell=config.eval_images)
    print(report.table(), flush=True)
    log(f"base model: {report.summary()}")


def continue_training(modules: Path, config: BuildConfig, steps: int, lr: float):
    """More steps for a saved build's text encoders and UNet, on the build's pictures (same seed);
    the VAE is kept as it is."""
    vae, conditioning, unet = load_modules(modules, config)
    log(f"continuing {modules} for {steps} steps at learning rate {lr}")
    scenes, pixels = render_pictures(config.pictures, np.random.default_rng(config.seed))
    with torch.no_grad():
        latents = encode_means(vae, pixels)
    log("encoded the build's pictures")
    conditioning, unet = anneal(vae, conditioning, unet, scenes, latents, config, steps, lr)
    return vae, conditioning, unet


def anneal(vae, conditioning, unet, scenes, latents, config: BuildConfig, steps: int, lr: float):
    """``steps`` more text-encoder + UNet steps from where they are, without warm-up, with their own
    deterministic draws (seed + 2): the same numbers in one build or continued from saved modules."""
    more = replace(config, steps=steps, lr=lr, warmup=0, progress_every=steps + 1)
    generator = torch.Generator().manual_seed(config.seed + 2)
    rng = np.random.default_rng(config.seed + 2)
    return train_text_and_unet(vae, scenes, latents, more, rng, generator, (conditioning, unet))


def build(config: BuildConfig, output: Path):
    """Render the pictures, train the VAE, then the text encoder(s) and the UNet; the trained modules."""
    log(f"building {output} with {config}")
    torch.manual_seed(config.seed)  # module initialisation draws from the global generator
    rng = np.random.default_rng(config.seed)
    generator = torch.Generator().manual_seed(config.seed)

    scenes, pixels = render_pictures(config.pictures, rng)
    held_out_scenes, held_out = render_pictures(500, np.random.default_rng(config.seed + 1))
    log(f"rendered {len(scenes)} training pictures")

    vae = train_vae(pixels, config, generator)
    spread = float(encode_means(vae, pixels[:2000]).std())
    rescale_latents(vae, 1.0 / (scaling_factor(config.family) * spread))
    shape_ok, color_ok = reconstruction_accuracy(vae, held_out_scenes, held_out)
    log(
        f"vae: latent std was {spread:.3f}; reconstructions judged {shape_ok:.1%} shape, {color_ok:.1%} colour"
    )

    latents = encode_means(vae, pixels)
    log(f"latents x scaling factor: std {float((latents * scaling_factor(config.family)).std()):.3f}")
    conditioning, unet = train_text_and_unet(vae, scenes, latents, config, rng, generator)
    if config.anneal_steps:
        log(f"annealing for {config.anneal_steps} steps at learning rate {config.anneal_lr}")
        conditioning, unet = anneal(
            vae, conditioning, unet, scenes, latents, config, config.anneal_steps, config.anneal_lr
        )
    return vae, conditioning, unet


if __name__ == "__main__":
    main()
