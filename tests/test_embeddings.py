"""Embedding files: every layout in, WebUI/kohya layouts out, safely and atomically."""

from __future__ import annotations

import base64
import datetime
import json
import os
import zlib

import numpy as np
import pytest
import safetensors
import safetensors.torch
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from webui_rules import WebUIRejected, assert_webui_loadable

from library.embeddings import formats as embeddings
from library.embeddings.formats import (
    LoadedEmbedding,
    check_embedding_fits,
    load_embedding_file,
    sai_model_spec_metadata,
    save_embedding,
)
from library.errors import UserError
from library.models.family import SD1, SD2
from library.text.tokenizer import shipped_tokenizer

DIM = 8


@pytest.fixture
def vectors() -> torch.Tensor:
    return torch.randn(3, DIM, generator=torch.Generator().manual_seed(0))


def _save(path, vectors, **kwargs):
    options = {"step": 100, "checkpoint_name": "model.safetensors", "metadata": None}
    options.update(kwargs)
    save_embedding(path, vectors, "mychar", **options)


def _webui_dict(tensor: torch.Tensor, name: str = "mychar") -> dict:
    return {
        "string_to_token": {"*": 265},
        "string_to_param": {"*": tensor},
        "name": name,
        "step": 7,
        "sd_checkpoint": "abc123",
        "sd_checkpoint_name": "v1-5",
    }


# ---------------------------------------------------------------------------------------------
# What we write, read back


def test_safetensors_round_trip_is_kohya_layout_with_metadata(tmp_path, vectors):
    path = tmp_path / "mychar.safetensors"
    _save(path, vectors, metadata={"ss_note": "hello", "modelspec.title": "My char"})

    assert safetensors.torch.load_file(str(path)).keys() == {"emb_params"}
    with safetensors.safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"ss_note": "hello", "modelspec.title": "My char"}
    emb = load_embedding_file(path)
    assert emb.layout == "kohya"
    assert emb.word == "mychar"
    assert emb.metadata["ss_note"] == "hello"
    torch.testing.assert_close(emb.vectors, vectors)


@pytest.mark.parametrize("ext", [".pt", ".ckpt"])
def test_pt_round_trip_is_webui_layout(tmp_path, vectors, ext):
    path = tmp_path / f"mychar{ext}"
    _save(path, vectors)

    raw = torch.load(str(path), weights_only=True)
    assert type(raw) is dict
    assert raw["string_to_token"] == {"*": 265}
    assert raw["name"] == "mychar" and raw["step"] == 100
    assert raw["sd_checkpoint"] is None and raw["sd_checkpoint_name"] == "model.safetensors"
    assert type(raw["string_to_param"]["*"]) is torch.Tensor
    emb = load_embedding_file(path)
    assert (emb.layout, emb.word, emb.metadata["step"]) == ("webui", "mychar", 100)
    torch.testing.assert_close(emb.vectors, vectors)


def test_saved_pt_is_legacy_format_not_zip(tmp_path, vectors):
    import zipfile

    path = tmp_path / "mychar.pt"
    _save(path, vectors)
    assert not zipfile.is_zipfile(path)


def test_save_normalises_parameter_view_and_dtype(tmp_path):
    matrix = torch.nn.Parameter(torch.randn(2000, DIM))
    rows = matrix[5:7]  # a view into a big storage: torch.save would write the whole matrix
    path = tmp_path / "rows.pt"
    _save(path, rows, dtype=torch.float16)

    raw = torch.load(str(path), weights_only=True)["string_to_param"]["*"]
    assert type(raw) is torch.Tensor and not raw.requires_grad
    assert raw.dtype == torch.float16 and raw.shape == (2, DIM)
    assert path.stat().st_size < 4096  # only the two rows were written
    emb = load_embedding_file(path)
    assert emb.vectors.dtype == torch.float32
    torch.testing.assert_close(emb.vectors, rows.detach(), atol=1e-2, rtol=1e-2)


def test_save_one_vector_writes_2d(tmp_path):
    path = tmp_path / "one.safetensors"
    _save(path, torch.ones(DIM))
    assert safetensors.torch.load_file(str(path))["emb_params"].shape == (1, DIM)


def test_save_rejects_unknown_extension_and_bad_metadata(tmp_path, vectors):
    with pytest.raises(UserError, match=r"mychar\.bin.*\.safetensors, \.pt or \.ckpt"):
        _save(tmp_path / "mychar.bin", vectors)
    with pytest.raises(ValueError, match="str to str"):
        _save(tmp_path / "mychar.safetensors", vectors, metadata={"steps": 5})


# ---------------------------------------------------------------------------------------------
# Atomic writes


@pytest.mark.parametrize(
    ("name", "target"),
    [("mychar.pt", (torch, "save")), ("mychar.safetensors", (safetensors.torch, "save"))],
)
def test_failed_save_keeps_old_file_and_removes_temp(tmp_path, vectors, monkeypatch, name, target):
    path = tmp_path / name
    _save(path, vectors)
    before = path.read_bytes()

    def explode(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(*target, explode)
    with pytest.raises(RuntimeError, match="disk on fire"):
        _save(path, vectors * 2)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == [name]


def test_save_into_missing_folder_is_user_error(tmp_path, vectors):
    with pytest.raises(UserError, match="cannot write .*missing"):
        _save(tmp_path / "missing" / "mychar.pt", vectors)


def test_saved_file_has_normal_permissions(tmp_path, vectors):
    path = tmp_path / "mychar.pt"
    _save(path, vectors)
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


# ---------------------------------------------------------------------------------------------
# Layouts written by other tools


def test_kohya_pt_written_with_plain_torch_save(tmp_path, vectors):
    path = tmp_path / "kohya.pt"
    torch.save({"emb_params": vectors}, path)
    emb = load_embedding_file(path)
    assert (emb.layout, emb.word) == ("kohya", "kohya")
    torch.testing.assert_close(emb.vectors, vectors)


def test_diffusers_bin_one_dimensional_vector_becomes_2d(tmp_path):
    path = tmp_path / "learned_embeds.bin"
    vector = torch.arange(DIM, dtype=torch.float16)
    torch.save({"<cat-toy>": vector}, path)
    emb = load_embedding_file(path)
    assert emb.layout == "diffusers"
    assert emb.metadata["token"] == "<cat-toy>"
    assert emb.vectors.shape == (1, DIM) and emb.vectors.dtype == torch.float32
    torch.testing.assert_close(emb.vectors[0], vector.float())


def test_diffusers_safetensors_multi_vector(tmp_path, vectors):
    path = tmp_path / "learned_embeds.safetensors"
    safetensors.torch.save_file({"<sks>": vectors}, str(path))
    emb = load_embedding_file(path)
    assert emb.layout == "diffusers" and emb.num_vectors == 3
    torch.testing.assert_close(emb.vectors, vectors)


def test_webui_pt_with_parameter_dict_from_old_versions(tmp_path, vectors):
    path = tmp_path / "old.pt"
    state = _webui_dict(vectors)
    state["string_to_param"] = torch.nn.ParameterDict({"*": torch.nn.Parameter(vectors)})
    torch.save(state, path)
    emb = load_embedding_file(path)
    assert (emb.layout, emb.word, emb.metadata["sd_checkpoint"]) == ("webui", "old", "abc123")
    assert type(emb.vectors) is torch.Tensor and not emb.vectors.requires_grad
    torch.testing.assert_close(emb.vectors, vectors)


def test_sdxl_pair(tmp_path):
    path = tmp_path / "xl.safetensors"
    safetensors.torch.save_file({"clip_l": torch.ones(2, 768), "clip_g": torch.zeros(2, 1280)}, str(path))
    emb = load_embedding_file(path)
    assert emb.layout == "sdxl"
    assert emb.vectors.shape == (2, 768 + 1280)
    assert emb.vectors[:, :768].eq(1).all() and emb.vectors[:, 768:].eq(0).all()


def test_sdxl_pair_with_mismatched_counts_is_refused(tmp_path):
    path = tmp_path / "xl.safetensors"
    safetensors.torch.save_file({"clip_l": torch.ones(2, 768), "clip_g": torch.zeros(3, 1280)}, str(path))
    with pytest.raises(UserError, match="xl.safetensors: SDXL embedding with 2 'clip_l' vectors but 3"):
        load_embedding_file(path)


# --- WebUI images -----------------------------------------------------------------------------


def _json_with_tensors(obj) -> str:
    def encode(value):
        if isinstance(value, torch.Tensor):
            return {"TORCHTENSOR": value.tolist()}
        raise TypeError(type(value))

    return json.dumps(obj, default=encode)


def _naive_webui_mask(count: int) -> np.ndarray:
    values, seed = [], 0
    for _ in range(count):
        seed = (1664525 * seed + 1013904223) % 2**32
        values.append((seed % 255) & 0x0F)
    return np.array(values, dtype=np.uint8)


def _hide_in_pixels(state: dict, height: int = 24, picture_width: int = 10) -> Image.Image:
    """Encode like the WebUI: nibble blocks left and right of a picture, split by black columns."""
    payload = np.frombuffer(zlib.compress(_json_with_tensors(state).encode(), 9), dtype=np.uint8)
    columns = -(-payload.size // (height * 3))
    payload = np.resize(payload, columns * height * 3).reshape(height, columns, 3)  # repeats the data
    blocks = []
    for nibbles in (payload & 0x0F, payload >> 4):
        hidden = nibbles ^ _naive_webui_mask(nibbles.size).reshape(nibbles.shape)
        blocks.append(hidden | 0x10)  # a decorative high nibble keeps data pixels from being black
    picture = np.full((height, picture_width, 3), 0x88, dtype=np.uint8)
    black = np.zeros((height, 1, 3), dtype=np.uint8)
    body = np.concatenate([blocks[0], black, picture, black, blocks[1]], axis=1)
    framed = np.zeros((height + 4, body.shape[1] + 4, 3), dtype=np.uint8)  # and a black border
    framed[2:-2, 2:-2] = body
    return Image.fromarray(framed, mode="RGB")


def test_webui_png_text_chunk_uses_embedded_name(tmp_path, vectors):
    path = tmp_path / "mychar-500.png"
    info = PngInfo()
    info.add_text("sd-ti-embedding", base64.b64encode(_json_with_tensors(_webui_dict(vectors)).encode()))
    Image.new("RGB", (4, 4), (200, 10, 10)).save(path, pnginfo=info)

    emb = load_embedding_file(path)
    assert (emb.layout, emb.word, emb.metadata["file_stem"]) == ("webui-image", "mychar", "mychar-500")
    torch.testing.assert_close(emb.vectors, vectors)


@pytest.mark.parametrize(("ext", "options"), [(".png", {}), (".webp", {"lossless": True})])
def test_webui_image_with_data_in_pixels(tmp_path, ext, options):
    small = torch.linspace(-1, 1, 2 * DIM).reshape(2, DIM)
    path = tmp_path / f"hidden{ext}"
    _hide_in_pixels(_webui_dict(small, name="pixie")).save(path, **options)

    emb = load_embedding_file(path)
    assert (emb.layout, emb.word) == ("webui-image", "pixie")
    torch.testing.assert_close(emb.vectors, small)


def test_lcg_mask_matches_webui_sequence():
    reference = [253, 242, 127, 44, 157, 27, 239, 133, 38, 79, 167, 4, 177]  # WebUI's own test values
    assert embeddings._lcg_mask(len(reference)).tolist() == [v & 0x0F for v in reference]
    assert np.array_equal(embeddings._lcg_mask(9000), _naive_webui_mask(9000))


def test_plain_image_is_refused(tmp_path):
    path = tmp_path / "photo.png"
    Image.new("RGB", (16, 16), (120, 130, 140)).save(path)
    with pytest.raises(UserError, match="photo.png: this image holds no embedding"):
        load_embedding_file(path)


def test_damaged_text_chunk_is_user_error(tmp_path):
    path = tmp_path / "broken.png"
    info = PngInfo()
    info.add_text("sd-ti-embedding", "bm90IGpzb24=")  # base64 of "not json"
    Image.new("RGB", (4, 4)).save(path, pnginfo=info)
    with pytest.raises(UserError, match="broken.png: the 'sd-ti-embedding' data in this image is damaged"):
        load_embedding_file(path)


# ---------------------------------------------------------------------------------------------
# Untrusted and broken files


class _RunsCommand:
    """Unpickling this calls os.system: what a malicious embedding does."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def _keep_only_webui_zip_entries(path) -> None:
    """Drop the entries recent torch adds, so that the WebUI's scan reaches data.pkl."""
    import zipfile

    with zipfile.ZipFile(path) as source:
        entries = {name: source.read(name) for name in source.namelist()}
    with zipfile.ZipFile(path, "w") as target:
        for name, content in entries.items():
            if not name.endswith((".format_version", ".storage_alignment")):
                target.writestr(name, content)


@pytest.mark.parametrize("zip_format", [True, False])
def test_pickle_with_code_is_refused_and_never_run(tmp_path, zip_format):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    state = {"string_to_param": {"*": _RunsCommand(f"touch {marker}")}}
    torch.save(state, path, _use_new_zipfile_serialization=zip_format)
    if zip_format:
        _keep_only_webui_zip_entries(path)

    with pytest.raises(UserError, match=r"refusing to load .*evil\.pt: it contains pickled code.*system"):
        load_embedding_file(path)
    assert not marker.exists()
    with pytest.raises(WebUIRejected, match="forbidden"):  # the WebUI's scan refuses it too
        assert_webui_loadable(path)
    assert not marker.exists()


def test_raw_pickle_with_code_is_refused_and_never_run(tmp_path):
    import pickle

    marker = tmp_path / "pwned"
    path = tmp_path / "evil.bin"
    path.write_bytes(pickle.dumps(_RunsCommand(f"touch {marker}"), protocol=2))
    with pytest.raises(UserError, match=r"evil\.bin"):
        load_embedding_file(path)
    assert not marker.exists()


def _write(path, content: bytes):
    path.write_bytes(content)
    return path


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        (
            "garbage.pt",
            b"definitely not a pickle",
            "garbage.pt: cannot read this file as a PyTorch embedding",
        ),
        ("trunc.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{", "trunc.safetensors: not a readable"),
        ("empty.pt", b"", "empty.pt: the file is empty"),
        ("notes.txt", b"hello", "notes.txt: unknown embedding file type '.txt'"),
        ("fake.png", b"not really a png", "fake.png: cannot read this image"),
    ],
)
def test_unreadable_files_are_one_line_user_errors(tmp_path, name, content, message):
    with pytest.raises(UserError, match=message) as caught:
        load_embedding_file(_write(tmp_path / name, content))
    assert "\n" not in str(caught.value)


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="nothere.pt: embedding file not found"):
        load_embedding_file(tmp_path / "nothere.pt")


@pytest.mark.parametrize(
    ("state", "message"),
    [
        (
            {"a": torch.ones(1, DIM), "b": torch.ones(1, DIM)},
            "not a textual inversion embedding \\(keys: a, b\\)",
        ),
        ({"string_to_param": {"*": torch.ones(1, DIM), "x": torch.ones(1, DIM)}}, "holds 2 concepts"),
        ({"emb_params": torch.full((1, DIM), float("nan"))}, "NaN or infinite"),
        ({"emb_params": torch.ones(1, 2, DIM)}, r"shape \(1, 2, 8\)"),
        ({"emb_params": torch.ones(2, DIM, dtype=torch.int64)}, "torch.int64"),
        ({"emb_params": "text"}, "'emb_params' is a str, not a tensor"),
        ([torch.ones(1, DIM)], "the file holds a list"),
    ],
)
def test_files_that_are_not_embeddings(tmp_path, state, message):
    path = tmp_path / "odd.pt"
    torch.save(state, path)
    with pytest.raises(UserError, match=f"odd.pt: .*{message}"):
        load_embedding_file(path)


def test_huge_file_is_refused_without_loading(tmp_path, monkeypatch):
    path = _write(tmp_path / "model.safetensors", b"x" * 2048)
    monkeypatch.setattr(embeddings, "MAX_EMBEDDING_FILE_BYTES", 1024)
    with pytest.raises(UserError, match="model.safetensors: .*too large for an embedding"):
        load_embedding_file(path)


# ---------------------------------------------------------------------------------------------
# Fitting a model


def _emb(n: int, dim: int, layout: str = "kohya") -> LoadedEmbedding:
    return LoadedEmbedding(vectors=torch.zeros(n, dim), word="x", layout=layout)


def test_sd1_embedding_on_sd2_model_names_both_sides():
    with pytest.raises(UserError) as caught:
        check_embedding_fits(_emb(1, 768), 1024, "sd2", "x.pt")
    assert str(caught.value) == (
        "x.pt: embedding has dimension 768 (SD 1.x) but the model's text encoder is 1024 (SD 2.x); "
        "use an embedding trained for SD 2.x"
    )


def test_sd2_embedding_on_sd1_model():
    with pytest.raises(UserError, match=r"y.safetensors: .*1024 \(SD 2.x\).* 768 \(SD 1.x\).*SD 1.x$"):
        check_embedding_fits(_emb(2, 1024), 768, "sd1", "y.safetensors")


def test_sdxl_pair_on_sd1_model():
    with pytest.raises(UserError) as caught:
        check_embedding_fits(_emb(1, 2048, layout="sdxl"), 768, "sd1", "xl.safetensors")
    assert str(caught.value) == (
        "xl.safetensors: embedding is an SDXL (768 + 1280) pair but the model's text encoder is 768 (SD 1.x); "
        "use an embedding trained for SD 1.x"
    )


def test_too_many_vectors():
    with pytest.raises(UserError, match="big.pt: embedding has 76 vectors but a prompt chunk holds only 75"):
        check_embedding_fits(_emb(76, 768), 768, "sd1", "big.pt")


def test_fitting_embedding_passes():
    check_embedding_fits(_emb(75, 768), 768, "sd1", "ok.pt")
    check_embedding_fits(_emb(1, 16), 16, "sd1", "tiny.pt")  # tiny test models have small widths


# ---------------------------------------------------------------------------------------------
# SAI model spec metadata


def test_modelspec_for_sd1():
    meta = sai_model_spec_metadata(
        architecture=SD1.architecture(False),
        v_parameterization=False,
        resolution=(512, 512),
        title="mychar",
        clip_skip=None,
        extra={},
    )
    assert meta["modelspec.sai_model_spec"] == "1.0.1"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/textual-inversion"
    assert meta["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    assert meta["modelspec.title"] == "mychar"
    assert meta["modelspec.resolution"] == "512x512"
    assert meta["modelspec.prediction_type"] == "epsilon"
    assert "modelspec.encoder_layer" not in meta
    date = datetime.datetime.fromisoformat(meta["modelspec.date"])
    assert abs((datetime.datetime.now() - date).total_seconds()) < 60
    assert all(isinstance(v, str) for v in meta.values())


@pytest.mark.parametrize(
    ("v_param", "architecture", "prediction"),
    [
        (False, "stable-diffusion-v2-512/textual-inversion", "epsilon"),
        (True, "stable-diffusion-v2-768-v/textual-inversion", "v"),
    ],
)
def test_modelspec_for_sd2(v_param, architecture, prediction):
    meta = sai_model_spec_metadata(
        architecture=SD2.architecture(v_param),
        v_parameterization=v_param,
        resolution=(768, 640),
        title="t",
        clip_skip=2,
        extra={},
    )
    assert meta["modelspec.architecture"] == architecture
    assert meta["modelspec.prediction_type"] == prediction
    assert meta["modelspec.resolution"] == "768x640"
    assert meta["modelspec.encoder_layer"] == "2"


def test_modelspec_extra_keys_and_thumbnail(tmp_path, caplog):
    thumb = tmp_path / "thumb.png"
    Image.new("RGB", (2, 2)).save(thumb)
    meta = sai_model_spec_metadata(
        architecture=SD1.architecture(False),
        v_parameterization=False,
        resolution=(512, 512),
        title="default",
        clip_skip=None,
        extra={
            "metadata_author": "me",
            "license": "CreativeML",
            "modelspec.tags": "a,b",
            "usage_hint": "say mychar",
            "title": "Better title",
            "description": None,
            "thumbnail": str(thumb),
        },
    )
    assert meta["modelspec.author"] == "me"
    assert meta["modelspec.license"] == "CreativeML"
    assert meta["modelspec.tags"] == "a,b"
    assert meta["modelspec.usage_hint"] == "say mychar"
    assert meta["modelspec.title"] == "Better title"
    assert "modelspec.description" not in meta
    assert meta["modelspec.thumbnail"].startswith("data:image/png;base64,")

    missing = sai_model_spec_metadata(
        architecture=SD1.architecture(False),
        v_parameterization=False,
        resolution=(512, 512),
        title="t",
        clip_skip=None,
        extra={"thumbnail": str(tmp_path / "nope.png")},
    )
    assert "modelspec.thumbnail" not in missing
    assert "--metadata_thumbnail" in caplog.text


# ---------------------------------------------------------------------------------------------
# The WebUI's acceptance rules


def test_our_pt_passes_webui_rules(tmp_path, vectors):
    path = tmp_path / "mychar.pt"
    _save(path, vectors)
    assert_webui_loadable(path)
    _save(path, vectors, dtype=torch.float16)
    assert_webui_loadable(path)


def test_our_safetensors_passes_webui_rules(tmp_path, vectors):
    path = tmp_path / "mychar.safetensors"
    _save(path, vectors, metadata={"modelspec.title": "x"})
    assert_webui_loadable(path)


def test_plain_torch_save_fails_webui_rules(tmp_path, vectors):
    path = tmp_path / "plain.pt"
    torch.save(_webui_dict(vectors), path)  # torch's zip format with .format_version inside
    with pytest.raises(WebUIRejected, match=r"bad file inside .*plain/\.(format_version|storage_alignment)"):
        assert_webui_loadable(path)


def test_webui_rules_reject_parameter_and_ckpt(tmp_path, vectors):
    path = tmp_path / "param.pt"
    torch.save(_webui_dict(torch.nn.Parameter(vectors)), path, _use_new_zipfile_serialization=False)
    with pytest.raises(WebUIRejected, match="Parameter, not a plain torch.Tensor"):
        assert_webui_loadable(path)
    ckpt = tmp_path / "mychar.ckpt"
    _save(ckpt, vectors)
    with pytest.raises(WebUIRejected, match="only loads embeddings named"):
        assert_webui_loadable(ckpt)


# ---------------------------------------------------------------------------------------------
# diffusers loads what we write


def _tiny_text_encoder(dim: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=dim,
        intermediate_size=2 * dim,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=77,
    )
    return CLIPTextModel(config)


class _DiffusersLoader:
    """The smallest object diffusers' TextualInversionLoaderMixin works on."""

    def __init__(self, dim: int) -> None:
        from diffusers.loaders import TextualInversionLoaderMixin

        self.mixin = type(
            "Holder",
            (TextualInversionLoaderMixin,),
            {"hf_device_map": None, "components": property(lambda s: {"text_encoder": s.text_encoder})},
        )()
        self.mixin.tokenizer = shipped_tokenizer(False)
        self.mixin.text_encoder = _tiny_text_encoder(dim)

    def row(self, token: str) -> torch.Tensor:
        token_id = self.mixin.tokenizer.convert_tokens_to_ids(token)
        return self.mixin.text_encoder.get_input_embeddings().weight[token_id].detach()


@pytest.mark.parametrize("ext", [".pt", ".safetensors"])
def test_diffusers_loads_our_files(tmp_path, vectors, ext):
    path = tmp_path / f"mychar{ext}"
    _save(path, vectors)
    loader = _DiffusersLoader(DIM)
    loader.mixin.load_textual_inversion(str(path), token="mychar")
    torch.testing.assert_close(loader.row("mychar"), vectors[0])
    torch.testing.assert_close(loader.row("mychar_2"), vectors[2])


def test_diffusers_takes_the_name_from_our_pt(tmp_path, vectors):
    path = tmp_path / "file-name.pt"
    _save(path, vectors)
    loader = _DiffusersLoader(DIM)
    loader.mixin.load_textual_inversion(str(path))  # no token: diffusers uses the "name" entry
    torch.testing.assert_close(loader.row("mychar_1"), vectors[1])


@pytest.mark.parametrize("ext", [".pt", ".safetensors"])
def test_diffusers_pipeline_loads_our_files(request, tmp_path, ext):
    try:
        model_dir = request.getfixturevalue("tiny_sd1_dir")
    except pytest.FixtureLookupError:
        pytest.skip("tests/conftest.py has no tiny_sd1_dir fixture yet")
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        str(model_dir), safety_checker=None, requires_safety_checker=False, local_files_only=True
    )
    dim = pipe.text_encoder.get_input_embeddings().weight.shape[1]
    vectors = torch.randn(2, dim)
    path = tmp_path / f"mychar{ext}"
    _save(path, vectors)
    pipe.load_textual_inversion(str(path), token="mychar")
    token_id = pipe.tokenizer.convert_tokens_to_ids("mychar_1")
    torch.testing.assert_close(pipe.text_encoder.get_input_embeddings().weight[token_id].detach(), vectors[1])
