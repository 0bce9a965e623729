"""Precision choices on a CPU: which CPUs count as having native bf16, and what fp16/bf16 become."""

from __future__ import annotations

import logging

import pytest
import torch

from library import runtime
from library.errors import UserError
from library.runtime import cpu_flags, cpu_has_native_bf16
from library.training.accelerator import resolve_mixed_precision

X86_AVX512_ONLY = "processor\t: 0\nflags\t\t: fpu sse2 avx2 fma avx512f avx512bw avx512_vnni\n"
X86_SAPPHIRE_RAPIDS = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
ARM_GRAVITON3 = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n"


@pytest.fixture
def cpu(monkeypatch, tmp_path):
    """Pretend to run on a CPU with the given /proc/cpuinfo and torch feature answers."""

    def pretend(cpuinfo: str, torch_avx512_bf16: bool = False, torch_amx: bool = False) -> None:
        path = tmp_path / "cpuinfo"
        path.write_text(cpuinfo)
        monkeypatch.setattr(runtime, "cpu_flags", lambda: cpu_flags(path))
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: torch_avx512_bf16, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: torch_amx, raising=False)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    return pretend


def test_cpu_flags_reads_x86_and_arm_layouts(tmp_path):
    x86, arm = tmp_path / "x86", tmp_path / "arm"
    x86.write_text(X86_SAPPHIRE_RAPIDS)
    arm.write_text(ARM_GRAVITON3)
    assert {"avx512_bf16", "amx_tile"} <= cpu_flags(x86)
    assert "bf16" in cpu_flags(arm)
    assert cpu_flags(tmp_path / "missing") == set()


def test_plain_avx512_is_not_native_bf16_even_though_onednn_emulates_it(cpu, monkeypatch):
    # oneDNN says "bf16 supported" on any AVX-512 CPU; a step there is 2.5x slower than fp32
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True, raising=False)
    cpu(X86_AVX512_ONLY)
    assert not cpu_has_native_bf16()


@pytest.mark.parametrize(
    "cpuinfo, torch_avx512_bf16, torch_amx",
    [
        (X86_AVX512_ONLY, True, False),
        (X86_AVX512_ONLY, False, True),
        (X86_SAPPHIRE_RAPIDS, False, False),
        (ARM_GRAVITON3, False, False),
    ],
)
def test_native_bf16_from_torch_or_from_the_cpu_flags(cpu, cpuinfo, torch_avx512_bf16, torch_amx):
    cpu(cpuinfo, torch_avx512_bf16, torch_amx)
    assert cpu_has_native_bf16()


def test_fp16_on_a_cpu_without_native_bf16_runs_fp32(cpu, caplog):
    cpu(X86_AVX512_ONLY)
    with caplog.at_level(logging.WARNING):
        assert resolve_mixed_precision("fp16") == "no"
    assert "no native bfloat16; using float32" in caplog.text


def test_fp16_on_a_cpu_with_native_bf16_runs_bf16(cpu, caplog):
    cpu(X86_SAPPHIRE_RAPIDS)
    with caplog.at_level(logging.WARNING):
        assert resolve_mixed_precision("fp16") == "bf16"
    assert "bfloat16 is used instead" in caplog.text


@pytest.mark.parametrize("cpuinfo, warned", [(X86_AVX512_ONLY, True), (X86_SAPPHIRE_RAPIDS, False)])
def test_bf16_is_kept_and_warned_about_only_where_emulated(cpu, caplog, cpuinfo, warned):
    cpu(cpuinfo)
    with caplog.at_level(logging.WARNING):
        assert resolve_mixed_precision("bf16") == "bf16"
    assert ("emulated and much slower than float32" in caplog.text) == warned


@pytest.mark.parametrize("cpuinfo, hinted", [(X86_AVX512_ONLY, False), (X86_SAPPHIRE_RAPIDS, True)])
def test_fp32_runs_as_asked_and_names_bf16_only_where_native(cpu, caplog, cpuinfo, hinted):
    cpu(cpuinfo)
    with caplog.at_level(logging.INFO):
        assert resolve_mixed_precision("no") == "no"
    assert ("--mixed_precision bf16 runs several times faster than float32" in caplog.text) == hinted


def test_the_generator_names_its_own_bf16_flag(cpu, caplog):
    from gen_img_diffusers import choose_device_and_dtype

    cpu(X86_SAPPHIRE_RAPIDS)
    with caplog.at_level(logging.INFO):
        assert choose_device_and_dtype("no") == (torch.device("cpu"), torch.float32)
    assert "--bf16 runs several times faster than float32" in caplog.text


def test_fp32_on_a_gpu_is_not_hinted_at(cpu, caplog):
    cpu(X86_SAPPHIRE_RAPIDS)
    with caplog.at_level(logging.INFO):
        assert runtime.usable_precision("no", "--no", on_gpu=True, bf16_flag="--bf16") == "no"
    assert "faster" not in caplog.text


def test_full_half_precision_needs_the_matching_mixed_precision():
    with pytest.raises(UserError, match="--full_fp16 needs --mixed_precision fp16"):
        resolve_mixed_precision("no", full_fp16=True)
    with pytest.raises(UserError, match="exclude each other"):
        resolve_mixed_precision("fp16", full_fp16=True, full_bf16=True)


def test_no_half_vae_keeps_the_vae_in_fp32_in_the_trainer_and_the_generator(monkeypatch):
    """One rule for both programs: the VAE follows the models' dtype unless --no_half_vae."""
    from library.generation.args import settings_from_command_line
    from library.training.accelerator import ComputeSettings, resolve_precision

    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: True)
    trained = resolve_precision(ComputeSettings(mixed_precision="bf16", no_half_vae=True))
    assert (trained.weight_dtype, trained.vae_dtype) == (torch.bfloat16, torch.float32)
    assert resolve_precision(ComputeSettings(mixed_precision="bf16")).vae_dtype == torch.bfloat16
    device = settings_from_command_line(["--ckpt=m", "--prompt=a", "--bf16", "--no_half_vae"]).device
    assert runtime.vae_dtype(torch.bfloat16, device.no_half_vae) == torch.float32
    assert runtime.vae_dtype(torch.float16, False) == torch.float16


@pytest.mark.parametrize(
    ("processes", "environ", "warned"),
    [
        (1, {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}, True),  # --num_processes 2, plain launcher
        (1, {}, False),  # python or accelerate launch, one process asked for
        (2, {"MASTER_ADDR": "127.0.0.1", "WORLD_SIZE": "2"}, False),  # --multi_gpu: torchrun started two
    ],
)
def test_a_run_started_alone_though_several_processes_were_asked_for_says_so(
    processes, environ, warned, caplog
):
    from library.training.accelerator import warn_if_started_alone

    with caplog.at_level(logging.WARNING):
        warn_if_started_alone(processes, environ)
    assert ("started this one alone" in caplog.text) == warned
