"""kohya's sampler names, in one place (no heavy imports, so CLIs can build their parsers fast).

``library.sampling.SAMPLERS`` maps each of them to a diffusers scheduler.
"""

SAMPLER_NAMES = (
    "ddim", "pndm", "lms", "euler", "euler_a", "heun", "dpm_2", "dpm_2_a", "dpmsolver", "dpmsolver++",
    "dpmsingle", "k_lms", "k_euler", "k_euler_a", "k_dpm_2", "k_dpm_2_a",
)  # fmt: skip
