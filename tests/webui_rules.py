"""Test helper: the checks AUTOMATIC1111's WebUI applies before it uses an embedding file.

Re-implemented from the WebUI's ``modules/safe.py`` (the scan every ``torch.load`` goes through)
and ``modules/textual_inversion/textual_inversion.py`` (what it accepts as an embedding), so
tests can prove that the files we write load there, without installing the WebUI.

The scan, for a ``.pt``/``.bin``:

* a zip (torch's current format): every entry must match the WebUI's pattern
  ``<folder>/data.pkl``, ``<folder>/data/<n>``, ``<folder>/version``, ``<folder>/byteorder`` or
  ``<folder>/.data/serialization_id`` (the pattern of WebUI 1.10; older releases allowed only
  the first three), there must be exactly one ``data.pkl``, and it must unpickle with the
  restricted unpickler below. Recent torch adds ``.format_version`` and ``.storage_alignment``,
  so a plain ``torch.save`` is rejected.
* not a zip (torch's legacy format): five consecutive pickles must unpickle with the same
  restricted unpickler.

The restricted unpickler allows only the globals the WebUI allows (tensor rebuilding, storage
types, ``OrderedDict``, ``set``, ``ParameterDict`` and a few numpy/codecs helpers). Here the
tensor-rebuilding functions are stubs, so the scan never builds a tensor over an empty storage
the way the WebUI's does; whether a file passes depends only on which globals it names.

After the scan the WebUI loads the file and requires ``string_to_param`` with exactly one
entry; our stricter rules add: a plain ``dict``, a plain ``torch.Tensor``, 2-D.
"""

from __future__ import annotations

import codecs
import collections
import importlib
import pickle
import re
import warnings
import zipfile
from pathlib import Path

import safetensors.torch
import torch

ALLOWED_ZIP_NAME = re.compile(r"^([^/]+)/((data/\d+)|version|byteorder|.data/serialization_id|(data\.pkl))$")
DATA_PKL_NAME = re.compile(r"^([^/]+)/data\.pkl$")
LEGACY_PICKLE_COUNT = 5  # magic number, protocol, system info, the object, the storage keys
WEBUI_EXTENSIONS = (".pt", ".bin", ".safetensors")  # the WebUI skips .ckpt embeddings


class WebUIRejected(AssertionError):
    """The WebUI would not load this file as an embedding."""


class _TensorStub:
    """Stands in for a tensor or storage during the scan."""

    def __init__(self, *args, **kwargs) -> None:
        pass


def _numpy_global(name: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # numpy 2 deprecates the numpy.core alias
        try:
            module = importlib.import_module("numpy._core.multiarray")
        except ImportError:
            module = importlib.import_module("numpy.core.multiarray")
    return getattr(module, name)


def _allowed_global(module: str, name: str):
    """What the WebUI's ``RestrictedUnpickler.find_class`` returns, or ``None`` if forbidden."""
    if module == "collections" and name == "OrderedDict":
        return collections.OrderedDict
    if module == "torch._utils" and name in (
        "_rebuild_tensor_v2",
        "_rebuild_parameter",
        "_rebuild_device_tensor_from_numpy",
    ):
        return _TensorStub
    if module == "torch" and name in (
        "FloatStorage",
        "HalfStorage",
        "IntStorage",
        "LongStorage",
        "DoubleStorage",
        "ByteStorage",
        "float32",
        "BFloat16Storage",
    ):
        return getattr(torch, name)
    if module == "torch.nn.modules.container" and name == "ParameterDict":
        return torch.nn.ParameterDict
    if module == "numpy.core.multiarray" and name in ("scalar", "_reconstruct"):
        return _numpy_global(name)
    if module == "numpy" and name in ("dtype", "ndarray"):
        import numpy

        return getattr(numpy, name)
    if module == "_codecs" and name == "encode":
        return codecs.encode
    if module == "__builtin__" and name == "set":
        return set
    return None


class _RestrictedUnpickler(pickle.Unpickler):
    def persistent_load(self, saved_id):
        if not (isinstance(saved_id, tuple) and saved_id and saved_id[0] == "storage"):
            raise WebUIRejected(f"persistent id {saved_id!r} is not a storage")
        return _TensorStub()

    def find_class(self, module, name):
        found = _allowed_global(module, name)
        if found is None:
            raise WebUIRejected(f"global '{module}/{name}' is forbidden")
        return found


def _scan_pickle(path: Path) -> None:
    """The WebUI's ``check_pt``: raise ``WebUIRejected`` where the WebUI refuses the file."""
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        with open(path, "rb") as f:
            unpickler = _RestrictedUnpickler(f)
            for index in range(LEGACY_PICKLE_COUNT):
                try:
                    unpickler.load()
                except WebUIRejected:
                    raise
                except Exception as exc:
                    raise WebUIRejected(f"{path}: legacy pickle {index + 1} of 5 unreadable: {exc}") from exc
        return
    with archive:
        names = archive.namelist()
        for name in names:
            if not ALLOWED_ZIP_NAME.match(name):
                raise WebUIRejected(f"bad file inside {path}: {name}")
        data_pkls = [name for name in names if DATA_PKL_NAME.match(name)]
        if len(data_pkls) != 1:
            raise WebUIRejected(f"{path}: expected one data.pkl, found {len(data_pkls)}")
        with archive.open(data_pkls[0]) as f:
            try:
                _RestrictedUnpickler(f).load()
            except WebUIRejected:
                raise
            except Exception as exc:
                raise WebUIRejected(f"{path}: data.pkl unreadable: {exc}") from exc


def _check_vectors(value, path: Path, allow_1d: bool) -> None:
    if type(value) is not torch.Tensor:
        raise WebUIRejected(f"{path}: embedding is a {type(value).__name__}, not a plain torch.Tensor")
    if value.dim() != 2 and not (allow_1d and value.dim() == 1):
        raise WebUIRejected(f"{path}: embedding has shape {tuple(value.shape)}, not [n, dim]")


def assert_webui_loadable(path: str | Path) -> None:
    """Raise ``WebUIRejected`` unless the WebUI would load ``path`` as a one-concept embedding."""
    path = Path(path)
    ext = path.suffix.lower()
    if ext not in WEBUI_EXTENSIONS:
        raise WebUIRejected(f"{path}: the WebUI only loads embeddings named {', '.join(WEBUI_EXTENSIONS)}")
    if ext == ".safetensors":
        data = safetensors.torch.load_file(str(path), device="cpu")
        if len(data) != 1:
            raise WebUIRejected(f"{path}: {len(data)} tensors; the WebUI needs exactly one")
        _check_vectors(next(iter(data.values())), path, allow_1d=True)
        return

    _scan_pickle(path)
    data = torch.load(str(path), map_location="cpu", weights_only=True)
    if type(data) is not dict:
        raise WebUIRejected(f"{path}: top level is a {type(data).__name__}, not a plain dict")
    if "string_to_param" not in data:
        raise WebUIRejected(f"{path}: no 'string_to_param' entry")
    params = data["string_to_param"]
    if type(params) is not dict:
        raise WebUIRejected(f"{path}: 'string_to_param' is a {type(params).__name__}, not a plain dict")
    if len(params) != 1:
        raise WebUIRejected(f"{path}: embedding file has multiple terms in it ({len(params)})")
    _check_vectors(next(iter(params.values())), path, allow_1d=False)
