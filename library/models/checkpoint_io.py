"""Reading single-file checkpoints safely and a part at a time, and telling the user what a file
is when it is not one.

Checkpoints come from strangers. ``.ckpt``/``.pt``/``.bin`` are read with
``torch.load(weights_only=True)``, which never executes pickled code; ``.safetensors`` cannot
carry code at all. Every failure becomes one ``UserError`` line naming the file.

A model is loaded one component at a time (``Checkpoint.read``), so that the file's tensors of
one component, not of the whole file, are in memory next to the model being built. A
``.safetensors`` file is read with plain file reads, tensor by tensor: no memory map, so the
file's pages never count as the process's memory.
"""

from __future__ import annotations

import json
import pickle
import pickletools
import struct
import warnings
from collections.abc import Iterable
from pathlib import Path

import torch

from library.errors import UserError

PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin"}
UNET_PREFIX = "model.diffusion_model."
SD1_TEXT_PREFIX = "cond_stage_model.transformer."
SD2_TEXT_PREFIX = "cond_stage_model.model."
SDXL_TEXT_PREFIXES = ("conditioner.embedders.0.transformer.", "conditioner.embedders.1.model.")
VAE_PREFIX = "first_stage_model."


SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
MAX_HEADER_BYTES = 100 * 2**20


class Checkpoint:
    """The tensors of a single-file checkpoint, read on demand (``read``), each part once."""

    def __init__(self, path: Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"{path}: file not found")
        if self.path.stat().st_size == 0:
            raise UserError(f"{path}: the file is empty (an interrupted download?)")
        suffix = self.path.suffix.lower()
        self._entries: dict[str, tuple[torch.dtype, list[int], int, int]] = {}  # safetensors: where each is
        self._loaded: dict[str, torch.Tensor] = {}  # pickles: everything, dropped part by part
        if suffix == ".safetensors":
            self._read_safetensors_header()
        elif suffix in PICKLE_SUFFIXES:
            self._loaded = _tensors_of(_read_pickle_checkpoint(self.path), self.path)
        else:
            raise UserError(f"{path}: unknown checkpoint type {suffix!r}; expected .safetensors or .ckpt")

    def keys(self) -> list[str]:
        return list(self._entries or self._loaded)

    def read(self, keys: Iterable[str]) -> dict[str, torch.Tensor]:
        """The tensors of ``keys``; a pickle's copies are handed over (not kept), so they can be freed."""
        if not self._entries:
            return {key: self._loaded.pop(key) for key in keys}
        tensors = {}
        with self.path.open("rb") as f:
            for key in keys:
                dtype, shape, start, end = self._entries[key]
                tensor = torch.empty(shape, dtype=dtype)
                f.seek(self._data_start + start)
                view = memoryview(tensor.view(-1).view(torch.uint8).numpy()) if tensor.numel() else b""
                if f.readinto(view) != end - start:
                    raise UserError(
                        f"{self.path}: truncated (a tensor ends past the end of the file); download it again"
                    )
                tensors[key] = tensor
        return tensors

    def _read_safetensors_header(self) -> None:
        """The safetensors format: an 8-byte little-endian header length, a JSON header, the data."""
        size = self.path.stat().st_size
        try:
            with self.path.open("rb") as f:
                (length,) = struct.unpack("<Q", f.read(8))
                if length > min(MAX_HEADER_BYTES, size - 8):
                    raise ValueError(f"header of {length} bytes")
                header = json.loads(f.read(length))
        except (struct.error, ValueError, UnicodeDecodeError) as exc:
            raise UserError(
                f"{self.path}: not a readable .safetensors file (truncated or corrupt: {exc}); "
                "download it again"
            ) from None
        self._data_start = 8 + length
        for key, entry in header.items():
            if key == "__metadata__":
                continue
            try:
                dtype = SAFETENSORS_DTYPES[entry["dtype"]]
                start, end = entry["data_offsets"]
                shape = [int(n) for n in entry["shape"]]
            except (KeyError, TypeError, ValueError):
                raise UserError(
                    f"{self.path}: tensor {key!r} has a damaged header entry; download the file again"
                ) from None
            if self._data_start + end > size or end - start != torch.Size(shape).numel() * dtype.itemsize:
                raise UserError(f"{self.path}: truncated or corrupt (tensor {key!r}); download it again")
            self._entries[key] = (dtype, shape, start, end)


def _tensors_of(state, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise UserError(f"{path}: does not hold a dictionary of weights; not a Stable Diffusion checkpoint")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since torch 1.6
PICKLE_PROTOCOL_OPCODE = 0x80  # torch's legacy format: a pickle of protocol 2 or later


def _read_pickle_checkpoint(path: Path) -> dict:
    with path.open("rb") as f:
        start = f.read(4)
    if not start.startswith(ZIP_MAGIC) and (not start or start[0] != PICKLE_PROTOCOL_OPCODE):
        raise UserError(
            f"{path}: not a checkpoint (neither a PyTorch file nor a .safetensors file; a text or web page "
            "saved under this name?); download it again"
        )
    try:
        with warnings.catch_warnings():  # torch's notes on old pickle protocols say nothing users can act on
            warnings.simplefilter("ignore")
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        foreign = foreign_globals(path)
        if foreign:
            raise UserError(
                f"{path}: refused: the file contains pickled code ({', '.join(foreign[:3])}), which could run "
                "code on your machine; use a .safetensors version of this model"
            ) from None
        raise UserError(
            f"{path}: not a readable checkpoint (the safe loader refused it: {_first_line(exc)}); download it "
            "again or use a .safetensors version"
        ) from None
    except Exception as exc:  # cut files: RuntimeError (zip), EOFError, KeyError (not a pickle), ...
        raise UserError(
            f"{path}: not a readable checkpoint (truncated or corrupt: {_first_line(exc)}); download it again"
        ) from None


# what torch.save writes into a checkpoint: anything else a pickle names is someone's code
SAFE_GLOBAL_PREFIXES = ("torch.", "collections.OrderedDict", "numpy.", "_codecs.encode", "builtins.set")


def foreign_globals(path: Path) -> list[str]:
    """The callables a pickle would import (``module.name``) beyond what checkpoints hold, found by
    reading its opcodes (``pickletools``), never by running it; a zip checkpoint's ``data.pkl`` too."""
    data = path.read_bytes()
    if data.startswith(ZIP_MAGIC):
        import zipfile

        try:
            with zipfile.ZipFile(path) as archive:
                data = next((archive.read(n) for n in archive.namelist() if n.endswith("data.pkl")), b"")
        except (zipfile.BadZipFile, OSError):
            return []
    names, strings = [], []
    try:
        for opcode, argument, _ in pickletools.genops(data):
            if opcode.name in ("GLOBAL", "INST"):
                names.append(str(argument).replace(" ", "."))
            elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                names.append(f"{strings[-2]}.{strings[-1]}")
            elif isinstance(argument, str):
                strings.append(argument)
    except Exception:  # a damaged pickle: whatever was read before the damage counts
        pass
    return [name for name in dict.fromkeys(names) if not name.startswith(SAFE_GLOBAL_PREFIXES)]


def _first_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 160 else text[:160] + "..."


def describe_non_sd_file(keys: Iterable[str]) -> str | None:
    """What a file is when it is not an SD 1.x/2.x or SDXL checkpoint (judged by its tensor names),
    as advice; None when it is one."""
    keys = list(keys)
    if any(k.startswith(UNET_PREFIX) for k in keys):
        return None
    if any(
        k.startswith(("lora_unet_", "lora_te", "lora_")) or ".lora_down." in k or "lora_A" in k for k in keys
    ):
        return "is a LoRA, not a Stable Diffusion checkpoint; pass the base model it was trained for"
    if {"emb_params"} <= set(keys) or {"clip_l", "clip_g"} <= set(keys) or "string_to_param" in keys:
        return "is a Textual Inversion embedding, not a Stable Diffusion checkpoint"
    if any(k.startswith(("encoder.conv_in", VAE_PREFIX + "encoder.")) for k in keys):
        return "is a VAE only; pass it with --vae together with a full checkpoint"
    return f"has no Stable Diffusion UNet weights ({UNET_PREFIX}*); not an SD 1.x/2.x or SDXL checkpoint"


def strip_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries under ``prefix``, with the prefix removed."""
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
