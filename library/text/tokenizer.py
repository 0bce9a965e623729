"""The CLIP tokenizer, offline.

SD 1.x, 2.x and SDXL use the same CLIP BPE vocabulary; SD 2.x and SDXL's second tokenizer pad
with ``!`` (id 0) instead of the end-of-text token. The vocabulary ships in ``library/text/clip_tokenizer/`` (see
``tools/make_clip_vocab.py``), so nothing is fetched from the Hugging Face hub. A diffusers
folder's own ``tokenizer/`` wins over the shipped copy; ``--tokenizer_cache_dir`` keeps kohya's
folder layout (``openai_clip-vit-large-patch14`` / ``stabilityai_stable-diffusion-2``) so that a
cache made by kohya's scripts is read, and one made here is readable by them.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from library.errors import UserError
from library.files import ensure_writable_folder, write_folder_atomically

if TYPE_CHECKING:
    from transformers import CLIPTokenizer

logger = logging.getLogger(__name__)

SHIPPED_VOCAB_DIR = Path(__file__).resolve().parent / "clip_tokenizer"
MODEL_MAX_LENGTH = 77  # a CLIP window: BOS, up to CHUNK_TOKENS tokens, EOS
CHUNK_TOKENS = MODEL_MAX_LENGTH - 2  # the text a window holds; prompts and embeddings count against it
# the names kohya uses for its tokenizer cache folders (hub id with "/" replaced by "_")
KOHYA_CACHE_NAMES = {False: "openai_clip-vit-large-patch14", True: "stabilityai_stable-diffusion-2"}
SDXL_SECOND_CACHE_NAME = "laion_CLIP-ViT-bigG-14-laion2B-39B-b160k"


def shipped_tokenizer(v2: bool) -> CLIPTokenizer:
    """The CLIP tokenizer built from the vocabulary in the repo; SD2 pads with ``!``."""
    from transformers import CLIPTokenizer  # imported here: option parsing imports this module

    extra = {"pad_token": "!"} if v2 else {}
    return CLIPTokenizer(
        vocab=str(SHIPPED_VOCAB_DIR / "vocab.json"),
        merges=str(SHIPPED_VOCAB_DIR / "merges.txt"),
        model_max_length=MODEL_MAX_LENGTH,
        **extra,
    )


def _has_tokenizer(folder: Path) -> bool:
    """A saved tokenizer: ``tokenizer.json`` (transformers 5) or ``vocab.json`` + ``merges.txt``."""
    return (folder / "tokenizer.json").is_file() or (folder / "vocab.json").is_file()


def _write_cache(tokenizer: CLIPTokenizer, cache_dir: Path, cached: Path) -> None:
    """The shipped tokenizer into kohya's cache layout, whole or not at all (a run killed half-way
    must not leave a folder that the next run cannot read)."""
    ensure_writable_folder(cache_dir, "--tokenizer_cache_dir")

    def write(folder: Path) -> None:
        tokenizer.save_pretrained(str(folder))
        for name in ("vocab.json", "merges.txt"):  # kohya's scripts (transformers 4) read these
            shutil.copyfile(SHIPPED_VOCAB_DIR / name, folder / name)

    write_folder_atomically(cached, write)
    logger.info("saved the tokenizer to --tokenizer_cache_dir %s", cached)


def _from_folder(folder: Path) -> CLIPTokenizer:
    from transformers import CLIPTokenizer  # imported here: option parsing imports this module

    try:
        return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # a broken folder must not end in a transformers traceback
        raise UserError(
            f"{folder}: cannot read the tokenizer in this folder ({exc}); delete it or fix it"
        ) from exc


def family_tokenizers(
    family: str, model_dir: str | Path | None = None, tokenizer_cache_dir: str | Path | None = None
) -> list[CLIPTokenizer]:
    """The tokenizers of a model of ``family`` (``sd1``, ``sd2``: one; ``sdxl``: two, the second
    padding with ``!`` as OpenCLIP does), each from the model's folder, the cache or the shipped copy."""
    if family != "sdxl":
        return [load_tokenizer(family == "sd2", model_dir, tokenizer_cache_dir)]
    second = load_tokenizer(
        False, model_dir, tokenizer_cache_dir, subfolder="tokenizer_2", cache_name=SDXL_SECOND_CACHE_NAME
    )
    set_family_padding(second, "sd2")
    return [load_tokenizer(False, model_dir, tokenizer_cache_dir), second]


def load_tokenizer(
    v2: bool,
    model_dir: str | Path | None = None,
    tokenizer_cache_dir: str | Path | None = None,
    subfolder: str = "tokenizer",
    cache_name: str | None = None,
) -> CLIPTokenizer:
    """The tokenizer for a model: its own ``subfolder``, else the cache, else the shipped copy.

    With ``tokenizer_cache_dir`` and no cached copy yet, the shipped tokenizer is written there
    (as ``cache_name``, by default kohya's name for the family), as kohya does after its first
    (online) load.
    """
    if model_dir is not None and _has_tokenizer(Path(model_dir) / subfolder):
        tokenizer = _from_folder(Path(model_dir) / subfolder)
    elif tokenizer_cache_dir is not None:
        cached = Path(tokenizer_cache_dir) / (cache_name or KOHYA_CACHE_NAMES[v2])
        if _has_tokenizer(cached):
            tokenizer = _from_folder(cached)
        else:
            tokenizer = shipped_tokenizer(v2)
            _write_cache(tokenizer, Path(tokenizer_cache_dir), cached)
    else:
        tokenizer = shipped_tokenizer(v2)
    tokenizer.model_max_length = MODEL_MAX_LENGTH
    return tokenizer


def match_padding(tokenizers: list[CLIPTokenizer], model_tokenizers: list[CLIPTokenizer]) -> None:
    """Give tokenizers made before the model was read (``--v2`` decided their padding) the padding
    of the model's own, once the file has said which family it is."""
    for tokenizer, model_tokenizer in zip(tokenizers, model_tokenizers):
        if tokenizer.pad_token != model_tokenizer.pad_token:
            tokenizer.pad_token = model_tokenizer.pad_token


def set_family_padding(tokenizer: CLIPTokenizer, family: str) -> None:
    """Make the padding match the model once its family is known (SD2 pads with ``!``)."""
    wanted = "!" if family == "sd2" else "<|endoftext|>"
    if tokenizer.pad_token != wanted:
        tokenizer.pad_token = wanted
