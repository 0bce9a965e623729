"""Keep freed host memory inside the process when the model runs on the CPU (Linux, glibc).

Where tcmalloc or jemalloc is installed, the programs run under it instead (``library.allocator``)
and none of this applies: what follows makes the best of glibc's malloc where it is the only one.

Why: glibc serves every allocation above its mmap threshold (at most 32 MB, by default) with a
fresh ``mmap`` and hands it back to the kernel on ``free``. A Stable Diffusion UNet step on the
CPU allocates and frees hundreds of activations of that size, so each step the kernel zeroes and
faults in the same gigabytes again: on the benchmark machine about 600 thousand page faults and
1.9 s of kernel time in a 5.6 s step (docs/benchmarks.md). Raising the mmap threshold and never
trimming the heap on ``free`` lets freed blocks be reused within a step.

Between steps the trainer hands the freed memory back (``hand_back_what_the_step_freed``), when
there is enough of it to matter. Each step lays its activations out a little differently among
the blocks that outlive it, so a heap that kept every page would hold the union of all the
steps' layouts, gigabytes above what any one step has live on a full-size SDXL
(docs/benchmarks.md). Handed back, the next step faults its pages in once, not at every
allocation as with glibc's defaults; that costs up to a tenth of a step, so ``--highvram``
(speed first) keeps them.

When: after the model has loaded (and latents are cached), never before. Loading frees large
temporaries (the file's fp16 tensors once cast, converted copies, the VAE after caching); with
freed memory kept, each of them stayed resident for the whole run (a full-size SD 1.5 under
``--mixed_precision bf16`` held 3.4 GB after loading, 2.5 GB once they are returned). So the switch
first hands everything freed so far back to the kernel (``malloc_trim``), then keeps what the
steps free from then on.

That trade is right for a CPU run, where the same memory is needed again at once. On a GPU the
host only holds the model while it loads, and keeping that memory would waste RAM, so callers
use this only for CPU runs. Anyone who sets glibc's malloc knobs themselves (``MALLOC_*``
variables, ``GLIBC_TUNABLES``) or preloads another allocator keeps their own choice.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import sys

logger = logging.getLogger(__name__)

# mallopt() parameter numbers from glibc's <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# Blocks up to 1 GiB come from the heap (a 512 px batch-4 activation is far below that); the
# trim threshold is the largest value mallopt's int takes: a free never shrinks the heap.
HEAP_BLOCKS_UP_TO = 1 << 30
NEVER_TRIM = 2**31 - 1
# Below this much free heap after a step, the steps' layouts cannot add up to much, and on a small
# model's short steps the trim's walk and the pages faulted in again would cost more than they save.
STEP_HAND_BACK_FROM = 256 << 20
# The variable that picks the allocator (``library.allocator``), and the one that tells a process
# restarted under tcmalloc or jemalloc what it runs under.
ALLOCATOR_CHOICE = "TI_ALLOCATOR"
PRELOADED_ALLOCATOR = "TI_ALLOCATOR_PRELOADED"
# PyTorch's switch for placing CPU tensors of 2 MB and more on transparent huge pages (madvise).
# The restart under tcmalloc sets it: a full-size SDXL step was faster with it at the same peak
# memory (docs/benchmarks.md).
HUGE_PAGES = "THP_MEM_ALLOC_ENABLE"


class _MallInfo2(ctypes.Structure):
    """glibc's ``struct mallinfo2`` (glibc 2.33 and later)."""

    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def glibc_version() -> str | None:
    """``"2.36"`` on a glibc system, else None (musl, macOS, Windows)."""
    try:
        name, _, version = (os.confstr("CS_GNU_LIBC_VERSION") or "").partition(" ")
    except (AttributeError, ValueError, OSError):
        return None
    return version if name == "glibc" else None


def user_allocator_settings(environ: dict[str, str] | None = None) -> str | None:
    """The user's own allocator settings that we must not override, or None."""
    environ = os.environ if environ is None else environ
    own = sorted(name for name in environ if name.startswith("MALLOC_"))
    if own:
        return ", ".join(own)
    if "glibc.malloc." in environ.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES"
    if "malloc" in environ.get("LD_PRELOAD", ""):
        return "LD_PRELOAD"
    return None


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc on Linux (opened once: the trainer asks after every step)."""
    if not sys.platform.startswith("linux") or glibc_version() is None:
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    if hasattr(libc, "mallinfo2"):  # glibc 2.33 and later
        libc.mallinfo2.restype = _MallInfo2
    return libc


def hand_back_freed_memory() -> bool:
    """Return the freed parts of the heap to the kernel now (glibc ``malloc_trim``); True if done.

    glibc only shrinks the heap from its top, so memory freed below a live block stays resident
    until asked for: after a large model part is dropped (the VAE once latents are cached), this
    makes room for the next part instead of leaving it to grow the process; after a training step,
    it keeps the pages of that step's layout from adding to the next one's.
    """
    libc = _glibc()
    if libc is None or not hasattr(libc, "malloc_trim"):
        return False
    libc.malloc_trim(0)
    return True


def free_heap_bytes() -> int | None:
    """Bytes glibc's heaps hold free (resident or not), or None where glibc cannot say."""
    libc = _glibc()
    if libc is None or not hasattr(libc, "mallinfo2"):  # glibc before 2.33
        return None
    return int(libc.mallinfo2().fordblks)


def hand_back_what_the_step_freed() -> bool:
    """After a training step: hand the freed heap back when there is enough of it to matter
    (``STEP_HAND_BACK_FROM``); True if handed back."""
    free = free_heap_bytes()
    return free is not None and free >= STEP_HAND_BACK_FROM and hand_back_freed_memory()


def keep_freed_memory_in_process() -> bool:
    """Tune glibc malloc for a CPU run, once the model is loaded (see the module docstring).

    True if the settings were applied.
    """
    libc = _glibc()
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    preloaded = os.environ.get(PRELOADED_ALLOCATOR)
    if preloaded:
        huge_pages = ", large tensors on transparent huge pages" if os.environ.get(HUGE_PAGES) == "1" else ""
        logger.info(
            "memory allocator: %s, preloaded at start%s (%s=glibc keeps glibc's)",
            preloaded,
            huge_pages,
            ALLOCATOR_CHOICE,
        )
        return False
    own = user_allocator_settings()
    if own is not None:
        logger.debug("allocator left as set by %s", own)
        return False
    if os.environ.get(ALLOCATOR_CHOICE) != "glibc":
        logger.info(
            "memory allocator: glibc's; with tcmalloc installed (Debian/Ubuntu: apt install "
            "libtcmalloc-minimal4) CPU runs take less memory and time (docs/training.md, Precision, memory, speed)"
        )
    hand_back_freed_memory()  # the load's freed temporaries go back to the kernel first
    applied = libc.mallopt(M_MMAP_THRESHOLD, HEAP_BLOCKS_UP_TO) == 1
    applied = libc.mallopt(M_TRIM_THRESHOLD, NEVER_TRIM) == 1 and applied
    if applied:
        logger.debug("glibc malloc: blocks up to 1 GiB from the heap, freed memory kept for reuse")
    return applied
