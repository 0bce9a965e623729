"""Image generation shared by ``gen_img_diffusers.py`` and the trainer's sample images.

The denoising itself is diffusers' own ``StableDiffusionPipeline``, ``...Img2ImgPipeline`` and
``...InpaintPipeline``, built once from the model's modules (nothing is copied). What this module
adds is what kohya's scripts do differently from a plain pipeline:

* kohya's sampler names (``--sampler`` / ``--ss``) mapped to diffusers schedulers;
* prompt embeddings built with our text encoding: WebUI attention weights ``(word:1.2)``, long
  prompts in 75-token chunks (``--max_embeddings_multiples``), kohya's ``--clip_skip``, and
  multi-vector embeddings expanded from one word to ``word word1 ... wordN-1``;
* kohya's ``--negative_scale`` (a third guidance term for the negative prompt);
* one CPU ``torch.Generator`` per image, so an image depends only on its seed (not on its
  position in a batch, the device, or the global RNG, which is never touched);
* kohya's highres fix (a small first pass, upscaled, then refined with img2img).
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
import random
import warnings
from collections.abc import Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from PIL import Image
from transformers.utils import logging as transformers_logging

from library.errors import UserError
from library.generation.prompts import SDXLSizes
from library.generation.samplers import (
    DEFAULT_SCALE,
    DEFAULT_SIZE,
    DEFAULT_STEPS,
    DEFAULT_STRENGTH,
    MAX_SEED,
    check_steps,
)
from library.text.conditioning import Conditioning
from library.text.tokens import expand_placeholder


@contextmanager
def _quiet_transformers():
    """Importing diffusers' pipelines makes transformers announce, once per image processor, that
    torchvision is missing; nothing here uses those processors, so the notice is only noise."""
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(verbosity)


with _quiet_transformers():
    from diffusers import (
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        DPMSolverSinglestepScheduler,
        EulerAncestralDiscreteScheduler,
        EulerDiscreteScheduler,
        HeunDiscreteScheduler,
        KDPM2AncestralDiscreteScheduler,
        KDPM2DiscreteScheduler,
        LMSDiscreteScheduler,
        PNDMScheduler,
        StableDiffusionImg2ImgPipeline,
        StableDiffusionInpaintPipeline,
        StableDiffusionPipeline,
        StableDiffusionXLImg2ImgPipeline,
        StableDiffusionXLInpaintPipeline,
        StableDiffusionXLPipeline,
    )

logger = logging.getLogger(__name__)

# kohya's sampler names -> (diffusers scheduler class, extra constructor arguments). The "k_"
# names are aliases kohya keeps for old command lines. "dpmsolver" needs final_sigmas_type
# "sigma_min" in current diffusers (kohya's call, written for older diffusers, now fails).
SAMPLERS: dict[str, tuple[type, dict[str, Any]]] = {
    "ddim": (DDIMScheduler, {}),
    "pndm": (PNDMScheduler, {}),
    "lms": (LMSDiscreteScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "heun": (HeunDiscreteScheduler, {}),
    "dpm_2": (KDPM2DiscreteScheduler, {}),
    "dpm_2_a": (KDPM2AncestralDiscreteScheduler, {}),
    "dpmsolver": (
        DPMSolverMultistepScheduler,
        {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"},
    ),
    "dpmsolver++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}),
    "dpmsingle": (DPMSolverSinglestepScheduler, {}),
    "k_lms": (LMSDiscreteScheduler, {}),
    "k_euler": (EulerDiscreteScheduler, {}),
    "k_euler_a": (EulerAncestralDiscreteScheduler, {}),
    "k_dpm_2": (KDPM2DiscreteScheduler, {}),
    "k_dpm_2_a": (KDPM2AncestralDiscreteScheduler, {}),
}

# the parts of a model's DDPM-style scheduler config that every sampler takes over when it has them
_SHARED_SCHEDULER_KEYS = (
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "steps_offset",
    "clip_sample",
)


def make_scheduler(sampler: str, scheduler_config: dict, v_parameterization: bool):
    """A fresh diffusers scheduler for one of kohya's sampler names.

    The noise schedule (betas, timesteps, offset) comes from the model's ``scheduler_config``;
    the prediction type from ``v_parameterization``, as kohya's ``--v_parameterization`` decides.
    """
    name = (sampler or "ddim").lower()
    if name not in SAMPLERS:
        raise UserError(f"unknown sampler '{sampler}'; use one of: {', '.join(SAMPLERS)}")
    cls, extra = SAMPLERS[name]
    if cls is LMSDiscreteScheduler and importlib.util.find_spec("scipy") is None:
        raise UserError(
            f"--sampler {name} needs the scipy package: pip install scipy (or use another sampler)"
        )
    accepted = set(inspect.signature(cls.__init__).parameters)
    options = {key: scheduler_config[key] for key in _SHARED_SCHEDULER_KEYS if key in scheduler_config}
    options = {key: value for key, value in options.items() if key in accepted}
    options.update(extra)
    options["prediction_type"] = "v_prediction" if v_parameterization else "epsilon"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # diffusers deprecates algorithm_type "dpmsolver"
        return cls(**options)


@dataclass
class GenerationRequest:
    """One call of ``ImageGenerator.generate``: a batch of images sharing size, steps and scales.

    ``prompt``/``negative_prompt``/``seeds`` are one value for the whole batch or one per image;
    the batch has ``batch_size`` images, or as many as the longest of those lists. ``None`` for a
    setting means kohya's default. The field names match ``library.generation.prompts.PromptSpec``, so
    a ``PromptSpec`` can be passed to ``generate`` directly.
    """

    prompt: str | list[str]
    negative_prompt: str | list[str] | None = None
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    scale: float | None = None
    negative_scale: float | None = None
    seeds: int | list[int] | None = None
    sampler: str | None = None
    batch_size: int | None = None
    init_image: Any = None  # PIL image(s) for img2img / inpaint, or latents [B, 4, h/8, w/8]
    mask_image: Any = None  # PIL image(s): white is repainted, black is kept
    strength: float | None = None
    output_type: str = "pil"  # "pil" or "latent"
    sizes: SDXLSizes = field(default_factory=lambda: SDXLSizes())  # SDXL's size conditioning


@dataclass
class HighresFix:
    """kohya's ``--highres_fix_*``: render at ``scale`` x the size, upscale, refine with img2img."""

    scale: float
    steps: int = 28
    strength: float | None = None  # the first pass's img2img strength (when it is img2img)
    latents_upscaling: bool = False
    keep_first: bool = False  # return the first pass's images too (--highres_fix_save_1st)


@dataclass
class HighresResult:
    images: list[Image.Image]
    first_pass: list[Image.Image] = field(default_factory=list)


def _as_list(value: Any) -> list:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def _broadcast(values: list, count: int, what: str) -> list:
    if len(values) == count:
        return values
    if len(values) == 1:
        return values * count
    raise ValueError(f"{what}: got {len(values)} values for a batch of {count} images")


def _multiple_of_8(value: int, what: str) -> int:
    rounded = max(8, value - value % 8)
    if rounded != value:
        logger.warning("%s %d is not a multiple of 8; using %d", what, value, rounded)
    return rounded


class _NegativeScaleUNet(torch.nn.Module):
    """kohya's ``--negative_scale`` inside diffusers' two-way classifier-free guidance.

    kohya guides with three predictions: ``u + scale * (text - u) - negative_scale * (neg - u)``
    where ``u`` is the empty prompt's. The pipeline computes ``a + scale * (b - a)`` from the two
    halves the UNet returns, so this wrapper runs the real UNet on ``[u, neg, text]`` and returns
    ``a = u + negative_scale / (scale - 1) * (neg - u)`` and ``b = text``, which gives exactly
    kohya's sum. Only used when ``scale > 1``, as guidance is off otherwise (kohya too).
    """

    def __init__(self, unet, uncond: Conditioning, scale: float, negative_scale: float):
        super().__init__()
        self.unet = unet
        self.uncond = uncond  # the empty prompt's conditioning, one row per image
        self.negative_factor = negative_scale / (scale - 1.0)

    @property
    def config(self):
        return self.unet.config

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def add_embedding(self):  # the SDXL pipelines check the size conditioning's width against it
        return self.unet.add_embedding

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor, **unet_options):
        half = sample.shape[0] // 2
        negative, positive = encoder_hidden_states.chunk(2)
        if torch.is_tensor(timestep) and timestep.dim() > 0 and timestep.shape[0] == sample.shape[0]:
            timestep = torch.cat([timestep[:half]] * 3)
        unet_options["return_dict"] = False
        uncond = self.uncond.hidden.to(device=positive.device, dtype=positive.dtype)
        added = unet_options.get("added_cond_kwargs")
        if added:  # SDXL: the empty prompt's pooled text, with the negative prompt's sizes
            negative_added = {name: value.chunk(2)[0] for name, value in added.items()}
            uncond_added = {**negative_added, "text_embeds": self.uncond.added["text_embeds"]}
            unet_options["added_cond_kwargs"] = {
                name: torch.cat([uncond_added[name].to(value), value]) for name, value in added.items()
            }
        out = self.unet(
            torch.cat([sample[:half]] * 3),
            timestep,
            encoder_hidden_states=torch.cat([uncond, negative, positive]),
            **unet_options,
        )[0]
        pred_uncond, pred_negative, pred_text = out.chunk(3)
        first = pred_uncond + self.negative_factor * (pred_negative - pred_uncond)
        return (torch.cat([first, pred_text]),)


def _move(module: torch.nn.Module, device: torch.device, dtype: torch.dtype | None) -> None:
    """``module.to(device)``, and to ``dtype`` only when that is a change: a cast to the same dtype
    would still widen the weights a model keeps in exact half precision (library.models.exact_half_weights)."""
    if dtype is None:
        module.to(device)
    else:
        module.to(device=device, dtype=dtype)


class _VAEInOwnDtype:
    """A VAE kept in another dtype than the UNet (fp32 with ``--no_half_vae``), for diffusers' pipelines.

    The pipelines hand the VAE images and latents in the UNet's dtype and use the latents it encodes
    as they come, and the SDXL ones cast a VAE that asks for upcasting (``force_upcast``) back to
    the UNet's dtype after encoding. So, while installed, the VAE's ``encode``/``decode`` take their
    input in its own dtype, run outside autocast, and ``encode`` returns latents in the caller's
    dtype; and the VAE does not ask to be upcast (it already is). ``remove()`` undoes both.
    """

    def __init__(self, vae) -> None:
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
        from diffusers.models.modeling_outputs import AutoencoderKLOutput

        self.vae, self.force_upcast = vae, vae.config.get("force_upcast", False)
        encode, decode = vae.encode, vae.decode

        def encode_in_own_dtype(x: torch.Tensor, return_dict: bool = True):
            with _without_autocast(vae.device):
                moments = encode(x.to(vae.dtype)).latent_dist.parameters.to(x.dtype)
            posterior = DiagonalGaussianDistribution(moments)
            return AutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)

        def decode_in_own_dtype(z: torch.Tensor, *args, **kwargs):
            with _without_autocast(vae.device):
                return decode(z.to(vae.dtype), *args, **kwargs)

        vae.encode, vae.decode = encode_in_own_dtype, decode_in_own_dtype
        vae.register_to_config(force_upcast=False)

    def remove(self) -> None:
        del self.vae.encode, self.vae.decode  # the class's methods again
        self.vae.register_to_config(force_upcast=self.force_upcast)


def _without_autocast(device: torch.device):
    """The trainer draws its samples inside accelerate's autocast, which would run the VAE's
    convolutions in half precision whatever its weights are."""
    return torch.autocast(device_type=device.type, enabled=False)


class ImageGenerator:
    """Generate images from a Stable Diffusion model's modules with kohya's prompt semantics.

    ``model`` is a ``library.models.loading.SDModel``; ``tokenizers`` override the model's (the
    trainer's have the placeholder tokens). Prompts become the UNet's conditioning through the
    model family's ``TextConditioner``. ``device``/``dtype``, when given, move the UNet and VAE
    there in place (the VAE to ``vae_dtype`` instead when given: ``--no_half_vae``; ``close()``
    moves them back); the text encoders are only moved, never cast,
    because they may be the ones being trained. ``placeholder_vectors``
    maps an embedding's word to its vector count so that prompts say ``word`` and the tokenizer
    sees ``word word1 ... wordN-1``.

    The pipelines get no text encoder: prompts are encoded here, and the pipelines then cast the
    embeddings to the UNet's dtype, which lets an fp32 text encoder drive an fp16 UNet.
    """

    def __init__(
        self,
        model,
        *,
        tokenizers: list | None = None,
        clip_skip: int | None = None,
        max_embeddings_multiples: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        vae_dtype: torch.dtype | None = None,
        placeholder_vectors: dict[str, int] | None = None,
        vae_batch_size: int | None = None,
        progress_bar: bool = False,
    ):
        if max_embeddings_multiples not in (None, 1, 2, 3):
            raise UserError(
                f"--max_embeddings_multiples {max_embeddings_multiples}: use 1, 2 or 3 "
                "(prompts of 75, 150 or 225 tokens)"
            )
        if clip_skip is not None and clip_skip < 1:
            raise UserError(f"--clip_skip {clip_skip}: use 1 or more (1 = the last layer)")
        self.text = model.text_conditioner(
            tokenizers, clip_skip=clip_skip, max_chunks=max_embeddings_multiples or 1
        )
        self.vae = model.vae
        self.unet = model.unet
        self.scheduler_config = dict(model.scheduler_config)
        self.v_parameterization = bool(model.v_parameterization)
        self.placeholder_vectors = {w: n for w, n in (placeholder_vectors or {}).items() if n > 1}
        self.vae_batch_size = vae_batch_size
        self._restore: list[tuple[torch.nn.Module, torch.device, torch.dtype | None]] = []
        self._place_modules(device, dtype, dtype if vae_dtype is None else vae_dtype)
        self._vae_bridge = _VAEInOwnDtype(self.vae) if self.vae.dtype != self.unet.dtype else None

        self.sdxl = model.family.name == "sdxl"
        self.txt2img, self.img2img, self.inpaint = make_pipelines(
            self.vae,
            self.unet,
            make_scheduler("ddim", self.scheduler_config, self.v_parameterization),
            self.sdxl,
        )
        for pipe in (self.txt2img, self.img2img, self.inpaint):
            pipe.set_progress_bar_config(disable=not progress_bar, leave=False)

    # -- module placement ----------------------------------------------------------------------

    def _place_modules(self, device, dtype, vae_dtype) -> None:
        """The UNet in ``dtype``, the VAE in ``vae_dtype`` (fp32 with ``--no_half_vae``), the text
        encoders as they are (half-stored weights must not be widened); all on ``device``."""
        for module, cast_to in (
            (self.unet, dtype),
            (self.vae, vae_dtype),
            *((e, None) for e in self.text.encoders),
        ):
            old_device, old_dtype = module.device, module.dtype
            new_device = torch.device(device) if device is not None else old_device
            new_dtype = cast_to if cast_to is not None else old_dtype
            if new_device != old_device or new_dtype != old_dtype:
                self._restore.append((module, old_device, old_dtype))
                _move(module, new_device, new_dtype if new_dtype != old_dtype else None)

    def close(self) -> None:
        """Move the modules back to the device and dtype they had before this generator."""
        if self._vae_bridge is not None:
            self._vae_bridge.remove()
            self._vae_bridge = None
        for module, device, dtype in reversed(self._restore):
            _move(module, device, dtype if dtype != module.dtype else None)
        self._restore.clear()

    def __enter__(self) -> ImageGenerator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- prompts -------------------------------------------------------------------------------

    def expand_placeholders(self, text: str) -> str:
        for word, count in self.placeholder_vectors.items():
            text = expand_placeholder(text, word, count)
        return text

    @torch.no_grad()
    def encode(self, texts: Sequence[str]) -> Conditioning:
        """The conditioning of weighted prompts, all of one length (``TextConditioner.prompts``): so a
        prompt and its negative prompt line up as the pipelines require."""
        return self.text.prompts([self.expand_placeholders(t) for t in texts])

    # -- generation ----------------------------------------------------------------------------

    def generate(self, request) -> list[Image.Image] | torch.Tensor:
        """Images for one request (a ``GenerationRequest`` or a ``PromptSpec``).

        Returns PIL images, or latents when ``request.output_type == "latent"``. Seeds left out
        are drawn at random (from the OS, so the caller's RNG state is not disturbed).
        """
        prompts = _as_list(request.prompt)
        negatives = _as_list(getattr(request, "negative_prompt", None)) or [""]
        negatives = ["" if n is None else n for n in negatives]
        seeds = _as_list(getattr(request, "seeds", None))
        init = getattr(request, "init_image", None)
        mask = getattr(request, "mask_image", None)
        count = max(len(prompts), len(negatives), len(seeds), getattr(request, "batch_size", None) or 1)
        if isinstance(init, list):
            count = max(count, len(init))
        prompts = _broadcast(prompts, count, "prompt")
        negatives = _broadcast(negatives, count, "negative_prompt")
        if not seeds:
            system_random = random.SystemRandom()
            seeds = [system_random.randint(0, MAX_SEED) for _ in range(count)]
        seeds = _broadcast(seeds, count, "seeds")

        width = _multiple_of_8(request.width or DEFAULT_SIZE, "width")
        height = _multiple_of_8(request.height or DEFAULT_SIZE, "height")
        steps = request.steps or DEFAULT_STEPS
        check_steps(request.sampler, steps)
        scale = DEFAULT_SCALE if request.scale is None else request.scale
        negative_scale = getattr(request, "negative_scale", None)
        use_negative_scale = negative_scale is not None and scale > 1.0
        strength = getattr(request, "strength", None)
        strength = DEFAULT_STRENGTH if strength is None else strength
        if init is not None and int(steps * strength) < 1:
            # diffusers would run zero steps and fail; kohya's pipeline always runs at least one
            logger.warning(
                "strength %g x %d steps leaves no denoising step; running one step", strength, steps
            )
            strength = 1.0 / steps
        output_type = getattr(request, "output_type", "pil") or "pil"

        texts = prompts + negatives + ([""] if use_negative_scale else [])
        conditioning = self.encode(texts)
        embeds = conditioning.hidden
        pipe_options: dict[str, Any] = {
            "prompt_embeds": embeds[:count],
            "negative_prompt_embeds": embeds[count : 2 * count],
            "num_inference_steps": steps,
            "guidance_scale": scale,
            "generator": [torch.Generator("cpu").manual_seed(int(s)) for s in seeds],
        }
        sizes = getattr(request, "sizes", None) or SDXLSizes()
        if self.sdxl:
            pooled = conditioning.added["text_embeds"]
            pipe_options.update(
                pooled_prompt_embeds=pooled[:count],
                negative_pooled_prompt_embeds=pooled[count : 2 * count],
                **sdxl_size_options(sizes, width, height),
            )
        elif sizes.given():
            raise UserError(
                "--original_width/--original_height/--crop_top/--crop_left (and --ow --oh --nw --nh --ct --cl) "
                "condition SDXL models only; this model is SD 1.x/2.x"
            )
        decode_here = output_type == "pil" and self.vae_batch_size is not None and self.vae_batch_size < count
        pipe_options["output_type"] = "latent" if decode_here else output_type

        if init is None:
            pipe = self.txt2img
            pipe_options.update(width=width, height=height)
            sampler = (request.sampler or "ddim").lower()
            if sampler in KOHYA_NOISES_PER_STEP:
                factor = pipe.vae_scale_factor
                shape = (1, self.unet.config.in_channels, height // factor, width // factor)
                unused = steps * KOHYA_NOISES_PER_STEP[sampler]
                pipe_options["latents"] = kohya_start_latents(
                    pipe_options["generator"], shape, self.unet.dtype, unused
                )
        elif mask is None:
            pipe = self.img2img
            pipe_options.update(image=_prepare_images(init, width, height, "RGB"), strength=strength)
        else:
            pipe = self.inpaint
            pipe_options.update(
                image=_prepare_images(init, width, height, "RGB"),
                mask_image=_prepare_images(mask, width, height, "L"),
                width=width,
                height=height,
                strength=strength,
            )
        pipe.scheduler = make_scheduler(
            request.sampler or "ddim", self.scheduler_config, self.v_parameterization
        )

        if use_negative_scale:
            uncond = Conditioning(
                embeds[2 * count :].expand(count, -1, -1),
                {name: value[2 * count :].expand(count, -1) for name, value in conditioning.added.items()},
            )
            wrapper = _NegativeScaleUNet(self.unet, uncond, scale, negative_scale)
            pipe.unet = wrapper
            try:
                result = pipe(**pipe_options).images
            finally:
                pipe.unet = self.unet
        else:
            result = pipe(**pipe_options).images
        if decode_here:
            result = self.decode_latents(result, pipe)
        return result

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor, pipe=None) -> list[Image.Image]:
        """Decode in slices of ``vae_batch_size`` images (kohya's ``--vae_batch_size``).

        An fp16 SDXL VAE that asks for upcasting (``force_upcast``) decodes in fp32 here, as
        diffusers' SDXL pipelines decode it, and outside autocast: in fp16 it overflows to black
        pictures.
        """
        pipe = pipe or self.txt2img
        step = max(1, int(self.vae_batch_size or latents.shape[0]))
        upcast = self.sdxl and self.vae.dtype == torch.float16 and self.vae.config.get("force_upcast", False)
        if upcast:
            self.vae.to(torch.float32)
        images: list[Image.Image] = []
        try:
            for start in range(0, latents.shape[0], step):
                part = latents[start : start + step].to(self.vae.dtype) / self.vae.config.scaling_factor
                with _without_autocast(self.vae.device) if upcast else nullcontext():
                    decoded = self.vae.decode(part, return_dict=False)[0]
                images += pipe.image_processor.postprocess(decoded, output_type="pil")
        finally:
            if upcast:
                self.vae.to(torch.float16)
        return images

    def generate_highres(self, request, fix: HighresFix) -> HighresResult:
        """kohya's highres fix: a first pass at ``fix.scale`` x the size with ``fix.steps`` steps,
        upscaled (LANCZOS on images, or bilinear on latents), then img2img at the full size with
        ``request.strength`` and seed + 1 (kohya's choice, so the refinement noise differs)."""
        width = request.width or DEFAULT_SIZE
        height = request.height or DEFAULT_SIZE
        first_width = max(32, int(width * fix.scale + 0.5) // 32 * 32)
        first_height = max(32, int(height * fix.scale + 0.5) // 32 * 32)
        seeds = _as_list(getattr(request, "seeds", None))
        if not seeds:
            system_random = random.SystemRandom()
            count = max(len(_as_list(request.prompt)), getattr(request, "batch_size", None) or 1)
            seeds = [system_random.randint(0, MAX_SEED) for _ in range(count)]
        first_strength = fix.strength if fix.strength is not None else getattr(request, "strength", None)
        first_request = _request_from(
            request,
            width=first_width,
            height=first_height,
            steps=fix.steps,
            seeds=seeds,
            strength=first_strength,
            output_type="latent" if fix.latents_upscaling else "pil",
        )
        first = self.generate(first_request)
        kept: list[Image.Image] = []
        if fix.latents_upscaling:
            if fix.keep_first:
                kept = self.decode_latents(first)
            factor = self.txt2img.vae_scale_factor  # 8 for SD's VAE
            upscaled = torch.nn.functional.interpolate(
                first.float(), (height // factor, width // factor), mode="bilinear"
            ).to(first.dtype)
        else:
            kept = list(first) if fix.keep_first else []
            upscaled = [image.resize((width, height), resample=Image.LANCZOS) for image in first]
        second_request = _request_from(
            request,
            seeds=[s + 1 for s in seeds],
            init_image=upscaled,
            mask_image=None,
            output_type="pil",
        )
        return HighresResult(images=self.generate(second_request), first_pass=kept)


def make_pipelines(vae, unet, scheduler, sdxl: bool) -> tuple:
    """diffusers' txt2img, img2img and inpaint pipelines over the same modules, without text
    encoders (prompts are encoded by the family's ``TextConditioner``); SDXL's for an SDXL model."""
    common = {"vae": vae, "unet": unet, "scheduler": scheduler, "text_encoder": None, "tokenizer": None}
    if sdxl:
        common.update(text_encoder_2=None, tokenizer_2=None, add_watermarker=False)
        return (
            StableDiffusionXLPipeline(**common),
            StableDiffusionXLImg2ImgPipeline(**common),
            StableDiffusionXLInpaintPipeline(**common),
        )
    common.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return (
        StableDiffusionPipeline(**common),
        StableDiffusionImg2ImgPipeline(**common),
        StableDiffusionInpaintPipeline(**common),
    )


def sdxl_size_options(sizes: SDXLSizes, width: int, height: int) -> dict[str, tuple[int, int]]:
    """The SDXL pipelines' size conditioning with kohya's defaults and rules: the original size is
    the image's, the negative prompt's original size the original, and the negative prompt
    shares the crop and the target size (kohya's ``gen_img.py``)."""
    original = (sizes.original_height or height, sizes.original_width or width)
    crop = (sizes.crop_top or 0, sizes.crop_left or 0)
    negative_original = (
        sizes.original_height_negative or original[0],
        sizes.original_width_negative or original[1],
    )
    return {
        "original_size": original,
        "crops_coords_top_left": crop,
        "target_size": (height, width),
        "negative_original_size": negative_original,
        "negative_crops_coords_top_left": crop,
        "negative_target_size": (height, width),
    }


# samplers that add fresh noise at every step (diffusers draws it with the image's generator), and
# how many noise tensors kohya draws for them per step
KOHYA_NOISES_PER_STEP = {"euler_a": 1, "k_euler_a": 1, "dpm_2_a": 2, "k_dpm_2_a": 2}


def kohya_start_latents(
    generators: list[torch.Generator], shape: tuple[int, ...], dtype: torch.dtype, unused_noises: int
) -> torch.Tensor:
    """Start latents drawn as kohya's generator draws them, for the ancestral samplers.

    kohya seeds the global generator with the image's seed, draws the start latents, then draws
    ``unused_noises`` noise tensors meant for the sampler (one per step, two for dpm_2_a). Its hook
    that should hand those to the sampler never takes effect (diffusers' schedulers draw through
    ``randn_tensor``, which the hook does not replace), so the sampler draws its step noise
    afterwards, from where the generator stands: past the start latents and those unused tensors.
    Drawing the same way from each image's own generator gives kohya's picture for the same seed
    (for a single image; in a batch kohya's step noise comes from the last image's seed, while here
    each image keeps its own). ``shape`` is one image's latents.
    """
    latents = []
    for generator in generators:
        latents.append(torch.randn(shape, generator=generator, dtype=dtype))
        for _ in range(unused_noises):
            torch.randn(shape, generator=generator, dtype=dtype)
    return torch.cat(latents)


def _request_from(request, **changes) -> GenerationRequest:
    """A ``GenerationRequest`` copy of ``request`` (which may be a ``PromptSpec``) with changes."""
    if isinstance(request, GenerationRequest):
        return replace(request, **changes)
    fields = {name: getattr(request, name, None) for name in GenerationRequest.__dataclass_fields__}
    fields["output_type"] = fields["output_type"] or "pil"
    fields.update(changes)
    return GenerationRequest(**fields)


def _prepare_images(images: Any, width: int, height: int, mode: str) -> Any:
    """PIL images converted to ``mode`` and resized to the generation size; latents pass through."""
    if torch.is_tensor(images):
        return images
    prepared = []
    for image in _as_list(images):
        image = image.convert(mode) if image.mode != mode else image
        if image.size != (width, height):
            image = image.resize((width, height), resample=Image.LANCZOS)
        prepared.append(image)
    return prepared
