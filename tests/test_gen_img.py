"""gen_img_diffusers.py: kohya's command lines end to end on the tiny models.

A few runs go through a real subprocess (exit codes, standard input, cross-process
reproducibility); the rest call ``main(argv)`` in-process, which runs the same code without
paying for the interpreter and library imports again.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import logging
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

import gen_img_diffusers as gen_img
from library.embeddings.formats import save_embedding
from library.embeddings.install import install_embeddings
from library.errors import UserError, run_cli
from library.generation import args as generation_args
from library.models.loading import load_sd_model

ROOT = Path(__file__).resolve().parent.parent
OPTIONS_TABLE = Path(__file__).resolve().parent / "data" / "kohya-gen-img-options.tsv"
FAST = ["--W", "64", "--H", "64", "--steps", "2"]
DEFAULT_NAME = re.compile(r"im_\d{14}_(\d)?(\d{3})_(\d+)\.png")


def run_subprocess(*argv: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(ROOT / "gen_img_diffusers.py"), *argv],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )


@pytest.fixture
def run_main(monkeypatch, tmp_path_factory):
    """``main(argv)`` in this process, leaving pytest's logging set-up alone; in a folder of its own,
    so that the default ``--outdir`` (``outputs``) is not made in the repository."""
    monkeypatch.setattr(generation_args, "setup_console_logging", lambda settings: None)
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))
    return lambda *argv: gen_img.main([str(a) for a in argv])


def pngs(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.png"))


def text_of(path: Path) -> dict[str, str]:
    with Image.open(path) as image:
        return dict(image.text)


# --- embedding files in every layout ----------------------------------------------------------


def write_webui_png(path: Path, vectors: torch.Tensor, name: str) -> None:
    data = {
        "string_to_token": {"*": 265},
        "string_to_param": {"*": {"TORCHTENSOR": vectors.tolist()}},
        "name": name,
        "step": 100,
        "sd_checkpoint": None,
        "sd_checkpoint_name": None,
    }
    info = PngInfo()
    info.add_text("sd-ti-embedding", base64.b64encode(json.dumps(data).encode()).decode())
    Image.new("RGB", (16, 16), (40, 80, 120)).save(path, pnginfo=info)


def write_embedding(folder: Path, layout: str, word: str, vectors: torch.Tensor) -> Path:
    if layout == "kohya":
        path = folder / f"{word}.safetensors"
        save_embedding(path, vectors, word, step=1, checkpoint_name=None, metadata=None)
    elif layout == "webui":
        path = folder / f"{word}.pt"
        save_embedding(path, vectors, word, step=1, checkpoint_name="tiny", metadata=None)
    elif layout == "diffusers":
        path = folder / f"{word}.bin"
        torch.save({f"<{word}>": vectors[0] if len(vectors) == 1 else vectors}, path)
    else:
        path = folder / f"{word}.png"
        write_webui_png(path, vectors, name="name-inside-image")
    return path


LAYOUTS = {"kohya": 2, "webui": 1, "diffusers": 1, "png": 3}  # layout -> vectors


@pytest.fixture(scope="module")
def embeddings_sd1(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("embeddings")
    generator = torch.Generator().manual_seed(0)
    return {
        layout: write_embedding(folder, layout, f"{layout}word", torch.randn(n, 32, generator=generator))
        for layout, n in LAYOUTS.items()
    }


# --- end to end through a subprocess ----------------------------------------------------------


def test_txt2img_from_file_then_stdin_with_an_embedding_writes_reproducible_pngs_with_metadata(
    tmp_path, run_main, tiny_sd1_safetensors, embeddings_sd1
):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(
        "# a comment\n\na photo of kohyaword --n blurry --d 7\n  \na photo of kohyaword --d 8 --s 3\n"
    )
    common = [
        "--ckpt",
        str(tiny_sd1_safetensors),
        "--from_file",
        str(prompts),
        *FAST,
        "--clip_skip",
        "2",
        "--max_embeddings_multiples",
        "2",
    ]
    with_embedding = ["--textual_inversion_embeddings", str(embeddings_sd1["kohya"])]
    # one real process: the file's prompts, then --interactive ones from standard input
    log = tmp_path / "log.txt"
    logging = ["--console_log_file", str(log), "--console_log_simple", "--console_log_level", "INFO"]
    result = run_subprocess(
        *common,
        *with_embedding,
        *logging,
        "--interactive",
        "--outdir",
        str(tmp_path / "a"),
        stdin="a dog --d 4\n\n# not a prompt\n",
    )
    assert result.returncode == 0, result.stderr

    written = pngs(tmp_path / "a")
    names = {DEFAULT_NAME.fullmatch(p.name).group(3): p for p in written}  # kohya's im_<time>_000_<seed>.png
    assert len(written) == 3 and set(names) == {"7", "8", "4"}
    meta = text_of(names["7"])
    assert meta["prompt"] == "a photo of kohyaword"
    assert meta["negative-prompt"] == "blurry"
    assert (meta["seed"], meta["sampler"], meta["steps"], meta["scale"]) == ("7", "ddim", "2", "7.5")
    assert (meta["clip-skip"], meta["embeddings"], meta["size"]) == ("2", "kohyaword:2", "64x64")
    assert text_of(names["8"])["steps"] == "3"
    assert text_of(names["4"])["prompt"] == "a dog"
    assert f"saved {names['4']} (seed 4)" in log.read_text().splitlines()  # plain lines, into the file
    assert "in none of the prompts" not in log.read_text()  # --interactive: the prompts were yet to come

    run_main(*common, *with_embedding, "--outdir", tmp_path / "b")  # same settings, another process
    again = {DEFAULT_NAME.fullmatch(p.name).group(3): p for p in pngs(tmp_path / "b")}
    assert again["7"].read_bytes() == names["7"].read_bytes()

    run_main(*common, "--outdir", tmp_path / "c")  # the word is now plain text
    without = {DEFAULT_NAME.fullmatch(p.name).group(3): p for p in pngs(tmp_path / "c")}
    assert without["7"].read_bytes() != names["7"].read_bytes()


def test_an_embedding_whose_word_no_prompt_contains_is_named_before_the_model_loads(
    tmp_path, run_main, embeddings_sd1, caplog
):
    """The word is the file's name; a prompt with the word in its negative part uses it too."""
    files = [embeddings_sd1[layout] for layout in ("kohya", "webui", "diffusers")]
    argv = ["--ckpt", tmp_path / "missing.safetensors", "--prompt", "a (Kohyaword:1.2) --n webuiword, blurry"]
    with caplog.at_level(logging.WARNING), pytest.raises(UserError, match="missing.safetensors"):
        run_main(*argv, *FAST, "--outdir", tmp_path, "--textual_inversion_embeddings", *files)
    messages = [record.getMessage() for record in caplog.records]
    unused = [message for message in messages if "in none of the prompts" in message]
    assert unused == [
        "the embedding word 'diffusersword' is in none of the prompts, so it changes no image; an embedding "
        "file's word is its file name: type that, or rename the file to the word you type"
    ]


def test_interactive_reads_prompts_from_standard_input_until_end_of_input(
    tmp_path, run_main, tiny_sd1_dir, monkeypatch
):
    monkeypatch.setattr(sys, "stdin", io.StringIO("a cat --d 3\n\n# not a prompt\na dog --d 4\n"))
    run_main(
        "--ckpt",
        tiny_sd1_dir,
        "--interactive",
        "--no_preview",
        *FAST,
        "--sequential_file_name",
        "--outdir",
        tmp_path,
    )
    written = pngs(tmp_path)
    assert [p.name for p in written] == ["im_000001.png", "im_000002.png"]
    assert [(text_of(p)["prompt"], text_of(p)["seed"]) for p in written] == [("a cat", "3"), ("a dog", "4")]


def test_embedding_of_the_wrong_dimension_exits_2_with_one_line_naming_both(
    tmp_path, run_main, tiny_sd2_safetensors, embeddings_sd1, capsys
):
    argv = [
        "--ckpt",
        tiny_sd2_safetensors,
        "--prompt",
        "kohyaword",
        *FAST,
        "--outdir",
        tmp_path,
        "--textual_inversion_embeddings",
        embeddings_sd1["kohya"],
    ]
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: run_main(*argv))  # what `python gen_img_diffusers.py` runs
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("error: ") and "kohyaword.safetensors" in lines[0]
    assert "dimension 32" in lines[0] and "64 (SD 2.x)" in lines[0]
    assert pngs(tmp_path) == []


def test_a_mistake_argparse_finds_is_one_line_without_the_usage(tmp_path):
    result = run_subprocess("--ckpt", "x", "--prompt", "x", "--W", "wide", "--outdir", str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: argument --W: invalid int value: 'wide' (gen_img_diffusers.py --help lists the options)"
    )


def test_unsupported_option_exits_2_with_one_line(tmp_path, tiny_sd1_safetensors):
    result = run_subprocess(
        "--ckpt",
        str(tiny_sd1_safetensors),
        "--prompt",
        "x",
        "--network_args",
        "conv_dim=4",
        "--outdir",
        str(tmp_path),
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: --network_args: this network option is not supported by this generator yet; "
        "kohya LoRA files are applied with --network_module networks.lora --network_weights FILE"
    )


# --- embeddings -------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_embedding_layout_is_installed_under_its_file_stem(
    layout, tiny_sd1_safetensors, embeddings_sd1
):
    model = load_sd_model(tiny_sd1_safetensors)
    words = install_embeddings(model, [str(embeddings_sd1[layout])])
    stem = f"{layout}word"
    count = LAYOUTS[layout]
    assert words == {stem: count}
    names = [stem] + [f"{stem}{i}" for i in range(1, count)]
    ids = model.tokenizer.convert_tokens_to_ids(names)
    rows = model.text_encoder.get_input_embeddings().weight[ids]
    from library.embeddings.formats import load_embedding_file

    torch.testing.assert_close(rows, load_embedding_file(embeddings_sd1[layout]).vectors)
    assert model.tokenizer(f"a {stem}").input_ids[2] == ids[0]


def test_all_layouts_together_in_one_run(tmp_path, run_main, tiny_sd1_safetensors, embeddings_sd1):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"a {layout}word --d 1\n" for layout in LAYOUTS))
    files = [str(embeddings_sd1[layout]) for layout in LAYOUTS]
    run_main(
        "--ckpt",
        tiny_sd1_safetensors,
        "--from_file",
        prompts,
        *FAST,
        "--batch_size",
        "4",
        "--textual_inversion_embeddings",
        *files,
        "--outdir",
        tmp_path / "out",
    )
    written = pngs(tmp_path / "out")
    assert len(written) == 4
    assert text_of(written[0])["embeddings"] == "kohyaword:2, webuiword:1, diffusersword:1, pngword:3"
    assert len({p.read_bytes() for p in written}) == 4


def test_a_file_named_like_an_existing_token_is_refused(tmp_path, tiny_sd1_safetensors, embeddings_sd1):
    model = load_sd_model(tiny_sd1_safetensors)
    clash = write_embedding(tmp_path, "kohya", "cat", torch.ones(1, 32))
    with pytest.raises(UserError, match=r"cat.safetensors: the word 'cat' .* rename the file"):
        install_embeddings(model, [str(embeddings_sd1["kohya"]), str(clash)])


def test_two_files_giving_one_word_name_each_other(tmp_path, tiny_sd1_safetensors, embeddings_sd1):
    model = load_sd_model(tiny_sd1_safetensors)
    other = write_embedding(tmp_path, "kohya", "kohyaword", torch.ones(1, 32))
    with pytest.raises(
        UserError, match=r"kohyaword.safetensors: gives the word 'kohyaword', as .* does; rename"
    ):
        install_embeddings(model, [str(embeddings_sd1["kohya"]), str(other)])


def test_a_file_given_twice_is_loaded_once_with_a_note(tiny_sd1_safetensors, embeddings_sd1, caplog):
    model = load_sd_model(tiny_sd1_safetensors)
    path = str(embeddings_sd1["kohya"])
    with caplog.at_level(logging.INFO):
        assert install_embeddings(model, [path, path]) == {"kohyaword": 2}
    assert "given more than once" in caplog.text


def test_twenty_embeddings_at_once(tmp_path, tiny_sd1_safetensors):
    model = load_sd_model(tiny_sd1_safetensors)
    paths = [
        str(write_embedding(tmp_path, "kohya", f"zqword{i}x", torch.full((i % 3 + 1, 32), i / 100)))
        for i in range(20)
    ]
    words = install_embeddings(model, paths)
    assert len(words) == 20 and sum(words.values()) == sum(i % 3 + 1 for i in range(20))
    table = model.text_encoder.get_input_embeddings().weight
    assert torch.allclose(table[-1], torch.full((32,), 0.19))  # the last file's last row


@pytest.mark.parametrize("ext", [".safetensors", ".pt"])
def test_a_file_named_like_a_word_names_the_word_it_records_in_one_line(ext, tmp_path, tiny_sd1_safetensors):
    """kohya's old default name 'last' fires on the word "last": the error says what to rename it to."""
    path = tmp_path / f"last{ext}"
    metadata = {"modelspec.title": "mychar4"} if ext == ".safetensors" else None
    save_embedding(path, torch.ones(2, 32), "mychar4", step=1, checkpoint_name=None, metadata=metadata)
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "gen_img_diffusers.py"),
            "--ckpt",
            str(tiny_sd1_safetensors),
            "--outdir",
            str(tmp_path / "out"),
            "--prompt",
            "last",
            "--textual_inversion_embeddings",
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode == 2 and len(errors) == 1, result.stderr[-2000:]
    assert "'last' (from the file name) is already a token" in errors[0]
    assert f"records the word 'mychar4': rename it to mychar4{ext}" in errors[0]


# --- img2img, inpainting, highres fix ---------------------------------------------------------


def test_img2img_takes_the_prompt_from_the_source_png_and_keeps_its_name(
    tmp_path, run_main, tiny_sd1_safetensors
):
    run_main(
        "--ckpt",
        tiny_sd1_safetensors,
        "--prompt",
        "a red house --n ugly --d 5",
        *FAST,
        "--sequential_file_name",
        "--outdir",
        tmp_path / "src",
    )
    source = tmp_path / "src" / "im_000001.png"
    run_main(
        "--ckpt",
        tiny_sd1_safetensors,
        "--image_path",
        source,
        "--strength",
        "0.5",
        "--steps",
        "2",
        "--use_original_file_name",
        "--outdir",
        tmp_path / "out",
    )
    out = tmp_path / "out" / "im_000001.png"
    assert out.is_file() and Image.open(out).size == (64, 64)  # the source's size
    meta = text_of(out)
    assert (meta["prompt"], meta["negative-prompt"], meta["strength"]) == ("a red house", "ugly", "0.5")
    assert meta["source-image"] == "im_000001.png"


def test_inpainting_with_a_folder_of_images_and_a_mask(tmp_path, run_main, tiny_sd1_safetensors):
    images = tmp_path / "images"
    images.mkdir()
    for i, color in enumerate([(200, 30, 30), (30, 200, 30)]):
        Image.new("RGB", (80, 72), color).save(images / f"src{i}.png")
    (images / "notes.txt").write_text("not an image")
    mask = Image.new("L", (80, 72), 0)
    mask.paste(255, (0, 0, 40, 72))
    mask.save(tmp_path / "mask.png")
    run_main(
        "--ckpt",
        tiny_sd1_safetensors,
        "--image_path",
        images,
        "--mask_path",
        tmp_path / "mask.png",
        "--prompt",
        "a tree --d 9",
        "--images_per_prompt",
        "2",
        "--steps",
        "2",
        "--W",
        "64",
        "--H",
        "64",
        "--outdir",
        tmp_path / "out",
    )
    written = pngs(tmp_path / "out")
    assert len(written) == 2
    sources = sorted(text_of(p)["source-image"] for p in written)
    assert sources == ["src0.png", "src1.png"]
    assert all(text_of(p)["mask-image"] == "mask.png" and Image.open(p).size == (64, 64) for p in written)


def test_highres_fix_saves_the_first_pass_and_the_final_image(tmp_path, run_main, tiny_sd1_safetensors):
    run_main(
        "--ckpt",
        tiny_sd1_safetensors,
        "--prompt",
        "a cat --d 3",
        *FAST,
        "--highres_fix_scale",
        "0.5",
        "--highres_fix_steps",
        "2",
        "--highres_fix_save_1st",
        "--sequential_file_name",
        "--outdir",
        tmp_path,
    )
    first, final = tmp_path / "im_0000001.png", tmp_path / "im_1000001.png"
    assert Image.open(first).size == (32, 32) and Image.open(final).size == (64, 64)
    assert text_of(final)["seed"] == "3" and "scale 0.5" in text_of(final)["highres-fix"]


# --- prompts, seeds and batches ---------------------------------------------------------------


def seeds_of(folder: Path) -> list[tuple[str, int]]:
    return sorted((text_of(p)["prompt"], int(text_of(p)["seed"])) for p in pngs(folder))


def test_seed_rules_follow_kohya(tmp_path, run_main, tiny_sd1_safetensors):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("listed --d 1,2\ndrawn\n")
    run_main(
        "--ckpt",
        tiny_sd1_safetensors,
        "--from_file",
        prompts,
        "--images_per_prompt",
        "3",
        "--seed",
        "42",
        "--batch_size",
        "3",
        *FAST,
        "--outdir",
        tmp_path / "out",
    )
    rng = random.Random(42)
    drawn = [rng.randint(0, 0x7FFFFFFF) for _ in range(6)][:3]  # 6 seeds drawn up front, 3 used
    # a --d list is used in order and its last seed repeats when it runs out
    assert seeds_of(tmp_path / "out") == sorted(
        [("listed", 1), ("listed", 2), ("listed", 2)] + [("drawn", s) for s in drawn]
    )

    run_main(
        "--ckpt", tiny_sd1_safetensors, "--prompt", "one", *FAST, "--seed", "42", "--outdir", tmp_path / "one"
    )
    assert seeds_of(tmp_path / "one") == [("one", 42)]  # a single image gets --seed itself


def test_dynamic_prompts_iterations_and_same_seed_per_iteration(tmp_path, run_main, tiny_sd1):
    run_main(
        "--ckpt",
        tiny_sd1 / "model.safet*",
        "--prompt",
        "a {e$$red|blue} cat",
        "--n_iter",
        "2",
        "--iter_same_seed",
        "--batch_size",
        "2",
        *FAST,
        "--outdir",
        tmp_path,
    )
    found = seeds_of(tmp_path)
    assert [prompt for prompt, _ in found] == ["a blue cat", "a blue cat", "a red cat", "a red cat"]
    seeds = {seed for _, seed in found}
    assert len(seeds) == 2  # one seed per iteration, shared by both prompts


def test_samplers_negative_scale_and_shuffled_prompts(tmp_path, run_main, tiny_sd1_safetensors):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(
        "first --ss dpmsolver++ --d 1 --n dark --l 5 --w 32 --h 48\nsecond --d 2 --nl none --n dark\n"
    )
    run_main(
        "--ckpt",
        tiny_sd1_safetensors,
        "--from_file",
        prompts,
        "--sampler",
        "k_euler_a",
        "--negative_scale",
        "3",
        "--shuffle_prompts",
        "--seed",
        "5",
        *FAST,
        "--outdir",
        tmp_path / "out",
    )
    meta = {text_of(p)["prompt"]: text_of(p) for p in pngs(tmp_path / "out")}
    assert set(meta) == {"first", "second"}
    assert (meta["first"]["sampler"], meta["second"]["sampler"]) == ("dpmsolver++", "k_euler_a")
    assert meta["first"]["negative-scale"] == "3.0" and "negative-scale" not in meta["second"]
    assert (meta["first"]["scale"], meta["first"]["size"]) == ("5.0", "32x48")
    assert (meta["second"]["scale"], meta["second"]["size"]) == ("7.5", "64x64")


def test_speed_and_memory_options_run_with_clear_fallbacks(tmp_path, run_main, tiny_sd1, caplog):
    tiny_sd1_safetensors = tiny_sd1 / "model.safetensors"
    caplog.set_level("INFO")
    run_main(
        "--ckpt",
        tiny_sd1_safetensors,
        "--prompt",
        "a cat",
        "--images_per_prompt",
        "2",
        "--batch_size",
        "2",
        *FAST,
        "--fp16",
        "--xformers",
        "--opt_channels_last",
        "--vae_batch_size",
        "0.5",
        "--vae_slices",
        "4",
        "--tokenizer_cache_dir",
        tmp_path / "tokenizer",
        "--vae",
        tiny_sd1 / "diffusers",
        "--sdpa",
        "--v_parameterization",
        "--outdir",
        tmp_path / "out",
    )
    assert len(pngs(tmp_path / "out")) == 2
    assert "--fp16: float16 needs a GPU" in caplog.text
    assert "--xformers: xformers is not installed or has no kernels for cpu; using SDPA" in caplog.text
    assert "--vae_slices 4: decoding with diffusers' VAE tiling" in caplog.text
    assert (tmp_path / "tokenizer" / "openai_clip-vit-large-patch14").is_dir()
    assert "--v_parameterization without --v2" in caplog.text


def test_no_half_vae_keeps_the_sdxl_vae_in_fp32_under_bf16(tmp_path, run_main, tiny_sdxl, monkeypatch):
    """kohya's SDXL generators take --no_half_vae: SDXL's VAE overflows in fp16. The UNet stays in
    bf16; the latents reach the fp32 VAE in the pipelines and in our own batched decoding."""
    from library.models import loading

    loaded = []
    load_model = loading.load_model
    monkeypatch.setattr(
        loading, "load_model", lambda *a, **k: loaded.append(load_model(*a, **k)) or loaded[-1]
    )
    common = ["--ckpt", tiny_sdxl / "model.safetensors", "--prompt", "a toy", *FAST, "--bf16"]
    run_main(*common, "--outdir", tmp_path / "half", "--images_per_prompt", "1")
    run_main(
        *common,
        "--no_half_vae",
        "--images_per_prompt",
        "2",
        "--batch_size",
        "2",
        "--vae_batch_size",
        "1",
        "--outdir",
        tmp_path / "fp32",
    )
    half, full = loaded
    assert (half.unet.dtype, half.vae.dtype) == (torch.bfloat16, torch.bfloat16)
    assert (full.unet.dtype, full.vae.dtype) == (torch.bfloat16, torch.float32)
    source = pngs(tmp_path / "fp32")
    assert len(source) == 2
    for kind, mask in (("img2img", []), ("inpaint", ["--mask_path", source[1]])):
        run_main(*common, "--no_half_vae", "--image_path", source[0], *mask, "--outdir", tmp_path / kind)
        assert len(pngs(tmp_path / kind)) == 1
        assert loaded[-1].vae.dtype == torch.float32  # diffusers' SDXL pipelines did not cast it back


def test_batched_decoding_upcasts_an_fp16_sdxl_vae_as_diffusers_pipelines_do(tiny_sdxl):
    """--vae_batch_size decodes outside diffusers' pipeline, which would decode SDXL's fp16 VAE in
    fp32 (it overflows in fp16); the batched decoding does the same, outside autocast, and leaves
    the VAE in fp16."""
    from library.generation.generator import GenerationRequest, ImageGenerator

    model = load_sd_model(tiny_sdxl / "model.safetensors")
    generator = ImageGenerator(model, dtype=torch.float16, vae_batch_size=1)
    decoded_in = []
    model.vae.decoder.conv_out.register_forward_hook(lambda module, args, out: decoded_in.append(out.dtype))
    with torch.autocast("cpu", dtype=torch.float16):  # as the trainer draws its samples (on a GPU)
        images = generator.generate(GenerationRequest("a toy", width=64, height=64, steps=2, seeds=[1, 2]))
    assert len(images) == 2 and decoded_in == [torch.float32, torch.float32]
    assert model.vae.dtype == torch.float16


def test_a_vae_kept_in_fp32_is_handed_back_as_it_was(tiny_sdxl):
    """The generator lets diffusers' pipelines use an fp32 VAE beside a bf16 UNet, also under
    autocast, then undoes it."""
    from library.generation.generator import GenerationRequest, ImageGenerator

    model = load_sd_model(tiny_sdxl / "model.safetensors")
    upcast = model.vae.config.force_upcast
    generator = ImageGenerator(model, dtype=torch.bfloat16, vae_dtype=torch.float32)
    decoded_in = []
    model.vae.decoder.conv_out.register_forward_hook(lambda module, args, out: decoded_in.append(out.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as the trainer draws its samples
        picture = generator.generate(GenerationRequest("a toy", width=64, height=64, steps=2, seeds=1))[0]
    assert decoded_in == [torch.float32]
    assert (model.unet.dtype, model.vae.dtype, model.vae.config.force_upcast) == (
        torch.bfloat16,
        torch.float32,
        False,
    )
    again = generator.generate(
        GenerationRequest("a toy", init_image=picture, strength=0.5, width=64, height=64, steps=2, seeds=1)
    )
    assert again[0].size == (64, 64) and model.vae.dtype == torch.float32
    generator.close()
    assert "encode" not in vars(model.vae) and "decode" not in vars(model.vae)
    assert (model.unet.dtype, model.vae.dtype, model.vae.config.force_upcast) == (
        torch.float32,
        torch.float32,
        upcast,
    )


def test_fp32_generation_keeps_an_fp16_files_weights_in_half_and_draws_the_same_pixels(
    tmp_path, run_main, tiny_sd1, caplog, monkeypatch
):
    """The trainer's memory rule: in fp32, frozen layers keep the file's exact fp16 weights (logged);
    --highvram keeps fp32 weights. txt2img, img2img (VAE encode) and the highres fix draw the same
    pixels either way."""
    from safetensors.torch import load_file, save_file

    monkeypatch.setattr(
        "library.models.exact_half_weights.MIN_NARROWED_ELEMENTS", 0
    )  # the tiny model's layers are small
    fp16 = tmp_path / "fp16.safetensors"
    save_file({k: v.half() for k, v in load_file(str(tiny_sd1 / "model.safetensors")).items()}, str(fp16))
    source = tmp_path / "source.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(source)
    caplog.set_level("INFO")
    images = {}
    for run, extra in (("half", []), ("fp32", ["--highvram"])):
        caplog.clear()
        out = tmp_path / run
        run_main("--ckpt", fp16, "--prompt", "a cat", *FAST, "--seed", "3", "--outdir", out / "t2i", *extra)
        run_main(
            "--ckpt",
            fp16,
            "--prompt",
            "a cat",
            *FAST,
            "--seed",
            "3",
            "--image_path",
            source,
            "--strength",
            "0.5",
            "--outdir",
            out / "i2i",
            *extra,
        )
        run_main(
            "--ckpt",
            fp16,
            "--prompt",
            "a cat",
            "--W",
            "128",
            "--H",
            "128",
            "--steps",
            "2",
            "--seed",
            "3",
            "--highres_fix_scale",
            "0.5",
            "--outdir",
            out / "hr",
            *extra,
        )
        assert ("frozen layers keep their exact half-precision weights" in caplog.text) == (run == "half")
        images[run] = [np.asarray(Image.open(p)) for part in ("t2i", "i2i", "hr") for p in pngs(out / part)]
    assert len(images["half"]) == len(images["fp32"]) == 3
    assert all(np.array_equal(a, b) for a, b in zip(images["half"], images["fp32"], strict=True))


# --- options ----------------------------------------------------------------------------------


def _non_default(name: str, default):
    action = gen_img.setup_parser()._option_string_actions[f"--{name}"]
    if default is False:
        return [f"--{name}"]
    if action.choices:
        return [f"--{name}", next(choice for choice in action.choices if choice != default)]
    if default is None:
        value = "1" if action.type in (int, float) else "x"
        return [f"--{name}", *[value] * (action.nargs if isinstance(action.nargs, int) else 1)]
    return [f"--{name}", str(default + 1)]


@pytest.mark.parametrize("name", list(gen_img.UNSUPPORTED_OPTIONS))
def test_every_unimplemented_option_is_refused_with_one_line(name, run_main):
    default = gen_img.setup_parser().get_default(name)
    with pytest.raises(UserError, match=rf"^--{name}: .* is not supported by this generator yet"):
        run_main("--ckpt", "unused", "--prompt", "x", *_non_default(name, default))


@pytest.mark.parametrize("name", sorted(a.dest for a in gen_img.setup_parser()._actions if a.type is float))
def test_a_number_option_given_nan_or_inf_is_one_line_naming_it(name, run_main):
    action = gen_img.setup_parser()._option_string_actions[f"--{name}"]
    count = action.nargs if isinstance(action.nargs, int) else 1
    for value in ("nan", "inf"):
        with pytest.raises(UserError, match=rf"^--{name}"):
            run_main("--ckpt", "unused", "--prompt", "x", f"--{name}", *[value] * count)


def test_unimplemented_options_at_their_defaults_are_accepted():
    args = gen_img.setup_parser().parse_args(
        ["--network_module", "--ckpt", "x"]
    )  # an empty list is "not used"
    gen_img.refuse_unsupported(args)
    gen_img.refuse_unsupported(gen_img.setup_parser().parse_args([]))  # every one at its default


def test_no_generator_option_is_accepted_and_dropped():
    """Every option reaches the generator's settings or is refused; the rest are named here with
    where they are read. An option added to the parser and to none of these would be ignored."""
    import typing
    from dataclasses import fields, is_dataclass

    from library.generation.args import GeneratorSettings

    parts = typing.get_type_hints(GeneratorSettings).values()
    read = {f.name for part in parts if is_dataclass(part) for f in fields(part) if f.init}
    read_by_network_settings = {
        f"network_{n}" for n in ("module", "weights", "mul", "show_meta", "merge", "pre_calc")
    }
    read_under_another_name = {"ckpt", "sdxl", "v1"}  # ModelSettings.path, ModelSettings.expect_sdxl
    nothing_to_do = {"help", "no_preview"}  # images are never previewed
    options = {a.dest for a in gen_img.setup_parser()._actions}
    dropped = options - read - set(gen_img.UNSUPPORTED_OPTIONS)
    assert dropped == read_by_network_settings | read_under_another_name | nothing_to_do


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "--ckpt is required"),
        (["--ckpt", "m"], "no prompt: give --prompt, --from_file or --interactive"),
        (["--ckpt", "m", "--prompt", "x", "--max_embeddings_multiples", "4"], "--max_embeddings_multiples 4"),
        (["--ckpt", "m", "--prompt", "x", "--W", "100"], "--W 100: the image size must be a multiple of 8"),
        (["--ckpt", "m", "--prompt", "x", "--H", "10240"], "--H 10240: more than 8192 pixels"),
        (["--ckpt", "m", "--prompt", "x", "--strength", "1.5"], "--strength 1.5: must be between 0 and 1"),
        (["--ckpt", "m", "--prompt", "x", "--mask_path", "m.png"], "--mask_path needs --image_path"),
        (["--ckpt", "m", "--prompt", "x", "--clip_skip", "0"], "--clip_skip 0"),
        (["--ckpt", "m", "--prompt", "x", "--batch_size", "0"], "--batch_size 0: must be at least 1"),
        (["--ckpt", "m", "--from_file", "missing.txt"], "--from_file missing.txt: cannot read"),
        (["--ckpt", "m", "--image_path", "missing.png"], "--image_path missing.png: not found"),
        (["--ckpt", "missing.safetensors", "--prompt", "x"], "missing.safetensors: not found"),
        (
            ["--ckpt", "m", "--prompt", "x", "--sampler", "pndm", "--steps", "2"],
            "the pndm sampler needs at least 4",
        ),
    ],
)
def test_user_mistakes_are_one_line_errors(argv, message, run_main, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=re.escape(message)):
        run_main(*argv)


def test_a_prompt_file_is_read_as_utf8_text_or_named_in_one_line(tmp_path, run_main):
    """A Windows editor's byte-order mark is not part of the first prompt; a file in another
    encoding names itself (it was a UnicodeDecodeError traceback)."""
    from library.generation.run import read_prompt_file

    marked = tmp_path / "marked.txt"
    marked.write_bytes("\ufeffa caf\u00e9 --w 64\n# a comment\nsecond\n".encode())
    assert read_prompt_file(str(marked)) == ["a caf\u00e9 --w 64", "second"]
    latin = tmp_path / "latin.txt"
    latin.write_bytes("a caf\u00e9\n".encode("latin-1"))
    with pytest.raises(UserError, match=r"^--from_file .*latin.txt: not UTF-8 text .*save it as UTF-8$"):
        run_main("--ckpt", "m", "--from_file", latin)  # before the model is looked for


def test_source_image_without_a_prompt_needs_one(tmp_path, run_main):
    Image.new("RGB", (64, 64)).save(tmp_path / "plain.png")
    with pytest.raises(UserError, match="plain.png: no prompt given and the image has no 'prompt'"):
        run_main("--ckpt", "m", "--image_path", tmp_path / "plain.png")


def test_every_kohya_option_exists_with_kohyas_type_default_and_choices():
    parser = gen_img.setup_parser()
    with OPTIONS_TABLE.open() as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    assert len(rows) > 70
    for row in rows:
        action = parser._option_string_actions[row["option"]]
        kind = row["type"]
        if kind == "store_true":
            assert action.const is True and action.default is False, row
            continue
        base, _, nargs = kind.partition("(")
        assert action.type.__name__ == base, row
        assert (action.nargs == "*") == (nargs == "nargs=*)"), row
        default = None if row["default"] == "None" else action.type(row["default"].strip("'"))
        assert action.default == default, row
        if row["choices"]:
            assert action.choices == eval(row["choices"]), row  # noqa: S307 - a list literal from our table


def test_an_embedding_word_does_not_fire_inside_other_words(tiny_sd1_safetensors, embeddings_sd1):
    model = load_sd_model(tiny_sd1_safetensors)
    install_embeddings(model, [str(embeddings_sd1["kohya"])])
    new_ids = set(range(49408, len(model.tokenizer)))
    assert not new_ids & set(model.tokenizer("superkohyaword kohyawordx").input_ids)
    assert 49408 in model.tokenizer("a (kohyaword:1.2), b").input_ids  # the first of its two tokens


def test_oversized_vectors_are_reported(tmp_path, tiny_sd1_safetensors, caplog):
    """A diverged run's 1e30 vectors are finite, so they load; the generator warns instead of drawing black."""
    path = tmp_path / "hugevecs.safetensors"
    save_embedding(path, torch.full((1, 32), 1e30), "hugevecs", step=1, checkpoint_name=None, metadata=None)
    model = load_sd_model(tiny_sd1_safetensors)
    with caplog.at_level("WARNING"):
        install_embeddings(model, [str(path)])
    assert "times the vocabulary's typical" in caplog.text
