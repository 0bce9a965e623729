"""Textual Inversion embedding files: read every layout users bring, write files every client loads.

Embeddings travel between four clients (AUTOMATIC1111 WebUI, ComfyUI, diffusers, kohya's
scripts), and each one reads a slightly different set of layouts (see
``docs/embeddings.md``, and ``tests/client_rules.py`` for seven clients' loading rules):

* kohya ``{"emb_params": [n, dim]}`` (``.safetensors`` or ``.pt``)
* WebUI ``.pt``/``.bin``: ``{"string_to_param": {"*": [n, dim]}, "name": ..., ...}``
* diffusers ``{"<token>": [dim] or [n, dim]}`` (``learned_embeds.bin/.safetensors``)
* WebUI images (PNG/WEBP) carrying the WebUI dict as base64 JSON in an ``sd-ti-embedding``
  text chunk, or hidden in the low bits of the pixels
* the SDXL pair ``{"clip_l": [n, 768], "clip_g": [n, 1280]}`` (kohya, the WebUI, ComfyUI,
  OneTrainer), or diffusers' two files ``learned_embeds.safetensors`` ``{token: [n, 768]}`` and
  ``learned_embeds_2.safetensors`` ``{token: [n, 1280]}`` (the second found beside the first)

Embeddings are downloaded from strangers, so pickles are only ever opened with
``torch.load(weights_only=True)``; a file that needs anything beyond tensors and plain
containers is refused rather than executed.

What we write follows the rules every client needs: a 2-D fp32 plain tensor, one concept per
file, a plain ``dict``, ``.pt`` in torch's legacy (non-zip) format so the WebUI's safe unpickler
accepts it, and every write atomic so a crash never leaves half a file behind.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import json
import logging
import mimetypes
import os
import pickle
import re
import time
import warnings
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import safetensors
import safetensors.torch
import torch
from PIL import Image

from library import IMPLEMENTATION
from library.errors import UserError
from library.files import write_atomically
from library.text.tokenizer import CHUNK_TOKENS  # clients never split an embedding across chunks

logger = logging.getLogger(__name__)

WEBUI_STAR_TOKEN_ID = 265  # the CLIP id of "*", which the WebUI records in string_to_token
IMAGE_TEXT_KEY = "sd-ti-embedding"

PICKLE_EXTENSIONS = (".pt", ".bin", ".ckpt")
IMAGE_EXTENSIONS = (".png", ".webp")
READ_EXTENSIONS = (".safetensors", *PICKLE_EXTENSIONS, *IMAGE_EXTENSIONS)
WRITE_EXTENSIONS = (".safetensors", ".pt", ".ckpt")

# An embedding is at most 75 x 1280 numbers; anything far larger is a model passed by mistake.
MAX_EMBEDDING_FILE_BYTES = 64 * 1024 * 1024
MAX_IMAGE_PAYLOAD_BYTES = 64 * 1024 * 1024

FAMILY_BY_DIM = {768: "SD 1.x", 1024: "SD 2.x"}
FAMILY_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL (768 + 1280)"}
SDXL_PARTS = ("clip_l", "clip_g")

# SAI model spec (https://github.com/Stability-AI/ModelSpec) as kohya's sd-scripts writes it
MODELSPEC_VERSION = "1.0.1"
MODELSPEC_IMPLEMENTATION = "https://github.com/Stability-AI/generative-models"  # kohya's value for TI
MODELSPEC_DIFFUSERS = "diffusers"  # kohya's value for an SD 1.x/2.x LoRA (an SDXL LoRA: the one above)


@dataclass
class LoadedEmbedding:
    """One embedding read from disk.

    ``vectors`` is always fp32 ``[n, dim]``. For an SDXL pair it holds ``clip_l`` and ``clip_g``
    side by side (``[n, 768 + 1280]``) and ``layout == "sdxl"``, so that no SD 1.x/2.x code path
    can mistake it for a single-encoder embedding. ``word`` is the trigger word.
    """

    vectors: torch.Tensor
    word: str
    layout: str  # "kohya", "webui", "diffusers", "webui-image" or "sdxl"
    metadata: dict = field(default_factory=dict)
    parts: dict[str, torch.Tensor] = field(default_factory=dict)  # rows by text encoder key

    def __post_init__(self):
        if not self.parts:
            self.parts = {"emb_params": self.vectors}

    @property
    def num_vectors(self) -> int:
        return int(self.vectors.shape[0])

    @property
    def stored_name(self) -> str | None:
        """The word the file itself records: ``name`` (WebUI dict), ``modelspec.title`` (our and
        kohya's ``.safetensors``) or the token (diffusers); ``None`` when it records none."""
        for key in ("name", "modelspec.title", "token"):
            if self.metadata.get(key):
                return str(self.metadata[key])
        return None

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])


# ---------------------------------------------------------------------------------------------
# Reading


def load_embedding_file(path: str | os.PathLike) -> LoadedEmbedding:
    """Read an embedding file of any layout we know; a bad file ends in a one-line ``UserError``.

    The trigger word is the file stem (``mychar.pt`` -> ``mychar``), which is what the WebUI,
    ComfyUI and kohya use. Only WebUI images carry their own name, and the WebUI uses that one.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: embedding file not found")
    ext = path.suffix.lower()
    if ext not in READ_EXTENSIONS:
        raise UserError(
            f"{path}: unknown embedding file type '{ext}'; use one of {', '.join(READ_EXTENSIONS)}"
        )
    size = path.stat().st_size
    if size == 0:
        raise UserError(f"{path}: the file is empty")
    if size > MAX_EMBEDDING_FILE_BYTES:
        raise UserError(
            f"{path}: {size / 2**20:.0f} MB is far too large for an embedding; "
            "is this a model checkpoint or a LoRA rather than a textual inversion embedding?"
        )
    if ext in IMAGE_EXTENSIONS:
        return _load_image_embedding(path)
    if ext == ".safetensors":
        state, file_metadata = _read_safetensors(path)
    else:
        state, file_metadata = _read_pickle(path), {}
    return _embedding_from_state(state, path, file_metadata, word=path.stem)


def bundled_embedding(parts: Mapping[str, Any], where: str, word: str) -> LoadedEmbedding:
    """An embedding bundled in a LoRA file (``bundle_emb.<word>.<key>``), read as the WebUI reads
    it: ``string_to_param.<k>`` becomes the WebUI dict ``{"string_to_param": {k: ...}}``, other
    keys (``emb_params``, ``clip_l``, ``clip_g``) stay as named."""
    state: dict[str, Any] = {}
    for key, value in parts.items():
        head, _, rest = key.partition(".")
        if head == "string_to_param" and rest:
            state["string_to_param"] = {rest: value}
        else:
            state[key] = value
    return _embedding_from_state(state, Path(where), {}, word=word)


def _read_safetensors(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    try:
        with safetensors.safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            state = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as exc:  # safetensors raises its own error type for every kind of damage
        raise UserError(f"{path}: not a readable .safetensors file ({_one_line(exc)})") from exc
    return state, metadata


def _read_pickle(path: Path) -> Any:
    """``torch.load`` with ``weights_only=True``: tensors and plain containers, never code.

    ``ParameterDict`` is allowed in addition: the original textual inversion code and early
    WebUI versions stored ``string_to_param`` as one, and rebuilding it only fills attributes.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about pickle protocols on damaged files
            with torch.serialization.safe_globals([torch.nn.ParameterDict]):
                return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        code = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if code:
            raise UserError(
                f"refusing to load {path}: it contains pickled code ({code.group(1)}), and loading it "
                "could run programs on your computer; ask the author for a .safetensors version"
            ) from exc
        raise UserError(
            f"{path}: cannot read this file as a PyTorch embedding; it is damaged, not a .pt/.bin file, "
            f"or uses pickle features the safe loader refuses ({refusal_detail(str(exc))})"
        ) from exc
    except Exception as exc:  # damaged zips, truncated pickles: torch raises many types
        raise UserError(
            f"{path}: cannot read this file as a PyTorch embedding; it is damaged or not a .pt/.bin "
            f"file ({type(exc).__name__}: {_one_line(exc)})"
        ) from exc


def refusal_detail(message: str) -> str:
    """The informative line of torch's weights-only refusal, e.g. ``Unsupported operand 149``."""
    for line in message.splitlines():
        if "nsupported" in line:
            return line.strip().removeprefix("WeightsUnpickler error:").strip()
    return _one_line(Exception(message))


def _one_line(exc: BaseException) -> str:
    """An exception's message squeezed onto one short line (UserErrors are one line)."""
    text = " ".join(str(exc).split())
    if not text:
        return type(exc).__name__
    return text if len(text) <= 200 else text[:200] + "..."


def _embedding_from_state(
    state: Any, path: Path, file_metadata: Mapping[str, Any], *, word: str, layout: str | None = None
) -> LoadedEmbedding:
    """Recognise the layout of a loaded dict and pull out its vectors."""
    if not isinstance(state, Mapping) or not state:
        kind = "an empty dict" if isinstance(state, Mapping) else f"a {type(state).__name__}"
        raise UserError(f"{path}: not a textual inversion embedding (the file holds {kind})")
    metadata: dict[str, Any] = dict(file_metadata)
    if "string_to_param" in state:
        vectors = _webui_vectors(state, path)
        for key in ("name", "step", "sd_checkpoint", "sd_checkpoint_name"):
            if state.get(key) is not None:
                metadata[key] = state[key]
        layout = layout or "webui"
    elif "clip_l" in state and "clip_g" in state:
        parts = _sdxl_parts(state, path)
        return LoadedEmbedding(
            torch.cat(list(parts.values()), dim=1), word, "sdxl", dict(file_metadata), parts=parts
        )
    elif "emb_params" in state:
        vectors = _as_vectors(state["emb_params"], path, "emb_params")
        layout = "kohya"
    elif len(state) == 1:
        token, value = next(iter(state.items()))
        vectors = _as_vectors(value, path, str(token))
        metadata["token"] = str(token)
        layout = "diffusers"
    else:
        keys = ", ".join(sorted(map(str, state))[:6])
        raise UserError(
            f"{path}: not a textual inversion embedding (keys: {keys}); expected 'emb_params', "
            "'string_to_param', 'clip_l'+'clip_g' or a single token"
        )
    return LoadedEmbedding(vectors=vectors, word=word, layout=layout, metadata=metadata)


def _webui_vectors(state: Mapping[str, Any], path: Path) -> torch.Tensor:
    params = state["string_to_param"]
    params = getattr(params, "_parameters", params)  # a ParameterDict keeps its entries there
    if not isinstance(params, Mapping):
        raise UserError(f"{path}: 'string_to_param' is not a dict; the file is damaged")
    if len(params) != 1:
        raise UserError(
            f"{path}: the file holds {len(params)} concepts in 'string_to_param'; "
            "an embedding file must hold exactly one"
        )
    return _as_vectors(next(iter(params.values())), path, "string_to_param")


def _sdxl_parts(state: Mapping[str, Any], path: Path) -> dict[str, torch.Tensor]:
    parts = {key: _as_vectors(state[key], path, key) for key in SDXL_PARTS}
    if parts["clip_l"].shape[0] != parts["clip_g"].shape[0]:
        raise UserError(
            f"{path}: SDXL embedding with {parts['clip_l'].shape[0]} 'clip_l' vectors but "
            f"{parts['clip_g'].shape[0]} 'clip_g' vectors; the file is damaged"
        )
    return parts


def _as_vectors(value: Any, path: Path, what: str) -> torch.Tensor:
    """A validated fp32 ``[n, dim]`` copy; a single vector ``[dim]`` becomes ``[1, dim]``."""
    if not isinstance(value, torch.Tensor):
        raise UserError(f"{path}: '{what}' is a {type(value).__name__}, not a tensor; the file is damaged")
    if not value.is_floating_point():
        raise UserError(f"{path}: '{what}' holds {value.dtype} numbers, not floating point vectors")
    if value.dim() == 1:
        value = value.unsqueeze(0)
    if value.dim() != 2:
        raise UserError(f"{path}: '{what}' has shape {tuple(value.shape)}; expected [vectors, dimension]")
    if value.shape[0] == 0 or value.shape[1] == 0:
        raise UserError(f"{path}: '{what}' is empty (shape {tuple(value.shape)})")
    vectors = value.detach().to(device="cpu", dtype=torch.float32).contiguous().clone()
    vectors = vectors.as_subclass(torch.Tensor)  # never hand out an nn.Parameter
    if not torch.isfinite(vectors).all():
        raise UserError(
            f"{path}: '{what}' contains NaN or infinite values (a diverged training run?); "
            "this embedding cannot be used"
        )
    return vectors


# --- WebUI images -----------------------------------------------------------------------------


def _load_image_embedding(path: Path) -> LoadedEmbedding:
    """A WebUI embedding image: the text chunk if present, else the data hidden in the pixels.

    The WebUI writes the text chunk only into PNGs; a WEBP can carry the embedding only in its
    pixels, which survives lossless WEBP but not lossy compression.
    """
    try:
        with Image.open(path) as image:
            image.load()
            text_chunks = dict(getattr(image, "text", None) or {})  # PNG: includes chunks after the pixels
            encoded = text_chunks.get(IMAGE_TEXT_KEY) or image.info.get(IMAGE_TEXT_KEY)
            data = _decode_text_chunk(encoded, path) if encoded else _decode_pixel_payload(image, path)
    except UserError:
        raise
    except Exception as exc:  # Pillow raises OSError, ValueError, SyntaxError, DecompressionBombError...
        raise UserError(f"{path}: cannot read this image ({_one_line(exc)})") from exc
    if data is None:
        raise UserError(
            f"{path}: this image holds no embedding (no '{IMAGE_TEXT_KEY}' text chunk and no data "
            "hidden in its pixels); only images saved by the WebUI's embedding trainer carry one"
        )
    name = data.get("name") if isinstance(data, Mapping) else None
    word = name if isinstance(name, str) and name.strip() else path.stem
    embedding = _embedding_from_state(data, path, {}, word=word, layout="webui-image")
    embedding.metadata["file_stem"] = path.stem
    return embedding


def _tensor_from_json(obj: dict) -> Any:
    """JSON object hook: the WebUI stores tensors as ``{"TORCHTENSOR": nested lists}``."""
    if "TORCHTENSOR" in obj:
        return torch.tensor(obj["TORCHTENSOR"], dtype=torch.float32)
    return obj


def _decode_text_chunk(encoded: str | bytes, path: Path) -> Any:
    if len(encoded) > MAX_IMAGE_PAYLOAD_BYTES:
        raise UserError(f"{path}: the '{IMAGE_TEXT_KEY}' data in this image is implausibly large")
    try:
        return json.loads(base64.b64decode(encoded, validate=False), object_hook=_tensor_from_json)
    except (binascii.Error, ValueError, TypeError) as exc:  # JSONDecodeError is a ValueError
        raise UserError(
            f"{path}: the '{IMAGE_TEXT_KEY}' data in this image is damaged ({_one_line(exc)})"
        ) from exc


def _lcg_mask(count: int) -> np.ndarray:
    """The WebUI's fixed xor mask: an LCG from seed 0, ``(value % 255) & 0x0F``.

    The LCG is sequential, so the first block is computed in Python and later blocks are
    derived from earlier ones with the block's affine jump (x -> A^k x + C_k, mod 2^32); numpy's
    uint64 arithmetic wraps mod 2^64, which keeps the low 32 bits exact.
    """
    a, c, mask32 = 1664525, 1013904223, 0xFFFFFFFF
    block = max(1, min(count, 4096))
    first = np.empty(block, dtype=np.uint64)
    x = 0
    for i in range(block):
        x = (a * x + c) & mask32
        first[i] = x
    jump_a, jump_c = 1, 0
    for _ in range(block):
        jump_a, jump_c = (a * jump_a) & mask32, (a * jump_c + c) & mask32
    blocks, current, produced = [first], first, block
    while produced < count:
        current = (current * np.uint64(jump_a) + np.uint64(jump_c)) & np.uint64(mask32)
        blocks.append(current)
        produced += block
    values = np.concatenate(blocks)[:count]
    return ((values % np.uint64(255)) & np.uint64(0x0F)).astype(np.uint8)


def _decode_pixel_payload(image: Image.Image, path: Path) -> Any | None:
    """Recover the WebUI dict hidden in an embedding image's pixels, or ``None`` if there is none.

    Layout written by the WebUI: ``[low-nibble block] black column [picture] black column
    [high-nibble block]``, inside a black border. Each block's low 4 bits, xor-ed with a fixed
    LCG mask, hold half of each byte of a zlib-compressed JSON document.
    """
    pixels = np.asarray(image.convert("RGB"), dtype=np.uint8)
    lit = (pixels > 0).all(axis=2)  # the border is black; data pixels are never fully black
    rows, cols = np.flatnonzero(lit.any(axis=1)), np.flatnonzero(lit.any(axis=0))
    if rows.size == 0:
        return None
    nibbles = pixels[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1] & 0x0F
    blank_cols = np.flatnonzero(nibbles.sum(axis=(0, 2)) == 0)
    if blank_cols.size < 2:
        return None
    low, high = nibbles[:, : blank_cols.min()], nibbles[:, blank_cols.max() + 1 :]
    if low.size == 0 or low.shape != high.shape:
        return None
    low = low ^ _lcg_mask(low.size).reshape(low.shape)
    high = high ^ _lcg_mask(high.size).reshape(high.shape)
    payload = ((high << 4) | low).astype(np.uint8).tobytes()
    inflater = zlib.decompressobj()
    try:
        document = inflater.decompress(payload, MAX_IMAGE_PAYLOAD_BYTES)
    except zlib.error:
        return None  # an ordinary picture whose bits happen to look like a layout
    if not inflater.eof:
        raise UserError(f"{path}: the embedding hidden in this image is damaged or implausibly large")
    try:
        return json.loads(document, object_hook=_tensor_from_json)
    except (ValueError, TypeError) as exc:
        raise UserError(f"{path}: the embedding hidden in this image is damaged ({_one_line(exc)})") from exc


# ---------------------------------------------------------------------------------------------
# Checking against a model


def _family_of_dim(dim: int) -> str:
    return FAMILY_BY_DIM.get(dim, "no Stable Diffusion 1.x/2.x text encoder")


def check_embedding_fits(emb: LoadedEmbedding, text_dim: int, family: str, path: str | os.PathLike) -> None:
    """Raise a ``UserError`` naming both sides when ``emb`` cannot be used with the model.

    The WebUI skips such files silently and ComfyUI drops vectors, which leaves users guessing;
    here the message names the file, both dimensions and the model family of each.
    """
    model_family = FAMILY_NAMES.get(family, family)
    if emb.layout == "sdxl":
        raise UserError(
            f"{path}: embedding is an {FAMILY_NAMES['sdxl']} pair but the model's text encoder is "
            f"{text_dim} ({model_family}); use an embedding trained for {model_family}"
        )
    if emb.dim != text_dim:
        raise UserError(
            f"{path}: embedding has dimension {emb.dim} ({_family_of_dim(emb.dim)}) but the model's "
            f"text encoder is {text_dim} ({model_family}); use an embedding trained for {model_family}"
        )
    if emb.num_vectors > CHUNK_TOKENS:
        raise UserError(
            f"{path}: embedding has {emb.num_vectors} vectors but a prompt chunk holds only "
            f"{CHUNK_TOKENS} tokens and an embedding cannot be split across chunks"
        )


def rows_for_model(
    emb: LoadedEmbedding, widths: Mapping[str, int], family: str, path: str | os.PathLike
) -> dict[str, torch.Tensor]:
    """The embedding's rows for each of a model's text encoders (``widths``: key -> width, e.g.
    ``{"emb_params": 768}`` or ``{"clip_l": 768, "clip_g": 1280}``); a file for another family,
    or with its parts swapped, is refused in one line naming both sides.

    For an SDXL model a one-token diffusers file (``learned_embeds.safetensors``) is the first
    half of diffusers' pair; the second is the file beside it with ``_2`` added to the stem.
    """
    if set(widths) == {"emb_params"}:
        check_embedding_fits(emb, widths["emb_params"], family, path)
        return {"emb_params": emb.vectors}
    model = f"{FAMILY_NAMES.get(family, family)} ({' + '.join(str(w) for w in widths.values())})"
    if emb.layout == "diffusers":
        emb = _with_second_half(emb, Path(path))
    if set(emb.parts) != set(widths):
        raise UserError(
            f"{path}: an embedding of dimension {emb.dim} ({_family_of_dim(emb.dim)}) but the model is {model}; "
            f"use an embedding trained for {FAMILY_NAMES.get(family, family)}"
        )
    for key, width in widths.items():
        if emb.parts[key].shape[1] != width:
            found = " + ".join(str(emb.parts[k].shape[1]) for k in widths)
            raise UserError(
                f"{path}: its {', '.join(widths)} vectors have dimensions {found} but the model is {model}; "
                "the file is for another model, or its parts are swapped"
            )
    if emb.num_vectors > CHUNK_TOKENS:
        raise UserError(
            f"{path}: embedding has {emb.num_vectors} vectors but a prompt chunk holds only {CHUNK_TOKENS} tokens"
        )
    return dict(emb.parts)


def _with_second_half(emb: LoadedEmbedding, path: Path) -> LoadedEmbedding:
    """A diffusers SDXL pair: ``emb`` (the first encoder's rows) and ``<stem>_2<suffix>`` beside it."""
    second_path = path.with_name(f"{path.stem}_2{path.suffix}")
    if not second_path.is_file():
        return emb
    second = load_embedding_file(second_path)
    if second.num_vectors != emb.num_vectors or second.layout != "diffusers":
        raise UserError(
            f"{second_path}: not the second half of {path.name} (diffusers' SDXL pair): "
            f"{second.num_vectors} vectors against {emb.num_vectors}"
        )
    parts = {"clip_l": emb.vectors, "clip_g": second.vectors}
    return LoadedEmbedding(
        torch.cat(list(parts.values()), dim=1), emb.word, "diffusers-sdxl", emb.metadata, parts
    )


# ---------------------------------------------------------------------------------------------
# Writing


def save_embedding(
    path: str | os.PathLike,
    vectors: torch.Tensor | Mapping[str, torch.Tensor],
    token_string: str,
    *,
    step: int | None,
    checkpoint_name: str | None,
    metadata: dict[str, str] | None,
    dtype: torch.dtype = torch.float32,
    extension: str | None = None,
) -> None:
    """Write ``vectors`` atomically in the layout chosen by the extension (``extension``, else the path's).

    ``vectors`` is one ``[n, dim]`` tensor, or each text encoder's rows by embedding-file key
    (``{"emb_params": ...}`` for SD 1.x/2.x, ``{"clip_l": ..., "clip_g": ...}`` for SDXL).

    * ``.safetensors``: kohya's ``{"emb_params": [n, dim]}`` (SDXL: ``clip_l`` and ``clip_g``)
      with ``metadata`` as the file's safetensors metadata.
    * ``.pt`` and ``.ckpt`` (kohya writes ckpt as pt): the WebUI dict, pickled in torch's legacy
      format because the WebUI's safe unpickler rejects the entries newer zip files contain;
      for SDXL the plain ``{"clip_l", "clip_g"}`` dict, which is what kohya writes and the WebUI
      reads. ``metadata`` has no place in these layouts and is not written.

    The tensor is copied (so a row slice of the embedding matrix does not drag the whole matrix's
    storage into the file), detached, made a plain CPU ``torch.Tensor`` and always 2-D.
    """
    path = Path(path)
    ext = (extension or path.suffix).lower()
    if ext not in WRITE_EXTENSIONS:
        raise UserError(f"{path}: cannot save an embedding as '{ext}'; use .safetensors, .pt or .ckpt")
    parts = {"emb_params": vectors} if isinstance(vectors, torch.Tensor) else dict(vectors)
    if set(parts) not in ({"emb_params"}, set(SDXL_PARTS)):
        raise ValueError(f"no embedding layout for the text encoders {sorted(parts)}")
    tensors = {key: _plain_vectors(rows, dtype) for key, rows in parts.items()}
    if ext == ".safetensors":
        header = _validated_metadata(metadata)
        payload = safetensors.torch.save(tensors, metadata=header)
        write_atomically(path, lambda f: f.write(payload))
    elif "emb_params" not in tensors:
        write_atomically(path, lambda f: torch.save(tensors, f, _use_new_zipfile_serialization=False))
    else:
        tensor = tensors["emb_params"]
        state = {
            "string_to_token": {"*": WEBUI_STAR_TOKEN_ID},
            "string_to_param": {"*": tensor},
            "name": token_string,
            "step": step,
            "sd_checkpoint": None,
            "sd_checkpoint_name": checkpoint_name,
        }
        write_atomically(path, lambda f: torch.save(state, f, _use_new_zipfile_serialization=False))


def _plain_vectors(vectors: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if not isinstance(vectors, torch.Tensor):
        raise TypeError(f"vectors must be a torch.Tensor, got {type(vectors).__name__}")
    if vectors.dim() == 1:
        vectors = vectors.unsqueeze(0)
    if vectors.dim() != 2 or vectors.shape[0] == 0:
        raise ValueError(f"vectors must be [n, dim] with n >= 1, got shape {tuple(vectors.shape)}")
    tensor = vectors.detach().to(device="cpu", dtype=dtype).contiguous().clone()
    return tensor.as_subclass(torch.Tensor)


def _validated_metadata(metadata: Mapping[str, str] | None) -> dict[str, str] | None:
    if not metadata:
        return None
    bad = [key for key, value in metadata.items() if not isinstance(key, str) or not isinstance(value, str)]
    if bad:
        raise ValueError(f"safetensors metadata must map str to str; bad entries: {bad}")
    return dict(metadata)


# ---------------------------------------------------------------------------------------------
# SAI model spec metadata


def _modelspec_key(key: str) -> str:
    """``author``, ``metadata_author`` and ``modelspec.author`` all mean ``modelspec.author``."""
    if key.startswith("modelspec."):
        return key
    return "modelspec." + key.removeprefix("metadata_")


def _thumbnail_data_url(value: str) -> str | None:
    """kohya turns a ``--metadata_thumbnail`` file path into a data URL; a missing file is skipped."""
    if value.startswith("data:"):
        return value
    thumbnail = Path(value)
    if not thumbnail.is_file():
        logger.warning("--metadata_thumbnail: file %s not found; no thumbnail is written", value)
        return None
    mime = mimetypes.guess_type(thumbnail.name)[0] or "application/octet-stream"
    return f"data:{mime};base64," + base64.b64encode(thumbnail.read_bytes()).decode("ascii")


def sai_model_spec_metadata(
    *,
    architecture: str,
    v_parameterization: bool,
    resolution: tuple[int, int],
    title: str,
    clip_skip: int | None,
    extra: dict[str, str],
    timesteps: tuple[int, int] | None = None,
    implementation: str = MODELSPEC_IMPLEMENTATION,
) -> dict[str, str]:
    """The ``modelspec.*`` safetensors metadata kohya writes into a textual inversion file (and,
    with a ``.../lora`` architecture and its ``implementation``, into a LoRA file).

    ``architecture`` is the model family's (``ModelFamily.architecture``), e.g.
    ``stable-diffusion-v1/textual-inversion``.

    ``extra`` carries kohya's ``--metadata_*`` options (author, description, license, tags,
    usage_hint, thumbnail, merged_from, trigger_phrase, preprocessor, is_negative_embedding, and
    title to override ``title``); each becomes ``modelspec.<name>``. Keys may be given as
    ``author``, ``metadata_author`` or ``modelspec.author``; ``None`` values are left out. A
    thumbnail given as a file path is embedded as a data URL, as kohya does. ``timesteps`` is
    ``(--min_timestep, --max_timestep)`` when either was given (``modelspec.timestep_range``), and
    ``modelspec.implementation_version`` names this project and version (kohya: its git commit).
    """
    width, height = resolution
    metadata = {
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": architecture,
        "modelspec.implementation": implementation,
        "modelspec.title": title,
        "modelspec.resolution": f"{width}x{height}",
        "modelspec.date": datetime.datetime.fromtimestamp(int(time.time())).isoformat(),
        "modelspec.prediction_type": "v" if v_parameterization else "epsilon",
    }
    if timesteps is not None:
        metadata["modelspec.timestep_range"] = f"{timesteps[0]},{timesteps[1]}"
    if clip_skip is not None:
        metadata["modelspec.encoder_layer"] = str(clip_skip)
    metadata["modelspec.implementation_version"] = IMPLEMENTATION
    for key, value in extra.items():
        if value is None:
            continue
        spec_key = _modelspec_key(key)
        text = str(value)
        if spec_key == "modelspec.thumbnail":
            text = _thumbnail_data_url(text)
            if text is None:
                continue
        metadata[spec_key] = text
    return metadata
