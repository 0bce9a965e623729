"""Model families: what differs between SD 1.x/2.x and SDXL, behind one small interface.

A family names its text encoders as embedding files store their rows (SD 1.x/2.x: one,
``emb_params``; SDXL: ``clip_l`` and ``clip_g``), says how their outputs become the UNet's
conditioning (its ``TextConditioner``), its default training size and its SAI model-spec
architecture. The training loop, the saves and the generator ask the family; adding a family is
adding an entry here, its conditioner and its loader.
"""

from __future__ import annotations

from dataclasses import dataclass

from library.text.conditioning import TextConditioner
from library.text.sdxl_conditioning import SDXLTextConditioner


@dataclass(frozen=True)
class ModelFamily:
    name: str  # "sd1", "sd2", "sdxl"
    label: str  # as users say it: "SD 1.x"
    encoder_keys: tuple[str, ...]  # each text encoder's rows in an embedding file
    default_resolution: int  # pixels per side the family was trained at
    conditioner: type[TextConditioner]
    architecture_base: str  # SAI model spec, e.g. "stable-diffusion-v1"
    lora_text_prefixes: tuple[str, ...]  # kohya LoRA names of the text encoders' layers, in encoder order
    lora_unet_ldm_names: bool  # kohya LoRA names the UNet's layers by LDM (SDXL) or diffusers paths

    def architecture(self, v_parameterization: bool, adapter: str = "textual-inversion") -> str:
        """``modelspec.architecture`` of a file trained on a model of this family: ``adapter`` is
        ``textual-inversion`` (an embedding) or ``lora``."""
        base = self.architecture_base
        if self.name == "sd2" and v_parameterization:
            base = "stable-diffusion-v2-768-v"
        return f"{base}/{adapter}"

    def base_model_version(self, v_parameterization: bool) -> str:
        """kohya's ``ss_base_model_version`` of a LoRA: ``sd_v1``, ``sd_v2``, ``sd_v2_v``, ``sdxl_base_v1-0``."""
        if self.name == "sdxl":
            return "sdxl_base_v1-0"
        return ("sd_v2" if self.name == "sd2" else "sd_v1") + ("_v" if v_parameterization else "")

    def __str__(self) -> str:
        return self.label


SD1 = ModelFamily(
    "sd1", "SD 1.x", ("emb_params",), 512, TextConditioner, "stable-diffusion-v1", ("lora_te",), False
)
SD2 = ModelFamily(
    "sd2", "SD 2.x", ("emb_params",), 512, TextConditioner, "stable-diffusion-v2-512", ("lora_te",), False
)
SDXL = ModelFamily(
    "sdxl",
    "SDXL",
    ("clip_l", "clip_g"),
    1024,
    SDXLTextConditioner,
    "stable-diffusion-xl-v1-base",
    ("lora_te1", "lora_te2"),
    True,
)
FAMILIES = {family.name: family for family in (SD1, SD2, SDXL)}
