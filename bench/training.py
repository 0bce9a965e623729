"""Training measurements, run inside a worker process (one configuration per process).

The step is measured by driving the trainer's own ``main()`` on a small synthetic dataset, so
the benchmark times exactly what users run (data loader, text encoder with the spliced vectors,
noise, UNet, loss, backward, optimizer, guards, logging) and never goes stale when the loop
changes. The trainer needs no benchmark code; two public torch hooks do the work:

* a global optimizer post-step hook marks the end of every step;
* a global module forward hook (removed as soon as it has seen them) records the trainer's own
  UNet and text encoder, their input shapes, dtype and autocast state.

Between steps (inside the post-step hook, so outside the timed intervals) the *floor* is timed
on the trainer's own UNet: forward + backward to the text conditioning only, same shapes and
dtype. The text encoder's forward + backward to the new vectors is timed there too, because
Textual Inversion cannot avoid it: floor + text encoder ("TI floor") is the least any trainer
can do per step. Interleaving step, floor, step, floor ... means that load from other processes
on a shared machine hits both alike, so the step/floor ratio stays meaningful when absolute
seconds do not.
"""

from __future__ import annotations

import resource
import shutil
import statistics
import tempfile
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.optim.optimizer import register_optimizer_step_post_hook

from bench.checkpoint import CACHE_DIR
from bench.machine import load_average
from bench.memory import PeakRSS, process_peak_rss_bytes

TOKEN = "benchtok"
CAPTION = f"a photo of {TOKEN}"
DTYPE_FLAGS = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


@dataclass
class TrainSpec:
    """One training configuration and how often to repeat it."""

    checkpoint: str
    size: int = 256
    batch: int = 1
    dtype: str = "fp32"  # fp32 | bf16 | fp16 (CUDA)
    gradient_checkpointing: bool = False
    cache_latents: bool = True
    warmup: int = 1  # untimed steps (first-call kernel set-up); 0 is allowed, see StepClock
    timed: int = 3
    floor: bool = True  # also time the floor and the text encoder between the steps
    floor_warmup: int = 1  # untimed floor calls first (its backward-to-input kernels are new)
    floor_timed: int = 3
    num_vectors: int = 4
    device: str = "cpu"
    extra_args: list[str] = field(default_factory=list)  # more trainer options, e.g. to try a fix
    worker_env: dict[str, str] = field(default_factory=dict)  # set by the parent for this process only


def run_training(spec: TrainSpec, log=print) -> dict:
    """Time ``spec`` through ``main()`` (with the floor between steps); a JSON-ready dict."""
    result: dict = {"spec": asdict(spec), "load_average_before": load_average()}
    work = Path(tempfile.mkdtemp(prefix="run-", dir=tmp_root()))
    try:
        result.update(time_trainer_steps(spec, work, log))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["load_average_after"] = load_average()
    return result


def tmp_root() -> Path:
    root = CACHE_DIR / "tmp"
    root.mkdir(parents=True, exist_ok=True)
    return root


def make_dataset(folder: Path, size: int, images: int, repeats: int) -> Path:
    """kohya DreamBooth layout: ``<repeats>_benchtok/imgN.png`` with ``.txt`` captions."""
    subset = folder / f"{repeats}_{TOKEN}"
    subset.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(images):
        pixels = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(subset / f"img{i}.png")
        (subset / f"img{i}.txt").write_text(CAPTION)
    return folder


def trainer_argv(spec: TrainSpec, data: Path, out: Path) -> list[str]:
    """A plain kohya-style command line; everything not listed keeps the trainer's default."""
    argv = [
        f"--pretrained_model_name_or_path={spec.checkpoint}",
        f"--train_data_dir={data}",
        f"--output_dir={out}",
        f"--resolution={spec.size},{spec.size}",
        "--caption_extension=.txt",
        f"--token_string={TOKEN}",
        "--init_word=toy",
        f"--num_vectors_per_token={spec.num_vectors}",
        f"--train_batch_size={spec.batch}",
        f"--max_train_steps={spec.warmup + spec.timed}",
        "--learning_rate=5e-3",
        f"--mixed_precision={DTYPE_FLAGS[spec.dtype]}",
        "--seed=0",
        "--console_log_level=WARNING",
    ]
    if spec.cache_latents:
        # the VAE only encodes the images before training; in fp32 that stays fast even where the
        # half dtype is emulated (many minutes per image), and the step itself does not change
        argv += ["--cache_latents", "--no_half_vae"]
    if spec.gradient_checkpointing:
        argv.append("--gradient_checkpointing")
    return argv + list(spec.extra_args)


# ---------------------------------------------------------------------------------------------
# what the hooks see of the trainer


@dataclass
class SeenModels:
    """The trainer's UNet and text encoder as they were called in its first step."""

    unet: torch.nn.Module | None = None
    unet_sample: tuple = ()
    unet_hidden: tuple = ()
    dtype: torch.dtype | None = None
    text_encoder: torch.nn.Module | None = None
    text_ids: torch.Tensor | None = None
    text_autocast: tuple[bool, torch.dtype] = (False, torch.float32)
    first_forward_at: tuple[float, float] | None = None  # (wall, cpu) of the text encoder's first call

    def pre_forward(self, module, args) -> None:
        """Global forward pre-hook: the text encoder's first call starts the first step."""
        if type(module).__name__ == "CLIPTextModel" and self.text_encoder is None and args:
            ids = args[0]
            self.first_forward_at = now()
            self.text_encoder, self.text_ids = module, ids.detach().clone()
            self.text_autocast = (
                torch.is_autocast_enabled(ids.device.type),
                torch.get_autocast_dtype(ids.device.type),
            )

    def post_forward(self, module, args, kwargs, output) -> None:
        """Global forward hook: the UNet and its input shapes, however the trainer passes them."""
        if type(module).__name__ == "UNet2DConditionModel" and self.unet is None:
            sample = args[0] if args else kwargs["sample"]
            hidden = args[2] if len(args) > 2 else kwargs["encoder_hidden_states"]
            self.unet, self.unet_sample, self.unet_hidden = module, tuple(sample.shape), tuple(hidden.shape)
            self.dtype = next(module.parameters()).dtype
        if self.complete:  # seen all: no hook overhead in the steps that are timed
            self.remove()

    def install(self) -> list:
        hooks = torch.nn.modules.module
        self.handles = [
            hooks.register_module_forward_pre_hook(self.pre_forward),
            hooks.register_module_forward_hook(self.post_forward, with_kwargs=True),
        ]
        return self.handles

    def remove(self) -> None:
        for handle in getattr(self, "handles", []):
            handle.remove()

    @property
    def complete(self) -> bool:
        return self.unet is not None and self.text_encoder is not None


def floor_call(seen: SeenModels, device: torch.device):
    """UNet forward + backward to ``encoder_hidden_states`` only (weights frozen): the floor."""
    latents = torch.randn(seen.unet_sample, dtype=seen.dtype, device=device)
    timesteps = torch.randint(0, 1000, (seen.unet_sample[0],), device=device)
    hidden = torch.randn(seen.unet_hidden, dtype=seen.dtype, device=device, requires_grad=True)

    def call() -> None:
        prediction = seen.unet(latents, timesteps, hidden).sample
        prediction.float().square().mean().backward()
        hidden.grad = None

    return call


def text_encoder_call(seen: SeenModels, device: torch.device):
    """The trainer's text encoder (new vectors spliced in) forward + backward, under its autocast."""
    enabled, dtype = seen.text_autocast
    autocast = torch.autocast(device.type, dtype=dtype) if enabled else nullcontext()

    def call() -> None:
        with autocast:
            states = seen.text_encoder(seen.text_ids)[0]
        states.float().square().mean().backward()

    return call


@dataclass
class StepClock:
    """Step boundaries from the optimizer post-step hook, and the floor measured between steps.

    Step k is timed from the moment the hook of step k-1 returned (its extra work excluded) to
    the end of step k. The first step has no previous hook; it is timed from the text encoder's
    first forward, so very slow configurations (bf16 without native kernels: minutes per step)
    need no wasted warm-up step.
    """

    spec: TrainSpec
    memory: PeakRSS
    seen: SeenModels = field(default_factory=SeenModels)
    ends: list[tuple[float, float]] = field(default_factory=list)
    resumes: list[tuple[float, float]] = field(default_factory=list)
    floor: list[tuple[float, float]] = field(default_factory=list)
    text: list[tuple[float, float]] = field(default_factory=list)
    floor_after_step: list[int] = field(default_factory=list)  # 1-based step each floor call followed
    optimizer: object = None
    load_peak: int | None = None  # peak RSS from the start to the end of the first step
    load_cuda_peak: int | None = None
    _floor_warmed: bool = False

    def __call__(self, optimizer, args, kwargs) -> None:
        self._sync()
        self.ends.append(now())
        self.optimizer = optimizer
        if len(self.ends) == 1:  # steady state starts after the first step
            self.load_peak = self.memory.peak
            self.memory.reset()
            if self.spec.device == "cuda":
                self.load_cuda_peak = torch.cuda.max_memory_allocated()
                torch.cuda.reset_peak_memory_stats()
        if (
            self.spec.floor
            and len(self.ends) >= max(1, self.spec.warmup)
            and len(self.floor) < self.spec.floor_timed
        ):
            self._measure_floor(optimizer)
        self._sync()
        self.resumes.append(now())

    def _measure_floor(self, optimizer) -> None:
        if not self.seen.complete:
            return
        device = torch.device(self.spec.device)
        if not self.floor and not self._floor_warmed:
            self._floor_warmed = True
            for _ in range(self.spec.floor_warmup):
                floor_call(self.seen, device)()
        params = [p for group in optimizer.param_groups for p in group["params"]]
        saved = [p.grad for p in params]  # the trainer's gradients stay as they were
        for p in params:
            p.grad = None
        self.text.append(self._time(text_encoder_call(self.seen, device)))
        self.floor.append(self._time(floor_call(self.seen, device)))
        self.floor_after_step.append(len(self.ends))
        for p, grad in zip(params, saved):
            p.grad = grad

    def _time(self, call) -> tuple[float, ...]:
        self._sync()
        before = now()
        call()
        self._sync()
        return tuple(b - a for a, b in zip(before, now()))

    def _sync(self) -> None:
        if self.spec.device == "cuda":
            torch.cuda.synchronize()

    def step_times(self) -> list[tuple[float, ...]]:
        """(wall s, CPU s, system CPU s, page faults) of every step."""
        starts = ([self.seen.first_forward_at] if self.seen.first_forward_at else []) + self.resumes[:-1]
        if len(starts) < len(self.ends):  # no first forward seen: the first step cannot be timed
            starts = [None] + starts
        return [tuple(b - a for a, b in zip(s, e)) for s, e in zip(starts, self.ends) if s is not None]


def now() -> tuple[float, float, float, int]:
    """Wall clock, process CPU time, its system (kernel) part, and minor page faults so far.

    System time and page faults show memory being returned to the OS and faulted in again
    every step (glibc's allocator and large tensors), a cost that other load does not fake.
    """
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return time.perf_counter(), time.process_time(), usage.ru_stime, usage.ru_minflt


def time_trainer_steps(spec: TrainSpec, work: Path, log=print) -> dict:
    """Run ``train_textual_inversion.main`` for warmup + timed steps and read the step times."""
    import train_textual_inversion

    data = make_dataset(work / "data", spec.size, images=spec.batch, repeats=spec.warmup + spec.timed)
    argv = trainer_argv(spec, data, work / "out")
    with PeakRSS() as memory:
        clock = StepClock(spec, memory)
        hooks = clock.seen.install() + [register_optimizer_step_post_hook(clock)]
        started = time.perf_counter()
        try:
            train_textual_inversion.main(argv)
        finally:
            for hook in hooks:
                hook.remove()
        total = time.perf_counter() - started
        steps_memory = memory.peak
    steps = clock.step_times()[spec.warmup :]
    if len(steps) != spec.timed:
        raise RuntimeError(f"expected {spec.timed} timed steps, the trainer made {len(clock.ends)} in all")
    wall = [s[0] for s in steps]
    log(
        f"    steps: {_list(wall)} s (kernel time {_list(s[2] for s in steps)} s, page faults "
        f"{', '.join(str(s[3]) for s in steps)})"
    )
    result = {
        "argv": argv,
        "step_seconds": wall,
        "step_cpu_seconds": [s[1] for s in steps],
        "step_system_seconds": [s[2] for s in steps],
        "step_page_faults": [s[3] for s in steps],
        "step_median": statistics.median(wall),
        "main_total_seconds": total,
        "main_setup_seconds": clock.ends[0][0] - started if clock.ends else None,
        "peak_rss_load_bytes": clock.load_peak,  # loading, caching and the first step
        "peak_rss_steps_bytes": steps_memory,
        "peak_rss_process_bytes": process_peak_rss_bytes(),
        "optimizer": optimizer_state_report(clock.optimizer, spec.num_vectors),
    }
    if spec.device == "cuda":
        result["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated()
        result["cuda_max_allocated_load_bytes"] = clock.load_cuda_peak
    if clock.floor:
        log(f"    floor (UNet fwd + bwd to the conditioning): {_list(s[0] for s in clock.floor)} s")
        log(f"    text encoder fwd + bwd to the vectors: {_list(s[0] for s in clock.text)} s")
        result.update(
            floor_seconds=[s[0] for s in clock.floor],
            floor_cpu_seconds=[s[1] for s in clock.floor],
            floor_system_seconds=[s[2] for s in clock.floor],
            floor_page_faults=[s[3] for s in clock.floor],
            floor_median=statistics.median(s[0] for s in clock.floor),
            text_encoder_seconds=[s[0] for s in clock.text],
            text_encoder_cpu_seconds=[s[1] for s in clock.text],
            text_encoder_median=statistics.median(s[0] for s in clock.text),
            shapes={
                "unet_sample": clock.seen.unet_sample,
                "unet_hidden": clock.seen.unet_hidden,
                "dtype": str(clock.seen.dtype),
                "text_ids": list(clock.seen.text_ids.shape),
            },
        )
        for suffix, i in (("", 0), ("_cpu", 1)):
            step, floor, text = [s[i] for s in steps], [s[i] for s in clock.floor], [s[i] for s in clock.text]
            result["step_over_floor" + suffix] = min(step) / min(floor)
            result["step_over_ti_floor" + suffix] = min(step) / (min(floor) + min(text))
        timed_numbers = range(spec.warmup + 1, spec.warmup + spec.timed + 1)
        result.update(paired_ratios(wall, timed_numbers, clock))
    return result


def paired_ratios(steps: list[float], numbers, clock: StepClock) -> dict:
    """Each timed step over the floor calls measured right before and right after it; the median.

    On a shared machine the speed drifts over minutes (other load, a neighbour on the host), and
    steps and floor calls drift together. Dividing each step by its own neighbours cancels the
    drift; the median of those ratios is the headline, the ratio of minima a cross-check.
    """
    floors = dict(zip(clock.floor_after_step, (s[0] for s in clock.floor)))
    texts = dict(zip(clock.floor_after_step, (s[0] for s in clock.text)))
    over_floor, over_ti_floor = [], []
    for seconds, number in zip(steps, numbers):
        around = [k for k in (number - 1, number) if k in floors]
        if not around:
            continue
        floor = statistics.fmean(floors[k] for k in around)
        text = statistics.fmean(texts[k] for k in around)
        over_floor.append(seconds / floor)
        over_ti_floor.append(seconds / (floor + text))
    if not over_floor:
        return {}
    return {
        "paired_step_over_floor": over_floor,
        "paired_step_over_ti_floor": over_ti_floor,
        "step_over_floor_paired": statistics.median(over_floor),
        "step_over_ti_floor_paired": statistics.median(over_ti_floor),
        "text_encoder_share_of_floor": statistics.median(
            t / f for t, f in zip(texts.values(), floors.values())
        ),
    }


def _list(values) -> str:
    return ", ".join(f"{v:.2f}" for v in values)


def optimizer_state_report(optimizer, num_vectors: int) -> dict:
    """Bytes of optimizer state: per-element slots (moments) vs scalars (step counters).

    The expectation is ``N x dim x slots x 4``: fp32 state for the N new vectors only, never for
    the 49,408-row token table (kohya's layout).
    """
    if optimizer is None:
        return {}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    slot_bytes = scalar_bytes = slots = 0
    for param in params:
        for value in optimizer.state.get(param, {}).values():
            if not torch.is_tensor(value):
                continue
            size = value.numel() * value.element_size()
            if value.numel() == param.numel():
                slot_bytes += size
                slots += 1
            else:
                scalar_bytes += size
    trained = sum(p.numel() for p in params)
    dim = trained // num_vectors if num_vectors else 0
    return {
        "class": f"{type(optimizer).__module__}.{type(optimizer).__name__}",
        "trained_parameters": trained,
        "param_shapes": [list(p.shape) for p in params],
        "slots": slots,
        "slot_bytes": slot_bytes,
        "scalar_bytes": scalar_bytes,
        "expected_bytes": num_vectors * dim * slots * 4,
        "total_bytes": slot_bytes + scalar_bytes,
    }


# ---------------------------------------------------------------------------------------------
# model load time


def time_model_load(checkpoint: str, repeats: int = 2, log=print) -> dict:
    """``load_sd_model`` of the single file, ``repeats`` times in this fresh process."""
    import gc

    from library.models.loading import load_sd_model

    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        model = load_sd_model(checkpoint)
        seconds.append(time.perf_counter() - started)
        del model
        gc.collect()
    log(f"    load_sd_model: {_list(seconds)} s")
    return {
        "load_seconds": seconds,
        "load_median": statistics.median(seconds),
        "peak_rss_process_bytes": process_peak_rss_bytes(),
        "load_average": load_average(),
    }
