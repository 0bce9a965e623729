"""Writing a loaded model as a diffusers folder that older and newer transformers both read.

transformers 5 saves a ``CLIPTextModel`` without its ``text_model.`` level and a tokenizer as
``tokenizer.json`` alone. transformers 4 (the version kohya's scripts and many users run) then
finds none of the text encoder's weights, leaves it random with only a warning, and its slow
``CLIPTokenizer`` finds no vocabulary. So the folder is written by diffusers as usual, and then
the text encoder's tensors get their ``text_model.`` names and the tokenizer its ``vocab.json``
and ``merges.txt``: the layout every version reads (it is also what models on the hub have).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

from library.text.tokenizer import SHIPPED_VOCAB_DIR

TEXT_MODEL_PREFIX = "text_model."


def save_diffusers_folder(model, folder: Path) -> Path:
    """``model`` (an ``SDModel``: SD 1.x/2.x or SDXL) as a diffusers pipeline folder, readable by
    transformers 4 and 5."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    folder = Path(folder)
    scheduler = DDIMScheduler.from_config(model.scheduler_config)
    if model.family.name == "sdxl":
        pipe = StableDiffusionXLPipeline(
            vae=model.vae,
            text_encoder=model.text_encoders[0],
            text_encoder_2=model.text_encoders[1],
            tokenizer=model.tokenizers[0],
            tokenizer_2=model.tokenizers[1],
            unet=model.unet,
            scheduler=scheduler,
        )
    else:
        pipe = StableDiffusionPipeline(
            vae=model.vae,
            text_encoder=model.text_encoder,
            tokenizer=model.tokenizer,
            unet=model.unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    pipe.save_pretrained(folder, safe_serialization=True)
    readable_by_every_transformers(folder)
    return folder


def readable_by_every_transformers(folder: Path) -> None:
    """Give a diffusers folder written by transformers 5 the text encoder names and tokenizer files
    that transformers 4 needs (and 5 reads as well)."""
    folder = Path(folder)
    for encoder in ("text_encoder", "text_encoder_2"):
        for weights in (folder / encoder).glob("*.safetensors"):
            _with_text_model_names(weights)
    for tokenizer in ("tokenizer", "tokenizer_2"):
        if not (folder / tokenizer).is_dir():
            continue
        for name in ("vocab.json", "merges.txt"):  # the CLIP vocabulary, which the slow tokenizer reads
            if not (folder / tokenizer / name).is_file():
                shutil.copyfile(SHIPPED_VOCAB_DIR / name, folder / tokenizer / name)


def _with_text_model_names(path: Path) -> None:
    """transformers 4 names: the transformer under ``text_model.``, a projection (SDXL's second
    encoder) beside it."""
    tensors = load_file(str(path))
    renamed = {_v4_name(key): value for key, value in tensors.items()}
    if renamed.keys() != tensors.keys():
        save_file(renamed, str(path), metadata={"format": "pt"})


def _v4_name(key: str) -> str:
    if key.startswith((TEXT_MODEL_PREFIX, "text_projection.")):
        return key
    return TEXT_MODEL_PREFIX + key
