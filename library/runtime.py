"""What the trainer and the generator share at run time: console logging, the compute precision
and its CPU fallback, the attention backend, and the refusal of options that cannot work here.

One rule each, so the two programs never disagree (they used to: the generator and the trainer
had their own fp16 fallback, xformers choice, log set-up and refusal loop). torch and diffusers
are imported inside the functions that need them, so that a mistake on the command line is
reported before those slow imports.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from library.errors import UserError
from library.shared_options import ConsoleSettings

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

NATIVE_BF16_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}  # x86 flags; "bf16" is Arm's Features entry


# ---------------------------------------------------------------------------------------------
# console logging


def log_level(name: str | None) -> int:
    """``--console_log_level`` (``DEBUG`` ... ``CRITICAL``; INFO when not given) as a logging level."""
    return getattr(logging, name or "INFO")


def setup_console_logging(settings: ConsoleSettings) -> None:
    """``--console_log_level/file/simple``: plain lines on stderr (or into a file)."""
    fmt = "%(message)s" if settings.console_log_simple else "%(asctime)s %(levelname)s %(name)s: %(message)s"
    log_file = settings.console_log_file
    handler = (
        logging.FileHandler(log_file, encoding="utf-8") if log_file else logging.StreamHandler(sys.stderr)
    )
    handler.setFormatter(logging.Formatter(fmt, datefmt="%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(log_level(settings.console_log_level))
    for noisy in ("httpx", "urllib3", "PIL", "torch._dynamo"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # diffusers/transformers chatter (dtype casts, weight loading bars) says nothing users can act on
    for library in ("diffusers", "transformers"):
        _errors_only(library)


def _errors_only(library: str) -> None:
    """Let ``library`` (diffusers, transformers) log errors only, without importing it (seconds):
    one already imported is told now; one imported later reads its verbosity variable then."""
    module = sys.modules.get(library)
    if module is not None:
        module.utils.logging.set_verbosity_error()
    else:
        os.environ[f"{library.upper()}_VERBOSITY"] = "error"


# ---------------------------------------------------------------------------------------------
# precision


def torch_dtype(precision: str) -> torch.dtype:
    """``no``/``fp16``/``bf16`` (accelerate's names) as a torch dtype."""
    import torch

    return {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


def vae_dtype(weight_dtype: torch.dtype, no_half_vae: bool) -> torch.dtype:
    """The VAE's dtype: the models' own, or fp32 with ``--no_half_vae`` (SDXL's VAE overflows to NaN,
    black images, in fp16; kohya's trainers and SDXL generators take the option)."""
    import torch

    return torch.float32 if no_half_vae else weight_dtype


def cpu_has_native_bf16() -> bool:
    """Whether the CPU computes bf16 in hardware (AVX512-BF16, AMX, or Arm's BF16), so bf16 beats fp32.

    oneDNN's own check (``torch.ops.mkldnn._is_mkldnn_bf16_supported``) also answers yes on plain
    AVX-512, where bf16 is emulated by converting to fp32 and back: there a bf16 UNet step took
    2.5 times as long as fp32 (docs/benchmarks.md). So the instruction sets themselves are asked:
    torch's CPU feature checks where this torch has them, and the kernel's CPU flags.
    """
    import torch

    checks = [
        getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    ]
    for check in checks:
        try:
            if check is not None and check():
                return True
        except RuntimeError:
            pass
    return bool(NATIVE_BF16_FLAGS & cpu_flags())


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The CPU feature flags the kernel reports (``flags`` on x86, ``Features`` on Arm); empty elsewhere."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def usable_precision(wanted: str, flag: str, on_gpu: bool | None = None, *, bf16_flag: str) -> str:
    """``wanted`` (``no``, ``fp16`` or ``bf16``) as it can run here: the one CPU rule of both programs.

    fp16 needs a GPU; on a CPU it becomes bf16 where bf16 is native, else fp32, with a warning.
    bf16 on a CPU without native bf16 runs, emulated and slow, with a warning. fp32 on a CPU with
    native bf16 runs as asked, and the log names ``bf16_flag``, the option that asks for bf16:
    kohya's default is fp32, and such CPUs compute bf16 several times faster.
    """
    if on_gpu is None:
        import torch

        on_gpu = torch.cuda.is_available()
    if on_gpu:
        return wanted
    if wanted == "no":
        if cpu_has_native_bf16():
            logger.info(
                "this CPU computes bfloat16 in hardware (AVX512-BF16/AMX): on a full-size model %s runs "
                "several times faster than float32",
                bf16_flag,
            )
        return wanted
    if wanted == "fp16":
        if cpu_has_native_bf16():
            logger.warning("%s: float16 needs a GPU; on this CPU bfloat16 is used instead", flag)
            return "bf16"
        logger.warning("%s: float16 needs a GPU and this CPU has no native bfloat16; using float32", flag)
        return "no"
    if not cpu_has_native_bf16():
        logger.warning(
            "%s: this CPU has no native bfloat16 kernels (no AVX512-BF16/AMX), so bfloat16 is emulated and much "
            "slower than float32; consider float32",
            flag,
        )
    return wanted


# ---------------------------------------------------------------------------------------------
# attention


def use_attention(modules: list, *, xformers: bool, flag: str, device: torch.device) -> str:
    """xformers where asked for and usable (CUDA, installed); else PyTorch SDPA. Returns the choice."""
    if xformers:
        try:
            import xformers as _xformers  # noqa: F401

            usable = device.type == "cuda"
        except ImportError:
            usable = False
        if usable:
            for module in modules:
                module.enable_xformers_memory_efficient_attention()
            return "xformers"
        logger.warning(
            "%s: xformers is not installed or has no kernels for %s; using SDPA", flag, device.type
        )
    from diffusers.models.attention_processor import AttnProcessor2_0

    for module in modules:
        module.set_attn_processor(AttnProcessor2_0())
    return "sdpa"


# ---------------------------------------------------------------------------------------------
# options that cannot work here


INT64_MAX = 2**63 - 1  # torch's and numpy's counters and seeds


def refuse_impossible_numbers(namespace: Any, parser: Any) -> None:
    """One line for the first number option given as ``nan`` or ``inf`` (Python's float() reads
    both) or as a whole number beyond 64 bits: none of them means anything infinite, a NaN would only
    show steps later (as a NaN loss or black images blamed on something else), and a huge count
    ends in an overflow deep inside torch."""
    for action in parser._actions:
        values = getattr(namespace, action.dest, None)
        for value in values if isinstance(values, list) else [values]:
            if isinstance(value, float) and not math.isfinite(value):
                raise UserError(f"--{action.dest} {value}: must be a finite number")
            if isinstance(value, int) and not isinstance(value, bool) and abs(value) > INT64_MAX:
                raise UserError(f"--{action.dest} {value}: too large")


def refuse_options(namespace: Any, parser: Any, reasons: dict[str, str]) -> None:
    """One line for the first option of ``reasons`` (``name: why``) given a value other than its
    default; the defaults are the parser's own, so each is written once, where the option is declared.

    An empty list (``--network_module`` with no value) counts as not given, as in kohya's scripts.
    """
    for name, why in reasons.items():
        value = getattr(namespace, name)
        if value == parser.get_default(name) or value == []:
            continue
        raise UserError(f"--{name}: {why}")
