"""Generation overhead: ``library.generation.generator.ImageGenerator`` vs a bare diffusers pipeline.

Both render the same prompt with the same modules, DDIM scheduler config, steps, size, guidance
scale and seed, alternating (A B, B A, ...) so that load changes from other processes hit both
alike. The images are compared too: a large difference would mean the two did different work
and the overhead number would be meaningless.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from bench.machine import load_average

PROMPT = "a photo of a cat sitting on a wooden table"
SEED = 1234
GUIDANCE = 7.5


@dataclass
class GenerationSpec:
    checkpoint: str
    size: int = 256
    steps: int = 10
    rounds: int = 4
    dtype: str = "fp32"
    device: str = "cpu"


def run_generation(spec: GenerationSpec, log=print) -> dict:
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from library.generation.generator import GenerationRequest, ImageGenerator
    from library.host_memory import keep_freed_memory_in_process
    from library.models.loading import load_sd_model

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[spec.dtype]
    model = load_sd_model(spec.checkpoint)
    for module in (model.unet, model.vae, model.text_encoder):
        module.requires_grad_(False)
    model.text_encoder.to(spec.device)
    if spec.device == "cpu":  # as gen_img_diffusers.py does, after loading; both pipelines below share it
        keep_freed_memory_in_process()
    generator = ImageGenerator(model, device=spec.device, dtype=dtype)
    bare = StableDiffusionPipeline(
        vae=model.vae,
        text_encoder=model.text_encoder,
        tokenizer=model.tokenizer,
        unet=model.unet,
        scheduler=DDIMScheduler(**model.scheduler_config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    bare.set_progress_bar_config(disable=True)

    def ours(steps: int):
        request = GenerationRequest(
            prompt=PROMPT,
            negative_prompt="",
            width=spec.size,
            height=spec.size,
            steps=steps,
            scale=GUIDANCE,
            seeds=SEED,
            sampler="ddim",
        )
        return generator.generate(request)[0]

    def theirs(steps: int):
        return bare(
            PROMPT,
            negative_prompt="",
            width=spec.size,
            height=spec.size,
            num_inference_steps=steps,
            guidance_scale=GUIDANCE,
            generator=torch.Generator("cpu").manual_seed(SEED),
        ).images[0]

    result: dict = {"spec": asdict(spec), "load_average_before": load_average()}
    ours(1), theirs(1)  # warm-up: kernels for the CFG batch of 2 at this size, VAE decoder
    seconds: dict[str, list[float]] = {"library.generation.generator": [], "diffusers": []}
    cpu_seconds: dict[str, list[float]] = {"library.generation.generator": [], "diffusers": []}
    images = {}
    for i in range(spec.rounds):
        order = [("library.generation.generator", ours), ("diffusers", theirs)]
        for name, fn in order if i % 2 == 0 else reversed(order):
            started, cpu_started = time.perf_counter(), time.process_time()
            images[name] = fn(spec.steps)
            seconds[name].append(time.perf_counter() - started)
            cpu_seconds[name].append(time.process_time() - cpu_started)
            log(f"    {name}: {seconds[name][-1]:.2f} s/image ({cpu_seconds[name][-1]:.2f} CPU s)")
    ours_median = statistics.median(seconds["library.generation.generator"])
    theirs_median = statistics.median(seconds["diffusers"])
    ours_cpu = statistics.median(cpu_seconds["library.generation.generator"])
    theirs_cpu = statistics.median(cpu_seconds["diffusers"])
    difference = np.abs(
        np.asarray(images["library.generation.generator"], dtype=np.int16)
        - np.asarray(images["diffusers"], dtype=np.int16)
    )
    result.update(
        seconds=seconds,
        ours_median=ours_median,
        diffusers_median=theirs_median,
        overhead=ours_median / theirs_median - 1.0,
        # each round ran both pipelines back to back: their ratio cancels slow drift of the machine
        overhead_paired=statistics.median(
            a / b for a, b in zip(seconds["library.generation.generator"], seconds["diffusers"])
        )
        - 1.0,
        cpu_seconds=cpu_seconds,
        overhead_cpu=ours_cpu / theirs_cpu - 1.0,
        image_max_abs_difference=int(difference.max()),
        load_average_after=load_average(),
    )
    generator.close()
    return result
