"""What the numbers were measured on: CPU, cores, library versions, load, and whether bf16 is native.

Timings only mean something next to the machine that produced them; on a shared machine the
load average says how much of the CPU the benchmark actually had.
"""

from __future__ import annotations

import datetime
import os
import platform
import time
from pathlib import Path

# CPU features that decide which kernels torch can use for fp32 / bf16 / fp16
INTERESTING_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile", "bf16")


def cpu_info() -> dict:
    """CPU model (from /proc/cpuinfo on Linux, else what ``platform`` knows) and the flags above."""
    from library.runtime import cpu_flags

    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
                break
    flags = cpu_flags()
    return {"model": model, "flags": [f for f in INTERESTING_FLAGS if f in flags]}


def load_average() -> float | None:
    """The 1-minute load average (None where the OS has none)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def describe_machine() -> dict:
    """Everything RESULTS.md prints about the machine and the software."""
    import diffusers
    import torch
    import transformers

    info = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": cpu_info(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_cpu_capability": _cpu_capability(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "cuda": None,
        "memory_gb": _memory_gb(),
        "load_average_at_start": load_average(),
        "cli_allocator": "glibc",
    }
    if torch.cuda.is_available():
        info["cuda"] = {"device": torch.cuda.get_device_name(0), "version": torch.version.cuda}
    else:
        info["cli_allocator"] = _cli_allocator()
    return info


def preloaded_allocator() -> str:
    """What this process (and a program it starts) allocates with: what ``LD_PRELOAD`` names, which
    a restart under tcmalloc sets too, else glibc's malloc."""
    return os.environ.get("LD_PRELOAD") or "glibc"


def _cli_allocator() -> str:
    """What the trainer and the generator started from here allocate with (``library.allocator``)."""
    from library.allocator import allocator_to_preload
    from library.errors import UserError

    try:
        return allocator_to_preload(os.environ) or "glibc"
    except UserError as error:
        return f"unusable: {error}"


def _cpu_capability() -> str | None:
    import torch

    try:
        return torch.backends.cpu.get_cpu_capability()
    except AttributeError:
        return None


def _memory_gb() -> float | None:
    try:
        pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
    return round(pages * page_size / 1e9, 1)


def half_precision_probe(device: str = "cpu") -> dict:
    """How much slower the half dtype is than fp32 on a UNet-shaped conv and matmul, here.

    On CPUs without native bf16 kernels (no avx512_bf16 / AMX) torch falls back to slow generic
    convolutions, and a bf16 training step can take tens of times longer than fp32. The benchmark
    reads this probe (a few seconds) to cut bf16 repetitions to the minimum instead of running
    for hours, and the report says so.
    """
    import torch

    half = torch.float16 if device == "cuda" else torch.bfloat16
    conv = torch.nn.Conv2d(320, 320, 3, padding=1).to(device)
    linear = torch.nn.Linear(768, 768).to(device)
    image = torch.randn(1, 320, 32, 32, device=device)
    tokens = torch.randn(1024, 768, device=device)
    seconds = {}
    for dtype in (torch.float32, half):
        conv.to(dtype)
        linear.to(dtype)
        x, t = image.to(dtype), tokens.to(dtype)
        seconds[str(dtype).removeprefix("torch.")] = {
            "conv3x3": _best_of(lambda x=x: conv(x), device),
            "linear": _best_of(lambda t=t: linear(t), device),
        }
    fp32, low = seconds["float32"], seconds[str(half).removeprefix("torch.")]
    slowdown = max(low["conv3x3"] / fp32["conv3x3"], low["linear"] / fp32["linear"])
    native = None
    if device == "cpu":
        from library.runtime import cpu_has_native_bf16

        native = cpu_has_native_bf16()
    return {
        "dtype": str(half).removeprefix("torch."),
        "seconds": seconds,
        "slowdown_vs_fp32": round(slowdown, 2),
        "native_kernels": native,
        "emulated": slowdown > 2.0,
    }


def _best_of(fn, device: str, repeats: int = 3) -> float:
    import torch

    with torch.no_grad():
        fn()  # first call builds the kernel's primitive
        best = float("inf")
        for _ in range(repeats):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - start)
    return best
