"""Turning the raw measurements into the Markdown tables of results/ and RESULTS.md."""

from __future__ import annotations

import statistics
from typing import Any

NOISE_NOTE = (
    "Timings come from a shared virtual machine: seconds drift by 10-30 % within minutes and between "
    "runs. The load average (1 min) before and after each row is shown; a value above the core count "
    "means the benchmark did not have the CPU to itself. Compare ratios measured in the same process "
    "(each step against the floor calls right before and after it) rather than absolute seconds."
)


def config_name(spec: dict) -> str:
    parts = [f"{spec['size']} px", f"b{spec['batch']}", spec["dtype"]]
    parts.append("cached latents" if spec["cache_latents"] else "VAE encode in step")
    if spec["gradient_checkpointing"]:
        parts.append("grad ckpt")
    if spec.get("extra_args"):
        parts.append(" ".join(spec["extra_args"]))
    if spec.get("worker_env"):
        parts.append(
            "glibc's default allocator (" + " ".join(f"{k}={v}" for k, v in spec["worker_env"].items()) + ")"
        )
    return ", ".join(parts)


def base_key(spec: dict) -> tuple:
    return (spec["size"], spec["batch"], spec["dtype"], tuple(sorted(spec.get("worker_env", {}).items())))


def attach_floors(rows: list[dict]) -> None:
    """Rows without their own floor (grad ckpt, uncached) borrow it from their base configuration."""
    floors = {base_key(r["spec"]): r for r in rows if "floor_median" in r}
    for row in rows:
        if "floor_median" not in row and "error" not in row and base_key(row["spec"]) in floors:
            base = floors[base_key(row["spec"])]
            row["floor_from_base"] = True
            for key in ("floor_median", "text_encoder_median"):
                row[key] = base[key]
        if row.get("floor_from_base") and "step_median" in row:
            row["step_over_floor"] = row["step_median"] / row["floor_median"]
            row["step_over_ti_floor"] = row["step_median"] / (
                row["floor_median"] + row["text_encoder_median"]
            )


def _gb(value: Any) -> str:
    return "—" if value is None else f"{value / 1e9:.2f} GB"


def _s(value: Any, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _kernel(row: dict) -> str:
    """Median kernel CPU time and minor page faults per step (memory faulted in again each step)."""
    system, faults = row.get("step_system_seconds"), row.get("step_page_faults")
    if not system:
        return "—"
    return f"{statistics.median(system):.2f} ({statistics.median(faults) / 1e3:.0f} k)"


def _ratio(row: dict, key: str) -> str:
    """The paired median (headline), then the ratio of minima and of CPU times as cross-checks."""
    paired = row.get(key + "_paired")
    if paired is None:
        return _s(row.get(key), 3)
    return f"{paired:.3f} (min/min {row[key]:.3f}, CPU {row[key + '_cpu']:.3f})"


def _load(row: dict) -> str:
    before, after = row.get("load_average_before"), row.get("load_average_after")
    return "—" if before is None else f"{before:.1f}→{_s(after, 1)}"


def training_table(rows: list[dict]) -> list[str]:
    lines = [
        "| configuration | step s (median) | n | floor s | text enc s | step/floor | step/(floor+TE) "
        "| kernel CPU s/step (page faults) | peak load | peak steps | peak run | optimizer state | load avg |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        spec = row["spec"]
        if "error" in row:
            lines.append(f"| {config_name(spec)} | failed: {row['error'][:80]} |" + " |" * 11)
            continue
        borrowed = "*" if row.get("floor_from_base") else ""
        opt = row.get("optimizer") or {}
        state = "—"
        if opt:
            mark = "=" if opt["slot_bytes"] == opt["expected_bytes"] else "≠"
            state = (
                f"{opt['slot_bytes']} B {mark} {opt['expected_bytes']} B (+{opt['scalar_bytes']} B scalars)"
            )
        memory = _gb(row.get("cuda_max_allocated_bytes", row.get("peak_rss_steps_bytes")))
        load_memory = _gb(row.get("cuda_max_allocated_load_bytes", row.get("peak_rss_load_bytes")))
        lines.append(
            f"| {config_name(spec)} | {_s(row['step_median'])} | {len(row['step_seconds'])} "
            f"| {_s(row.get('floor_median'))}{borrowed} | {_s(row.get('text_encoder_median'))}{borrowed} "
            f"| {_ratio(row, 'step_over_floor')} | {_ratio(row, 'step_over_ti_floor')} "
            f"| {_kernel(row)} | {load_memory} | {memory} | {_gb(row.get('peak_rss_process_bytes'))} | {state} "
            f"| {_load(row)} |"
        )
    return lines


def machine_lines(machine: dict) -> list[str]:
    cpu = machine["cpu"]
    lines = [
        f"- date: {machine['date']}",
        f"- CPU: {cpu['model']} ({machine['cpu_count']} logical cores, torch uses {machine['torch_threads']} "
        f"threads, kernels: {machine['torch_cpu_capability']}); flags: {', '.join(cpu['flags']) or 'none'}",
        f"- memory: {machine['memory_gb']} GB",
        f"- python {machine['python']}, torch {machine['torch']}, diffusers {machine['diffusers']}, "
        f"transformers {machine['transformers']}",
    ]
    if machine.get("cuda"):
        lines.append(f"- CUDA: {machine['cuda']['device']} (CUDA {machine['cuda']['version']})")
    return lines


def targets(results: dict) -> list[str]:
    """The issue's targets, each with the measured number and whether it is met."""
    rows = [r for r in results["training"] if "step_median" in r]
    half = results.get("half_dtype", "bf16")
    ref = _find(rows, 256, 1, "fp32", cached=True, gc=False)
    lines = ["| target | measured | met |", "|---|---|---|"]
    for size in (256, 512):
        row = _find(rows, size, 1, "fp32", cached=True, gc=False)
        if not row or "step_over_floor_paired" not in row:
            continue
        ratio, share = row["step_over_floor_paired"], row["text_encoder_share_of_floor"]
        lines.append(
            f"| step ≤ 1.05 × floor (fp32, {size} px, b1, cached){'' if size == 256 else ' (same, larger)'} "
            f"| {ratio:.3f} × floor (min/min {row['step_over_floor']:.3f}); the text encoder's forward + "
            f"backward alone is {share * 100:.1f} % of the floor | {_yes(ratio <= 1.05)} |"
        )
        lines.append(
            f"| (ours) step ≤ 1.05 × (floor + text encoder), {size} px, b1: what a TI step must compute "
            f"| {row['step_over_ti_floor_paired']:.3f} (min/min {row['step_over_ti_floor']:.3f}) "
            f"| {_yes(row['step_over_ti_floor_paired'] <= 1.05)} |"
        )
    half_row = _find(rows, 256, 1, half, cached=True, gc=False)
    if ref and half_row:
        speed = half_row["step_median"] / ref["step_median"]
        lines.append(
            f"| {half} clearly faster than fp32 (256 px, b1) | {half} step = {speed:.2f} × fp32 step "
            f"| {_yes(speed < 0.8)} |"
        )
    optimizers = [r["optimizer"] for r in rows if r.get("optimizer")]
    if optimizers:
        exact = all(o["slot_bytes"] == o["expected_bytes"] for o in optimizers)
        o = optimizers[0]
        lines.append(
            f"| optimizer state = N × dim × slots × 4 B | {o['slot_bytes']} B for "
            f"{o['param_shapes']} × {o['slots']} slots (+{o['scalar_bytes']} B step counters) "
            f"| {_yes(exact)} |"
        )
    generation = results.get("generation") or {}
    if "overhead" in generation:
        overhead = generation.get("overhead_paired", generation["overhead"])
        lines.append(
            f"| generation overhead ≤ 5 % | {overhead * 100:+.1f} % (ratio of medians "
            f"{generation['overhead'] * 100:+.1f} %; identical pixels: "
            f"{generation['image_max_abs_difference'] == 0}) | {_yes(overhead <= 0.05)} |"
        )
    return lines


def allocator_comparison(rows: list[dict]) -> list[str]:
    """The trainer as it runs (freed memory kept on CPU) against glibc's default allocator."""

    def key(spec: dict) -> tuple:
        names = ("size", "batch", "dtype", "cache_latents", "gradient_checkpointing")
        return tuple(spec[n] for n in names) + (tuple(spec.get("extra_args", [])),)

    measured = [r for r in rows if "step_median" in r]
    lines = []
    for default in (r for r in measured if r["spec"].get("worker_env")):
        kept = next(
            (
                r
                for r in measured
                if not r["spec"].get("worker_env") and key(r["spec"]) == key(default["spec"])
            ),
            None,
        )
        if kept is None:
            continue
        before, after = min(default["step_seconds"]), min(kept["step_seconds"])
        lines += [
            f"Freed memory kept in the process ({config_name(kept['spec'])}), against glibc's default "
            f"allocator: fastest step {before:.2f} s → {after:.2f} s ({(after / before - 1) * 100:+.0f} %), "
            f"kernel CPU s/step (page faults) {_kernel(default)} → {_kernel(kept)}; peak RSS steps "
            f"{_gb(default.get('peak_rss_steps_bytes'))} → {_gb(kept.get('peak_rss_steps_bytes'))}.",
            "",
        ]
    return lines


def _yes(ok: bool) -> str:
    return "yes" if ok else "**no**"


def _find(rows, size, batch, dtype, cached, gc):
    for row in rows:
        s = row["spec"]
        if (s["size"], s["batch"], s["dtype"], s["cache_latents"], s["gradient_checkpointing"]) == (
            size,
            batch,
            dtype,
            cached,
            gc,
        ):
            return row
    return None


def markdown(results: dict) -> str:
    lines = [
        "# Textual Inversion trainer benchmark",
        "",
        f"Run: `{results['command']}` ({results['mode']} set, {results['duration_minutes']:.1f} min). "
        f"Model: {results['model']}.",
        "",
        "## Machine",
        "",
        *machine_lines(results["machine"]),
        "",
        f"> {NOISE_NOTE}",
        "",
        "## Targets",
        "",
        *targets(results),
        "",
        "## Training step",
        "",
        "Seconds per optimizer step of the real trainer (`train_textual_inversion.main`), median of the "
        "timed steps after warm-up. *floor*: UNet forward + backward to the text conditioning only "
        "(frozen weights), same shapes and dtype, same process. *text enc*: the text encoder forward "
        "with the spliced vectors + backward to them, which Textual Inversion cannot skip. "
        "*step/floor*: the median over the timed steps of each step divided by the floor calls "
        "measured right before and after it (drift cancels); in parentheses the fastest step over "
        "the fastest floor call, and the same from process CPU time. "
        "*kernel CPU s/step*: system CPU time and minor page faults per step (memory given back to the "
        "OS and faulted in again by every step). "
        "\\* = borrowed from the same size/batch/dtype row. Peak RSS steps: resident memory peak "
        "during the steady-state steps; peak load: from the start to the end of the first step (model "
        "loading and latent caching); peak run: the whole process. On CUDA, the allocator's maximum.",
        "",
        *training_table(results["training"]),
        "",
    ]
    lines += allocator_comparison(results["training"])
    if results.get("skipped"):
        lines += ["Not run:", "", *(f"- {s}" for s in results["skipped"]), ""]
    probe = results.get("half_probe")
    if probe:
        conv32 = probe["seconds"]["float32"]["conv3x3"]
        conv16 = probe["seconds"][probe["dtype"]]["conv3x3"]
        lines += [
            "## Half precision on this device",
            "",
            f"{probe['dtype']} vs fp32 on one UNet-shaped 3×3 convolution: {conv16 * 1e3:.1f} ms vs "
            f"{conv32 * 1e3:.1f} ms; worst slowdown (conv, linear) {probe['slowdown_vs_fp32']:.1f}×. "
            f"Native bf16 in hardware (AVX512-BF16, AMX or Arm BF16): {probe['native_kernels']}."
            + (
                " **bf16 is emulated here**: it is measured with the fewest repetitions."
                if probe["emulated"]
                else ""
            ),
            "",
        ]
    load = results.get("load") or {}
    if "load_seconds" in load:
        seconds = load["load_seconds"]
        lines += [
            "## Model load",
            "",
            f"`load_sd_model` of the single-file fp16 checkpoint ({results.get('checkpoint_gb', 0):.1f} GB, "
            f"page cache warm), twice in a fresh process: {', '.join(f'{s:.1f}' for s in seconds)} s "
            f"(process peak RSS {_gb(load.get('peak_rss_process_bytes'))}).",
            "",
        ]
    generation = results.get("generation")
    if generation:
        lines += ["## Generation", ""]
        if "overhead" in generation:
            spec = generation["spec"]
            lines += [
                f"One image, {spec['size']} px, {spec['steps']} DDIM steps, CFG {7.5}, {spec['dtype']}, "
                f"{spec['rounds']} alternating rounds:",
                "",
                "| pipeline | s/image (median) | all |",
                "|---|---|---|",
                f"| library.generation.generator.ImageGenerator | {generation['ours_median']:.2f} | "
                f"{', '.join(f'{s:.2f}' for s in generation['seconds']['library.generation.generator'])} |",
                f"| bare diffusers StableDiffusionPipeline | {generation['diffusers_median']:.2f} | "
                f"{', '.join(f'{s:.2f}' for s in generation['seconds']['diffusers'])} |",
                "",
                f"Overhead {generation.get('overhead_paired', generation['overhead']) * 100:+.1f} % (median "
                f"of the rounds' ratios; ratio of the medians {generation['overhead'] * 100:+.1f} %, of "
                f"CPU times {generation['overhead_cpu'] * 100:+.1f} %); largest pixel difference between "
                f"the two images: {generation['image_max_abs_difference']} (0 = the same work).",
                "",
            ]
        else:
            lines += [f"Not measured: {generation.get('skipped') or generation.get('error')}", ""]
    profile = results.get("profile")
    if profile and "extra_by_op" in profile:
        lines += [
            "## Profile (beyond the floor)",
            "",
            f"Per step, self CPU time: step {profile['step_self_cpu_seconds']:.3f} s, floor "
            f"{profile['floor_self_cpu_seconds']:.3f} s. Largest differences (step − floor):",
            "",
            "| operator / range | step s | floor s | extra s |",
            "|---|---|---|---|",
            *(
                f"| {r['op']} | {r['step_s']:.3f} | {r['floor_s']:.3f} | {r['extra_s']:+.3f} |"
                for r in profile["extra_by_op"][:12]
            ),
            "",
        ]
    return "\n".join(lines) + "\n"
