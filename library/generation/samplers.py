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

# PNDM begins with Runge-Kutta steps that need four timesteps; diffusers fails with fewer
MIN_STEPS = {"pndm": 4}


def check_steps(sampler: str | None, steps: int, where: str = "--steps") -> None:
    """One line instead of diffusers' traceback when a sampler cannot run that few steps."""
    name = (sampler or "ddim").lower()
    needed = MIN_STEPS.get(name, 1)
    if steps < needed:
        from library.errors import UserError

        raise UserError(
            f"{where} {steps}: the {name} sampler needs at least {needed} steps; use more or another sampler"
        )
