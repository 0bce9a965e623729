"""Test helper: how each of seven clients reads a Textual Inversion embedding file.

Our own re-implementations of the loading rules in ``docs/embedding-clients.md`` (gathered
from the clients' public code, late 2026): AUTOMATIC1111 WebUI, Forge, SD.Next, ComfyUI,
InvokeAI, diffusers and kohya's ``gen_img_diffusers.py``. Each ``load_<client>(path, model_dim)``
returns what that client would put into the model (the trigger word and an ``[n, dim]`` tensor)
or raises ``NotLoaded`` with the client's reason: a file extension it skips, keys it does not
recognise, a width that does not match the model, a pickle its safety scan refuses.

``CLIENTS`` maps each client's name to its loader, so a test can check one file against all.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch
from webui_rules import WebUIRejected, _scan_pickle

WEBUI_WIDTHS = (768, 1024, 2048)


class NotLoaded(AssertionError):
    """The client would not use this file (the message says why)."""


@dataclass
class Loaded:
    words: list[str]  # the tokens the client adds, in order
    vectors: torch.Tensor  # [n, dim]


def _read(path: Path, *, weights_only: bool = True) -> dict:
    if path.suffix.lower() == ".safetensors":
        return safetensors.torch.load_file(str(path), device="cpu")
    try:
        return torch.load(str(path), map_location="cpu", weights_only=weights_only)
    except Exception as exc:  # the clients catch and skip
        raise NotLoaded(f"{path}: torch.load failed: {exc}") from exc


def _stem_words(stem: str, count: int, separator: str) -> list[str]:
    return [stem] + [f"{stem}{separator}{i}" for i in range(1, count)]


def _webui_like(path: Path, model_dim: int, *, safe: bool) -> Loaded:
    """A1111 (``safe``: its restricted unpickler first) and Forge (plain ``torch.load``)."""
    if path.suffix.lower() not in (".pt", ".bin", ".safetensors"):
        raise NotLoaded(f"{path.suffix}: not an embedding extension")
    if safe and path.suffix.lower() != ".safetensors":
        try:
            _scan_pickle(path)
        except WebUIRejected as exc:
            raise NotLoaded(str(exc)) from exc
    data = _read(path, weights_only=safe)
    if type(data) is not dict:
        raise NotLoaded("top level is not a plain dict")
    if "string_to_param" in data:
        params = data["string_to_param"]
        if len(params) != 1:
            raise NotLoaded("embedding file has multiple terms in it")
        vectors = next(iter(params.values()))
    elif "clip_g" in data and "clip_l" in data:
        vectors = torch.cat([data["clip_l"], data["clip_g"]], dim=1)
    elif len(data) == 1 and isinstance(next(iter(data.values())), torch.Tensor):
        vectors = next(iter(data.values()))
        if vectors.dim() == 1:
            vectors = vectors.unsqueeze(0)
    else:
        raise NotLoaded("couldn't identify as textual inversion embedding")
    if type(vectors) is not torch.Tensor or vectors.dim() != 2:
        raise NotLoaded("not a plain 2-D tensor")
    if vectors.shape[1] not in WEBUI_WIDTHS or vectors.shape[1] != model_dim:
        raise NotLoaded(f"width {vectors.shape[1]} does not fit the model ({model_dim})")
    return Loaded(_stem_words(path.stem, len(vectors), ""), vectors.float())


def load_a1111(path: Path, model_dim: int) -> Loaded:
    return _webui_like(Path(path), model_dim, safe=True)


def load_forge(path: Path, model_dim: int) -> Loaded:
    return _webui_like(Path(path), model_dim, safe=False)


def load_sdnext(path: Path, model_dim: int) -> Loaded:
    """safetensors: every tensor of the model's width, key names ignored; .pt: ``string_to_param['*']``."""
    path = Path(path)
    ext = path.suffix.lower()
    if ext == ".safetensors":
        tensors = [t for t in _read(path).values() if t.dim() == 2 and t.shape[1] == model_dim]
        if not tensors:
            raise NotLoaded(f"no tensor of width {model_dim}")
        vectors = torch.cat(tensors)
    elif ext == ".pt":
        data = _read(path)
        try:
            vectors = data["string_to_param"]["*"]
        except (KeyError, TypeError) as exc:
            raise NotLoaded("a .pt without string_to_param['*']") from exc
        if vectors.shape[-1] != model_dim:
            raise NotLoaded(f"width {vectors.shape[-1]} does not fit the model ({model_dim})")
    else:
        raise NotLoaded(f"{ext}: SD.Next reads .safetensors and .pt only")
    return Loaded(_stem_words(path.stem, len(vectors), "_"), vectors.float())


def load_comfyui(path: Path, model_dim: int) -> Loaded:
    """``embedding:NAME``: the exact file name, else NAME + .safetensors/.pt/.bin; ``weights_only``."""
    path = Path(path)
    data = _read(path)
    if isinstance(data, dict) and "string_to_param" in data:
        vectors = next(iter(data["string_to_param"].values()))
    elif isinstance(data, list):
        vectors = torch.cat(data)
    elif isinstance(data, dict) and "clip_l" in data:
        vectors = data["clip_l"]
    elif isinstance(data, dict) and any(k.startswith("bundle_emb.") for k in data):
        raise NotLoaded("a LoRA bundle, not a plain embedding")
    elif isinstance(data, dict) and data:
        vectors = next(iter(data.values()))
    else:
        raise NotLoaded("no tensor found")
    if vectors.dim() == 1:
        vectors = vectors.unsqueeze(0)
    if vectors.shape[-1] != model_dim:
        raise NotLoaded(f"width {vectors.shape[-1]} does not fit the model ({model_dim}); ignored")
    return Loaded([f"embedding:{path.stem}"], vectors.float())


INVOKE_BASES = {768: "sd-1", 1024: "sd-2", 1280: "sdxl"}


def load_invokeai(path: Path, model_dim: int) -> Loaded:
    """Install-time probe of the base model, then the keys in InvokeAI's order."""
    path = Path(path)
    data = _read(path)
    if not isinstance(data, dict):
        raise NotLoaded("not a dict")
    if "string_to_token" in data:
        probe_width = data["string_to_param"]["*"].shape[-1]
    elif "emb_params" in data:
        probe_width = data["emb_params"].shape[-1]
    elif "clip_g" in data:
        probe_width = 1280
    else:  # the probe reads the first value's shape[0]: a diffusers {token: [n, 768]} file fails
        probe_width = next(iter(data.values())).shape[0]
    if probe_width not in INVOKE_BASES:
        raise NotLoaded(f"the model probe cannot place width {probe_width}")
    if "string_to_param" in data:
        vectors = next(iter(data["string_to_param"].values()))
    elif "emb_params" in data:
        vectors = data["emb_params"]
    elif "clip_g" in data:
        raise NotLoaded("an SDXL pair on an SD 1.x/2.x model")
    else:
        vectors = next(iter(data.values()))
    if vectors.dim() == 1:
        vectors = vectors.unsqueeze(0)
    if vectors.shape[-1] != model_dim:
        raise NotLoaded(f"width {vectors.shape[-1]} does not fit the model ({model_dim})")
    return Loaded([f"<{path.stem}>"], vectors.float())


def load_diffusers(path: Path, model_dim: int, token: str | None = None) -> Loaded:
    """``load_textual_inversion(path, token=...)``: without ``token``, a single key names the token
    (so a kohya file would add the word ``emb_params``), a WebUI dict takes ``name``."""
    path = Path(path)
    data = _read(path)
    if isinstance(data, torch.Tensor):
        if token is None:
            raise NotLoaded("a bare tensor needs token=")
        vectors, word = data, token
    elif len(data) == 1:
        key, vectors = next(iter(data.items()))
        word = token or key
    elif "string_to_param" in data:
        vectors, word = data["string_to_param"]["*"], token or data["name"]
    else:
        raise NotLoaded("Loaded state dictionary is incorrect")
    if vectors.dim() == 1:
        vectors = vectors.unsqueeze(0)
    if vectors.shape[-1] != model_dim:
        raise NotLoaded(f"width {vectors.shape[-1]} does not match the text encoder ({model_dim})")
    words = [word] + [f"{word}_{i}" for i in range(1, len(vectors))] if len(vectors) > 1 else [word]
    return Loaded(words, vectors.float())


def load_kohya(path: Path, model_dim: int) -> Loaded:
    """kohya's ``gen_img_diffusers.py``: ``string_to_param`` else the first value; ``size()[0]`` vectors."""
    path = Path(path)
    data = _read(path, weights_only=False)
    vectors = data["string_to_param"]["*"] if "string_to_param" in data else next(iter(data.values()))
    if type(vectors) is not torch.Tensor:
        raise NotLoaded("not an exact torch.Tensor")
    if vectors.dim() == 1:  # size()[0] vectors: a 1-D tensor would become 768 one-number vectors
        raise NotLoaded("1-D tensor: kohya would read one vector per number")
    if vectors.shape[1] != model_dim:
        raise NotLoaded(f"width {vectors.shape[1]} does not fit the model ({model_dim})")
    return Loaded(_stem_words(path.stem, len(vectors), ""), vectors.float())


CLIENTS: dict[str, Callable[[Path, int], Loaded]] = {
    "A1111": load_a1111,
    "Forge": load_forge,
    "SD.Next": load_sdnext,
    "ComfyUI": load_comfyui,
    "InvokeAI": load_invokeai,
    "diffusers": lambda path, dim: load_diffusers(path, dim, token=Path(path).stem),
    "kohya": load_kohya,
}

# a client that skips a file for its extension alone (the WebUI family and SD.Next skip .ckpt)
READS_EXTENSION = {
    "A1111": (".pt", ".bin", ".safetensors"),
    "Forge": (".pt", ".bin", ".safetensors"),
    "SD.Next": (".pt", ".safetensors"),
    "ComfyUI": (".pt", ".bin", ".safetensors", ".ckpt"),  # any exact file name
    "InvokeAI": (".pt", ".bin", ".safetensors", ".ckpt"),
    "diffusers": (".pt", ".bin", ".safetensors", ".ckpt"),
    "kohya": (".pt", ".bin", ".safetensors", ".ckpt"),
}


# ---------------------------------------------------------------------------------------------
# SDXL: what each client puts into each of the two text encoders (``clip_l``: CLIP ViT-L, 768;
# ``clip_g``: OpenCLIP bigG, 1280). Each ``load_<client>_sdxl(path, widths)`` returns the rows
# per encoder key, or raises ``NotLoaded``; ``widths`` is ``{"clip_l": 768, "clip_g": 1280}``.


def _sdxl_from(loaded: Loaded, widths: dict[str, int]) -> dict[str, torch.Tensor]:
    """A concatenated 768 + 1280 result split back per encoder."""
    first = widths["clip_l"]
    return {"clip_l": loaded.vectors[:, :first], "clip_g": loaded.vectors[:, first:]}


def _a1111_sdxl(path: Path, widths: dict[str, int], safe: bool = True) -> dict[str, torch.Tensor]:
    """A1111/Forge: ``clip_g`` and ``clip_l`` side by side must make the SDXL width (2048)."""
    return _sdxl_from(_webui_like(Path(path), sum(widths.values()), safe=safe), widths)


def _sdnext_sdxl(path: Path, widths: dict[str, int]) -> dict[str, torch.Tensor]:
    """SD.Next: .safetensors tensors routed to an encoder by their width; a .pt reads only
    ``string_to_param['*']``, which an SDXL file does not have."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise NotLoaded("SD.Next reads an SDXL embedding from .safetensors only")
    tensors = _read(path)
    rows = {}
    for key, width in widths.items():
        found = [t for t in tensors.values() if t.dim() == 2 and t.shape[1] == width]
        if not found:
            raise NotLoaded(f"no tensor of width {width} for {key}")
        rows[key] = found[0]
    return rows


def _comfyui_sdxl(path: Path, widths: dict[str, int]) -> dict[str, torch.Tensor]:
    """ComfyUI: each encoder reads its own key."""
    data = _read(Path(path))
    rows = {}
    for key, width in widths.items():
        if not isinstance(data, dict) or key not in data:
            raise NotLoaded(f"no {key!r} for that encoder")
        if data[key].shape[-1] != width:
            raise NotLoaded(f"{key}: width {data[key].shape[-1]} does not fit ({width}); ignored")
        rows[key] = data[key]
    return rows


def _invokeai_sdxl(path: Path, widths: dict[str, int]) -> dict[str, torch.Tensor]:
    """InvokeAI: a file with ``string_to_token``/``emb_params`` is probed as SD 1.x/2.x, one with
    ``clip_g`` as SDXL, whose rows it reads from ``clip_l`` and ``clip_g``."""
    data = _read(Path(path))
    if (
        not isinstance(data, dict)
        or "clip_g" not in data
        or "string_to_token" in data
        or "emb_params" in data
    ):
        raise NotLoaded("not probed as an SDXL embedding")
    return {key: data[key] for key in widths}


def _diffusers_sdxl(path: Path, widths: dict[str, int]) -> dict[str, torch.Tensor]:
    """diffusers: two ``load_textual_inversion`` calls, ``clip_l`` into ``text_encoder`` and
    ``clip_g`` into ``text_encoder_2`` (each a bare tensor with ``token=``)."""
    data = _read(Path(path))
    rows = {}
    for key, width in widths.items():
        tensor = data[key]
        if tensor.shape[-1] != width:
            raise NotLoaded(f"{key}: width {tensor.shape[-1]} does not match the text encoder ({width})")
        rows[key] = tensor
    return rows


def _kohya_sdxl(path: Path, widths: dict[str, int]) -> dict[str, torch.Tensor]:
    """kohya's ``gen_img.py`` for SDXL: ``clip_l`` and ``clip_g`` both, exact tensors."""
    data = _read(Path(path), weights_only=False)
    if "clip_l" not in data or "clip_g" not in data:
        raise NotLoaded("SDXL needs clip_l and clip_g")
    for key, width in widths.items():
        if type(data[key]) is not torch.Tensor or data[key].dim() != 2 or data[key].shape[1] != width:
            raise NotLoaded(f"{key}: not a [n, {width}] tensor")
    return {key: data[key] for key in widths}


SDXL_CLIENTS: dict[str, Callable[[Path, dict[str, int]], dict[str, torch.Tensor]]] = {
    "A1111": _a1111_sdxl,
    "Forge": lambda path, widths: _a1111_sdxl(path, widths, safe=False),
    "SD.Next": _sdnext_sdxl,
    "ComfyUI": _comfyui_sdxl,
    "InvokeAI": _invokeai_sdxl,
    "diffusers": _diffusers_sdxl,
    "kohya": _kohya_sdxl,
}
