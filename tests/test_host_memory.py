"""Freed host memory is kept for reuse on CPU runs (glibc), unless the user tunes malloc; CPU runs
restart under tcmalloc or jemalloc where installed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from library.allocator import allocator_to_preload, restart_environment
from library.errors import UserError
from library.host_memory import glibc_version, user_allocator_settings

ROOT = Path(__file__).resolve().parent.parent

# Allocates and frees a 64 MB tensor (above glibc's largest automatic mmap threshold, 32 MB)
# again and again, and reports the minor page faults of the last 12 rounds: by then a heap that
# keeps freed memory has grown what it needs (aligned blocks take a few rounds to settle).
FAULT_PROBE = """
import json, resource, sys, torch
from library.host_memory import keep_freed_memory_in_process
applied = keep_freed_memory_in_process() if sys.argv[1] == "tune" else None
for round in range(24):
    if round == 12:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = torch.ones(16_000_000)
    del block
print(json.dumps({"applied": applied, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def probe(mode: str, **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    result = subprocess.run(
        [sys.executable, "-c", FAULT_PROBE, mode],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**clean, "OMP_NUM_THREADS": "1", **env},
        check=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_the_users_own_malloc_settings_win():
    assert user_allocator_settings({}) is None
    assert user_allocator_settings({"PATH": "/bin", "GLIBC_TUNABLES": "glibc.rtld.nns=2"}) is None
    assert user_allocator_settings({"MALLOC_TRIM_THRESHOLD_": "0"}) == "MALLOC_TRIM_THRESHOLD_"
    assert user_allocator_settings({"MALLOC_ARENA_MAX": "2"}) == "MALLOC_ARENA_MAX"
    assert user_allocator_settings({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"}) == "GLIBC_TUNABLES"
    assert user_allocator_settings({"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}) == "LD_PRELOAD"


@pytest.mark.skipif(glibc_version() is None, reason="glibc only")
def test_freed_blocks_are_reused_instead_of_faulted_in_again():
    default = probe("plain")
    tuned = probe("tune")
    assert tuned["applied"] is True
    # 12 x 64 MB = ~190k pages faulted in by default; kept in the heap, (almost) none
    assert default["faults"] > 100_000
    assert tuned["faults"] < default["faults"] / 20


@pytest.mark.skipif(glibc_version() is None, reason="glibc only")
def test_left_alone_when_the_user_sets_malloc_tunables():
    untouched = probe("tune", GLIBC_TUNABLES="glibc.malloc.perturb=0")
    assert untouched["applied"] is False
    assert untouched["faults"] > 100_000


# Fills the heap with 64 KB blocks (below glibc's mmap threshold), frees 7 in 8 of them so the
# holes cannot be trimmed from the top, and reports the resident size before and after the switch.
LOAD_LEFTOVERS_PROBE = """
import json, sys, torch
from library.host_memory import keep_freed_memory_in_process
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
blocks = [torch.ones(16_000) for _ in range(6_000)]
kept = blocks[::8]
del blocks
before = rss()
applied = keep_freed_memory_in_process()
print(json.dumps({"applied": applied, "before": before, "after": rss()}))
"""


@pytest.mark.skipif(glibc_version() is None, reason="glibc only")
def test_what_loading_freed_goes_back_before_freed_memory_is_kept():
    """Switched on after the model loads, the switch first returns the load's freed temporaries."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    result = subprocess.run(
        [sys.executable, "-c", LOAD_LEFTOVERS_PROBE],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**clean, "OMP_NUM_THREADS": "1"},
        check=True,
    )
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    assert measured["applied"] is True
    freed = 6_000 * 7 / 8 * 64_000  # about 336 MB in holes between live blocks
    assert measured["before"] - measured["after"] > freed * 0.8


# Under the kept settings a freed block stays resident (a small live block above it keeps the
# heap's top from shrinking) until handed back after the step, which the trainer does when the
# free heap is large enough to matter: a 320 MB block is, a 16 MB one is not.
BETWEEN_STEPS_PROBE = """
import json, sys, torch
from library.host_memory import free_heap_bytes, hand_back_what_the_step_freed, keep_freed_memory_in_process
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
applied = keep_freed_memory_in_process()
activations = torch.ones(int(sys.argv[1]))
outliving = torch.ones(16_000)
del activations
kept, free = rss(), free_heap_bytes()
handed_back = hand_back_what_the_step_freed()
print(json.dumps({"applied": applied, "free": free, "handed_back": handed_back, "kept": kept, "after": rss()}))
"""


def between_steps(floats: int) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    result = subprocess.run(
        [sys.executable, "-c", BETWEEN_STEPS_PROBE, str(floats)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**clean, "OMP_NUM_THREADS": "1"},
        check=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(glibc_version() is None, reason="glibc only")
def test_what_a_step_freed_goes_back_between_steps_when_it_matters():
    large = between_steps(80_000_000)
    assert large["applied"] is True and large["free"] >= 320_000_000
    assert large["handed_back"] is True
    assert large["kept"] - large["after"] > 300_000_000
    small = between_steps(4_000_000)
    assert small["applied"] is True and 16_000_000 <= small["free"] < 256 << 20
    assert small["handed_back"] is False
    assert small["kept"] - small["after"] < 1_000_000


def found_only(*names: str):
    """A stand-in for the dynamic loader's search that knows only these libraries."""
    return lambda library: f"lib{library}.so.4" if library in names else None


def test_tcmalloc_first_then_jemalloc_when_installed():
    assert allocator_to_preload({}, found_only("tcmalloc_minimal", "jemalloc")) == "libtcmalloc_minimal.so.4"
    assert allocator_to_preload({}, found_only("tcmalloc")) == "libtcmalloc.so.4"  # gperftools' full build
    assert allocator_to_preload({}, found_only("jemalloc")) == "libjemalloc.so.4"
    assert allocator_to_preload({}, found_only()) is None  # glibc's, tuned by library.host_memory
    assert (
        allocator_to_preload({"TI_ALLOCATOR": "jemalloc"}, found_only("tcmalloc", "jemalloc"))
        == "libjemalloc.so.4"
    )


def test_no_restart_when_asked_or_when_the_user_chose_the_allocator():
    installed = found_only("tcmalloc_minimal", "jemalloc")
    assert allocator_to_preload({"TI_ALLOCATOR": "glibc"}, installed) is None
    assert allocator_to_preload({"TI_ALLOCATOR_PRELOADED": "libtcmalloc_minimal.so.4"}, installed) is None
    assert allocator_to_preload({"LD_PRELOAD": "/opt/libmimalloc.so"}, installed) is None
    assert allocator_to_preload({"MALLOC_ARENA_MAX": "2"}, installed) is None
    assert allocator_to_preload({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"}, installed) is None
    assert allocator_to_preload({"TI_ALLOCATOR": "tcmalloc", "MALLOC_ARENA_MAX": "2"}, installed) is None


def test_an_allocator_that_cannot_be_had_is_one_line(tmp_path):
    with pytest.raises(
        UserError,
        match=r"TI_ALLOCATOR=tcmalloc: tcmalloc is not installed .*apt install libtcmalloc-minimal4",
    ):
        allocator_to_preload({"TI_ALLOCATOR": "tcmalloc"}, found_only("jemalloc"))
    with pytest.raises(UserError, match="TI_ALLOCATOR=mimalloc: not an allocator this program knows"):
        allocator_to_preload({"TI_ALLOCATOR": "mimalloc"}, found_only("tcmalloc_minimal"))
    with pytest.raises(UserError, match=r"TI_ALLOCATOR=.*missing\.so: no such file"):
        allocator_to_preload({"TI_ALLOCATOR": str(tmp_path / "missing.so")}, found_only())
    library = tmp_path / "libcustom.so"
    library.write_bytes(b"")
    assert allocator_to_preload({"TI_ALLOCATOR": str(library)}, found_only()) == str(library)


def test_the_restart_under_tcmalloc_puts_large_tensors_on_huge_pages():
    """The allocator goes before the user's own preloads; PyTorch's huge pages come with tcmalloc
    only (the one they were measured with), and a user's own THP_MEM_ALLOC_ENABLE stays."""
    restarted = restart_environment({"LD_PRELOAD": "/opt/mine.so"}, "libtcmalloc_minimal.so.4")
    assert restarted["LD_PRELOAD"] == "libtcmalloc_minimal.so.4:/opt/mine.so"
    assert restarted["TI_ALLOCATOR_PRELOADED"] == "libtcmalloc_minimal.so.4"
    assert restarted["THP_MEM_ALLOC_ENABLE"] == "1"
    assert restart_environment({}, "/usr/lib/libtcmalloc.so.4")["THP_MEM_ALLOC_ENABLE"] == "1"
    assert (
        restart_environment({"THP_MEM_ALLOC_ENABLE": "0"}, "libtcmalloc_minimal.so.4")["THP_MEM_ALLOC_ENABLE"]
        == "0"
    )
    assert "THP_MEM_ALLOC_ENABLE" not in restart_environment({}, "libjemalloc.so.2")
    assert restart_environment({}, "libjemalloc.so.2")["LD_PRELOAD"] == "libjemalloc.so.2"


def test_a_wrong_allocator_choice_stops_the_cli_at_once():
    """Checked first of all (before even --help), before the generator's imports: one line, exit code 2."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "gen_img_diffusers.py"), "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "TI_ALLOCATOR": "tc-malloc"},
    )
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [
        "error: TI_ALLOCATOR=tc-malloc: not an allocator this program knows; use tcmalloc, jemalloc, "
        "glibc or the path of an allocator's shared library"
    ]


ALLOCATOR_LOG_PROBE = """
import logging
from library.host_memory import keep_freed_memory_in_process
logging.basicConfig(level=logging.INFO, format="%(message)s")
keep_freed_memory_in_process()
"""


@pytest.mark.skipif(glibc_version() is None, reason="glibc only")
@pytest.mark.parametrize(
    "env, said",
    [
        (
            {},
            "memory allocator: glibc's; with tcmalloc installed (Debian/Ubuntu: apt install libtcmalloc-minimal4)",
        ),
        ({"TI_ALLOCATOR": "glibc"}, None),  # asked for: no tip
        (
            {"TI_ALLOCATOR_PRELOADED": "libtcmalloc_minimal.so.4"},
            "memory allocator: libtcmalloc_minimal.so.4, preloaded at start (",
        ),
        (
            {"TI_ALLOCATOR_PRELOADED": "libtcmalloc_minimal.so.4", "THP_MEM_ALLOC_ENABLE": "1"},
            "memory allocator: libtcmalloc_minimal.so.4, preloaded at start, large tensors on transparent huge pages",
        ),
    ],
)
def test_the_log_says_which_allocator_a_cpu_run_uses(env, said):
    """Under glibc's malloc the log tells how to get tcmalloc, unless glibc was asked for."""
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("MALLOC_", "TI_ALLOCATOR"))
        and k not in ("GLIBC_TUNABLES", "LD_PRELOAD", "THP_MEM_ALLOC_ENABLE")
    }
    result = subprocess.run(
        [sys.executable, "-c", ALLOCATOR_LOG_PROBE],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**clean, **env},
        check=True,
    )
    lines = [line for line in result.stderr.splitlines() if line.startswith("memory allocator")]
    if said is None:
        assert lines == []
    else:
        assert len(lines) == 1 and lines[0].startswith(said), lines
