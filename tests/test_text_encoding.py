"""Tokenizer (shipped, offline) and kohya's text encoding: clip_skip and long-prompt chunks."""

from __future__ import annotations

import pytest
import torch

from library.models.loading import load_sd_model
from library.text.encoding import encode_prompts, tokenize_prompts
from library.text.tokenizer import KOHYA_CACHE_NAMES, load_tokenizer, shipped_tokenizer


def test_shipped_tokenizer_matches_clip_ids():
    tokenizer = shipped_tokenizer(v2=False)
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert len(tokenizer) == 49408


def test_sd2_tokenizer_pads_with_exclamation_mark():
    tokenizer = shipped_tokenizer(v2=True)
    ids = tokenizer("a cat", padding="max_length", max_length=77).input_ids
    assert ids[:4] == [49406, 320, 2368, 49407]
    assert ids[4:] == [0] * 73


def test_tokenizer_cache_dir_is_written_in_kohya_layout_and_reused(tmp_path):
    tokenizer = load_tokenizer(v2=False, tokenizer_cache_dir=tmp_path)
    cached = tmp_path / KOHYA_CACHE_NAMES[False]
    assert (cached / "tokenizer_config.json").is_file()
    # the slow tokenizer of transformers 4 (kohya's scripts) needs these to read the same cache
    assert (cached / "vocab.json").is_file() and (cached / "merges.txt").is_file()
    again = load_tokenizer(v2=False, tokenizer_cache_dir=tmp_path)
    assert again("a photo of a cat").input_ids == tokenizer("a photo of a cat").input_ids
    assert sorted(p.name for p in tmp_path.iterdir()) == [cached.name]  # no temporary left beside it


def test_a_tokenizer_cache_dir_that_cannot_be_a_folder_is_one_line(tiny_sd1_safetensors, tmp_path):
    """Checked when the tokenizer is read, before the model (it was a NotADirectoryError traceback)."""
    from cli_helpers import common, error_line, make_images, run_train

    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    make_images(tmp_path / "data" / "1_mychar4 toy", 1, caption="a photo of mychar4")
    result = run_train(
        *common(tmp_path / "data", tmp_path / "o", tiny_sd1_safetensors),
        "--token_string=mychar4",
        f"--tokenizer_cache_dir={a_file}",
        check=False,
    )
    assert (
        error_line(result)
        == f"error: --tokenizer_cache_dir {a_file}: this is a file, not a folder; give a folder path"
    )


def test_diffusers_folder_tokenizer_wins(tiny_sd1_dir, tmp_path):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny_sd1_dir, folder)
    custom = shipped_tokenizer(False)
    custom.add_tokens(["zzqxtoken"])  # a folder whose tokenizer knows one more word
    custom.save_pretrained(str(folder / "tokenizer"))
    tokenizer = load_tokenizer(v2=False, model_dir=folder)
    assert tokenizer.convert_tokens_to_ids("zzqxtoken") == 49408


@pytest.mark.parametrize("max_len,chunks", [(None, 1), (150, 2), (225, 3)])
def test_tokenize_prompts_shapes(max_len, chunks):
    ids = tokenize_prompts(shipped_tokenizer(False), ["a photo of a cat", "dog"], max_len)
    assert ids.shape == (2, chunks, 77)
    assert (ids[:, :, 0] == 49406).all() and (ids[:, :, -1] == 49407).all()


def test_long_prompt_continues_in_the_second_chunk():
    tokenizer = shipped_tokenizer(False)
    words = " ".join(["cat"] * 80)  # 80 tokens: 75 in the first window, 5 in the second
    ids = tokenize_prompts(tokenizer, [words], 150)
    assert (ids[0, 0, 1:76] == 2368).all()
    assert (ids[0, 1, 1:6] == 2368).all() and ids[0, 1, 6] == 49407


def test_sd2_empty_chunk_reads_bos_eos_pad():
    ids = tokenize_prompts(shipped_tokenizer(True), ["a cat"], 150)
    assert ids[0, 1, :3].tolist() == [49406, 49407, 0]
    assert ids[0, 0, -1] == 0  # text ended early: the window closes with PAD


@pytest.mark.parametrize("family", ["sd1", "sd2"])
@pytest.mark.parametrize("max_len,length", [(None, 77), (150, 152), (225, 227)])
def test_encoded_shapes(family, max_len, length, request):
    model = load_sd_model(request.getfixturevalue(f"tiny_{family}_safetensors"))
    ids = tokenize_prompts(model.tokenizer, ["a photo of a cat"], max_len)
    with torch.no_grad():
        states = encode_prompts(model.text_encoder, model.tokenizer, ids, clip_skip=None)
    assert states.shape == (1, length, model.text_dim)


def test_clip_skip_uses_an_earlier_layer_with_final_norm(tiny_sd1_safetensors):
    model = load_sd_model(tiny_sd1_safetensors)
    ids = tokenize_prompts(model.tokenizer, ["a photo of a cat"], None)
    with torch.no_grad():
        normal = encode_prompts(model.text_encoder, model.tokenizer, ids, clip_skip=None)
        skip1 = encode_prompts(model.text_encoder, model.tokenizer, ids, clip_skip=1)
        skip2 = encode_prompts(model.text_encoder, model.tokenizer, ids, clip_skip=2)
        hidden = model.text_encoder(ids[:, 0], output_hidden_states=True).hidden_states
    assert torch.allclose(normal, skip1)
    assert not torch.allclose(normal, skip2)
    norm = getattr(model.text_encoder, "text_model", model.text_encoder).final_layer_norm
    assert torch.allclose(skip2, norm(hidden[-2]), atol=1e-6)


def test_chunks_are_encoded_separately_and_joined(tiny_sd1_safetensors):
    model = load_sd_model(tiny_sd1_safetensors)
    ids = tokenize_prompts(model.tokenizer, [" ".join(["cat"] * 80)], 150)
    with torch.no_grad():
        joined = encode_prompts(model.text_encoder, model.tokenizer, ids)
        first = model.text_encoder(ids[:, 0])[0]
        second = model.text_encoder(ids[:, 1])[0]
    assert torch.allclose(joined[:, :76], first[:, :76])
    assert torch.allclose(joined[:, 76:151], second[:, 1:76])
    assert torch.allclose(joined[:, -1], second[:, -1])


def _encoder_batch_sizes(text_encoder) -> list[int]:
    sizes: list[int] = []
    text_encoder.register_forward_pre_hook(lambda module, args: sizes.append(args[0].shape[0]))
    return sizes


def test_repeated_captions_are_encoded_once_with_the_same_states_and_gradient(tiny_sd1_safetensors):
    from library.training.new_word import add_placeholder_tokens, splice_new_vectors

    model = load_sd_model(tiny_sd1_safetensors)
    encoder, tokenizer = model.text_encoder.requires_grad_(False), model.tokenizer
    add_placeholder_tokens([tokenizer], "zqtok", 2)
    rows = splice_new_vectors(encoder, torch.randn(2, model.text_dim))
    captions = [
        "a photo of zqtok zqtok1",
        "zqtok zqtok1 in a garden",
        "a photo of zqtok zqtok1",
        "a photo of zqtok zqtok1",
    ]
    ids = tokenize_prompts(tokenizer, captions)
    sizes = _encoder_batch_sizes(encoder)

    states = encode_prompts(encoder, tokenizer, ids)
    (states * torch.linspace(-1, 1, states.numel()).reshape(states.shape)).sum().backward()
    deduplicated_grad, rows.vectors.grad = rows.vectors.grad.clone(), None
    assert sizes == [2]  # two distinct captions

    every_row = encoder(ids[:, 0])[0]  # what encoding each caption separately gives
    (every_row * torch.linspace(-1, 1, every_row.numel()).reshape(every_row.shape)).sum().backward()
    assert torch.allclose(states, every_row, atol=1e-5)
    assert torch.allclose(deduplicated_grad, rows.vectors.grad, atol=1e-5)
    assert deduplicated_grad.abs().sum() > 0


def test_empty_long_prompt_windows_are_encoded_once(tiny_sd1_safetensors):
    model = load_sd_model(tiny_sd1_safetensors)
    ids = tokenize_prompts(model.tokenizer, ["a photo of a cat", "a dog"], 225)  # 3 windows each
    sizes = _encoder_batch_sizes(model.text_encoder)
    with torch.no_grad():
        states = encode_prompts(model.text_encoder, model.tokenizer, ids)
        separately = torch.stack([model.text_encoder(ids[:, i])[0] for i in range(3)], dim=1)
    assert sizes[0] == 3  # two first windows, one empty window shared by all four empty ones
    assert torch.allclose(states[:, :76], separately[:, 0, :76], atol=1e-5)
    assert torch.allclose(states[:, 76:151], separately[:, 1, 1:76], atol=1e-5)
    assert torch.allclose(states[:, -1], separately[:, 2, -1], atol=1e-5)


def test_dropping_the_layers_clip_skip_never_reads_gives_the_same_states(tiny_sd1_safetensors):
    from library.text.encoding import drop_unused_layers

    model = load_sd_model(tiny_sd1_safetensors)
    ids = tokenize_prompts(model.tokenizer, ["a photo of a cat", "a dog"])
    with torch.no_grad():
        expected = encode_prompts(model.text_encoder, model.tokenizer, ids, clip_skip=2)
        assert drop_unused_layers(model.text_encoder, 2) is None
        assert (
            len(
                model.text_encoder.text_model.encoder.layers
                if hasattr(model.text_encoder, "text_model")
                else model.text_encoder.encoder.layers
            )
            == 1
        )
        assert torch.equal(encode_prompts(model.text_encoder, model.tokenizer, ids, None), expected)
    assert (
        drop_unused_layers(model.text_encoder, 1) == 1
        and drop_unused_layers(model.text_encoder, None) is None
    )
