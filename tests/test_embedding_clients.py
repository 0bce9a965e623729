"""Every embedding file the trainer can write, read the way each of seven clients reads it.

The trainer writes through ``library.embeddings.formats.save_embedding`` with the dtype of
``--save_precision``; here every combination of extension (``--save_model_as``), precision,
model family width and vector count goes through the same writer, then through each client's
loading rules (``client_rules.py``). A client that skips the extension must skip it (the WebUI
family and SD.Next do not read ``.ckpt`` embeddings); every other client must get the vectors
back exactly, under the file name's word.
"""

from __future__ import annotations

import pytest
import torch
from client_rules import CLIENTS, READS_EXTENSION, NotLoaded, load_diffusers

from library.embeddings.formats import sai_model_spec_metadata, save_embedding
from library.models.family import SD1, SD2

PRECISIONS = {"float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def write_like_the_trainer(path, n: int, dim: int, dtype: torch.dtype) -> torch.Tensor:
    vectors = torch.randn(n, dim, generator=torch.Generator().manual_seed(n * dim)) * 0.02
    metadata = sai_model_spec_metadata(
        architecture=(SD2 if dim == 1024 else SD1).architecture(False),
        v_parameterization=False,
        resolution=(512, 512),
        title=path.stem,
        clip_skip=None,
        extra={},
    )
    save_embedding(
        path, vectors, path.stem, step=10, checkpoint_name="model.safetensors", metadata=metadata, dtype=dtype
    )
    return vectors.to(dtype).float()


@pytest.mark.parametrize("n", [1, 8])
@pytest.mark.parametrize("dim", [768, 1024])
@pytest.mark.parametrize("precision", list(PRECISIONS))
@pytest.mark.parametrize("ext", [".safetensors", ".pt", ".ckpt"])
def test_every_client_reads_what_the_trainer_writes(tmp_path, ext, precision, dim, n):
    path = tmp_path / f"mychar4{ext}"
    expected = write_like_the_trainer(path, n, dim, PRECISIONS[precision])
    for client, load in CLIENTS.items():
        if ext not in READS_EXTENSION[client]:
            with pytest.raises(NotLoaded):
                load(path, dim)
            continue
        loaded = load(path, dim)
        assert torch.equal(loaded.vectors, expected), client
        assert loaded.words[0].strip("<>").removeprefix("embedding:") == "mychar4", client
        if client not in ("ComfyUI", "InvokeAI"):  # these add one name for the whole embedding
            assert len(loaded.words) == n, client


@pytest.mark.parametrize("ext", [".safetensors", ".pt"])
def test_a_model_of_the_other_family_is_refused_by_every_client(tmp_path, ext):
    path = tmp_path / f"mychar4{ext}"
    write_like_the_trainer(path, 2, 768, torch.float32)
    for client, load in CLIENTS.items():
        with pytest.raises(NotLoaded):
            load(path, 1024)
            print(client, "loaded it")


def test_diffusers_without_token_takes_the_key_or_the_name(tmp_path):
    """Why docs/embeddings.md tells diffusers users to pass token=: a kohya file's only key is emb_params."""
    safetensors_file, pt_file = tmp_path / "mychar4.safetensors", tmp_path / "mychar4.pt"
    write_like_the_trainer(safetensors_file, 2, 768, torch.float32)
    write_like_the_trainer(pt_file, 2, 768, torch.float32)
    assert load_diffusers(safetensors_file, 768).words == ["emb_params", "emb_params_1"]
    assert load_diffusers(pt_file, 768).words == ["mychar4", "mychar4_1"]  # the WebUI dict's name


def test_the_rules_catch_what_clients_refuse(tmp_path):
    """The rules are not vacuous: files the clients reject are rejected here too."""
    from client_rules import load_a1111, load_invokeai, load_kohya

    plain = tmp_path / "zipped.pt"
    torch.save({"string_to_param": {"*": torch.zeros(1, 768)}, "name": "zipped"}, plain)
    with pytest.raises(NotLoaded, match="bad file inside"):
        load_a1111(plain, 768)  # torch's new zip format fails the WebUI's scan
    diffusers_style = tmp_path / "tok.pt"
    torch.save({"tok": torch.zeros(3, 768)}, diffusers_style, _use_new_zipfile_serialization=False)
    with pytest.raises(NotLoaded, match="probe"):
        load_invokeai(diffusers_style, 768)  # InvokeAI's probe reads shape[0] = 3
    one_d = tmp_path / "flat.pt"
    torch.save({"tok": torch.zeros(768)}, one_d, _use_new_zipfile_serialization=False)
    with pytest.raises(NotLoaded, match="1-D"):
        load_kohya(one_d, 768)
