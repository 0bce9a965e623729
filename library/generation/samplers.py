"""kohya's sampler names and generation defaults, in one place (no heavy imports, so the CLIs can
build their parsers and check a command line before torch and diffusers load).

``library.generation.generator.SAMPLERS`` maps each name to a diffusers scheduler.
"""

SAMPLER_NAMES = (
    "ddim",
    "pndm",
    "lms",
    "euler",
    "euler_a",
    "heun",
    "dpm_2",
    "dpm_2_a",
    "dpmsolver",
    "dpmsolver++",
    "dpmsingle",
    "k_lms",
    "k_euler",
    "k_euler_a",
    "k_dpm_2",
    "k_dpm_2_a",
)

MAX_SEED = 0x7FFFFFFF  # kohya draws seeds from [0, 2^31 - 1]
DEFAULT_SIZE = 512
DEFAULT_STEPS = 50
DEFAULT_SCALE = 7.5
DEFAULT_STRENGTH = 0.8  # kohya's img2img / inpaint / highres second-pass strength
