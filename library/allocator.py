"""Run CPU training and generation under tcmalloc (or jemalloc) when the system has it (Linux).

Why: glibc's malloc lays each step's activations out a little differently among the blocks that
outlive the step, so its heap grows to the union of those layouts unless the trainer hands the
freed memory back after every step, and then the next step faults the same pages in again
(``library.host_memory``). tcmalloc and jemalloc keep blocks of one size together and return
memory gradually, so neither cost arises: a full-size SDXL step under either took less memory
at its peak and less time (docs/benchmarks.md). PyTorch's own CPU launcher
(``torch.backends.xeon.run_cpu``) and the WebUI's launch script preload them for the same reason.

An allocator must be in place before the process allocates anything, so the entry scripts call
``restart_under_installed_allocator`` first, before their heavy imports: it starts the same
command again with the library in ``LD_PRELOAD`` (``os.execve``: the same process id, so launchers
and signals are unaffected). It does nothing on a machine with a CUDA device (host memory matters
little there, and GPU runs stay as they were), outside glibc Linux, when the user preloads an
allocator or sets glibc's malloc knobs, or with ``TI_ALLOCATOR=glibc``. ``TI_ALLOCATOR=tcmalloc``,
``jemalloc`` or a library's path asks for one; an unusable value is one error line. Under tcmalloc
the restart also asks PyTorch to put large tensors on transparent huge pages (``HUGE_PAGES``).
"""

from __future__ import annotations

import ctypes.util
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

from library.errors import UserError
from library.host_memory import ALLOCATOR_CHOICE as CHOICE
from library.host_memory import HUGE_PAGES, glibc_version, user_allocator_settings
from library.host_memory import PRELOADED_ALLOCATOR as PRELOADED

# Library names (as the dynamic loader knows them) in order of preference, and the Debian/Ubuntu
# package that installs them. tcmalloc first: its steps were the faster ones (docs/benchmarks.md).
ALLOCATORS = {
    "tcmalloc": (("tcmalloc_minimal", "tcmalloc"), "libtcmalloc-minimal4"),
    "jemalloc": (("jemalloc",), "libjemalloc2"),
}


def installed_allocator(
    name: str, find_library: Callable[[str], str | None] = ctypes.util.find_library
) -> str | None:
    """The installed library of allocator ``name`` (``"libtcmalloc_minimal.so.4"``), or None."""
    libraries, _ = ALLOCATORS[name]
    return next((found for library in libraries if (found := find_library(library))), None)


def allocator_to_preload(
    environ: Mapping[str, str], find_library: Callable[[str], str | None] = ctypes.util.find_library
) -> str | None:
    """The library to restart under, or None to stay with glibc's malloc (see the module docstring)."""
    choice = environ.get(CHOICE, "").strip()
    if choice == "glibc" or PRELOADED in environ or user_allocator_settings(dict(environ)) is not None:
        return None
    if not choice:
        return next(
            (found for name in ALLOCATORS if (found := installed_allocator(name, find_library))), None
        )
    if choice in ALLOCATORS:
        found = installed_allocator(choice, find_library)
        if found is None:
            package = ALLOCATORS[choice][1]
            raise UserError(
                f"{CHOICE}={choice}: {choice} is not installed (Debian/Ubuntu: apt install {package}); "
                f"or set {CHOICE}=glibc"
            )
        return found
    if "/" in choice:
        if not Path(choice).is_file():
            raise UserError(
                f"{CHOICE}={choice}: no such file; give an allocator's shared library, or unset it"
            )
        return choice
    raise UserError(
        f"{CHOICE}={choice}: not an allocator this program knows; use tcmalloc, jemalloc, glibc "
        "or the path of an allocator's shared library"
    )


def _has_cuda_device() -> bool:
    import torch  # only when a restart is about to happen

    return torch.cuda.is_available()


def restart_under_installed_allocator() -> None:
    """Start this command again under tcmalloc or jemalloc when it should (module docstring);
    otherwise return and let the program run as it is."""
    if not sys.platform.startswith("linux") or glibc_version() is None:
        return
    library = allocator_to_preload(os.environ)
    if library is None or _has_cuda_device():
        return
    environ = restart_environment(os.environ, library)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environ)


def restart_environment(environ: Mapping[str, str], library: str) -> dict[str, str]:
    """The environment to start again in: ``library`` preloaded before the user's own preloads,
    and under tcmalloc PyTorch's tensors of 2 MB and more on transparent huge pages, unless the
    user set ``THP_MEM_ALLOC_ENABLE`` themselves."""
    preload = ":".join(part for part in (library, environ.get("LD_PRELOAD", "")) if part)
    restarted = {**environ, "LD_PRELOAD": preload, PRELOADED: library}
    if "tcmalloc" in Path(library).name:
        restarted.setdefault(HUGE_PAGES, "1")
    return restarted
