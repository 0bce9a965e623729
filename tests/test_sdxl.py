"""SDXL: loading every layout, the conditioning against diffusers' own, the trainer's CLI (files,
resume, two processes, samples), embedding files against every client's SDXL rules, refusals.

The tiny SDXL-layout model has text encoders of widths 32 and 64 (as 768 and 1280: different, so
that swapped parts fail on shape) and SDXL's added text/size conditioning.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from cli_helpers import common, launch_two, picture_folder, run_train
from client_rules import SDXL_CLIENTS, NotLoaded
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from library.embeddings.formats import load_embedding_file, rows_for_model, save_embedding
from library.errors import UserError
from library.generation.prompts import SDXLSizes
from library.models.loading import load_sd_model
from library.training.dataset.buckets import size_conditioning

WIDTHS = {"clip_l": 32, "clip_g": 64}
FULL_WIDTHS = {"clip_l": 768, "clip_g": 1280}

data = picture_folder(2)


# ---------------------------------------------------------------------------------------------
# loading and conditioning


@pytest.mark.parametrize("layout", ["model.safetensors", "model.ckpt", "diffusers"])
def test_every_layout_loads_the_same_weights(tiny_sdxl, layout):
    from tiny_models import tiny_sdxl_components

    unet, vae, text_l, text_g = tiny_sdxl_components(0)
    model = load_sd_model(tiny_sdxl / layout)
    assert model.family.name == "sdxl" and model.text_dims == WIDTHS
    assert model.unet.config.addition_embed_type == "text_time"
    for ours, reference in zip((model.unet, model.vae, *model.text_encoders), (unet, vae, text_l, text_g)):
        expected = reference.state_dict()
        loaded = ours.state_dict()
        assert set(loaded) == set(expected)
        assert all(torch.equal(loaded[k].float(), expected[k].float()) for k in expected)
    assert [t.pad_token for t in model.tokenizers] == ["<|endoftext|>", "!"]


def test_an_fp16_file_conditions_with_half_stored_layers(tiny_sdxl, monkeypatch):
    """Frozen layers of an fp16 file keep their half weights and compute in fp32, the pooled
    projection too (full-size layers qualify by size; here every layer is made to)."""
    from library.models import exact_half_weights

    monkeypatch.setattr(exact_half_weights, "MIN_NARROWED_ELEMENTS", 0)
    half = load_sd_model(tiny_sdxl / "model-fp16.safetensors", exact_half_storage=True)
    plain = load_sd_model(tiny_sdxl / "model-fp16.safetensors")
    assert isinstance(half.text_encoders[1].text_projection, exact_half_weights.HalfStoredLinear)
    sizes = torch.tensor([[64, 64, 0, 0, 64, 64]])
    with torch.no_grad():
        ours, reference = (m.text_conditioner().captions(["a toy"], sizes) for m in (half, plain))
    torch.testing.assert_close(ours.hidden, reference.hidden)
    torch.testing.assert_close(ours.added["text_embeds"], reference.added["text_embeds"])


def test_an_sdxl_file_converts_to_a_diffusers_folder_that_loads_the_same(tiny_sdxl, tmp_path):
    from library.models.diffusers_folder import save_diffusers_folder

    model = load_sd_model(tiny_sdxl / "model.safetensors")
    again = load_sd_model(save_diffusers_folder(model, tmp_path / "folder"))
    assert again.family.name == "sdxl" and [t.pad_token for t in again.tokenizers] == ["<|endoftext|>", "!"]
    for ours, theirs in zip((model.unet, *model.text_encoders), (again.unet, *again.text_encoders)):
        expected = ours.state_dict()
        assert all(torch.equal(value, expected[key]) for key, value in theirs.state_dict().items())


def test_vae_replaces_the_sdxl_vae_with_sdxls_latent_scale(tiny_sdxl):
    """``--vae`` as a folder or a file; either way the VAE keeps SDXL's latent scale (0.13025)."""
    for vae in (
        tiny_sdxl / "diffusers" / "vae",
        tiny_sdxl / "diffusers" / "vae" / "diffusion_pytorch_model.safetensors",
    ):
        model = load_sd_model(tiny_sdxl / "model.safetensors", vae=vae)
        assert model.vae.config.scaling_factor == pytest.approx(0.13025)


def test_prompts_condition_the_unet_as_diffusers_sdxl_pipeline_does(tiny_sdxl):
    """Both encoders' penultimate states side by side and the second's pooled output, as
    ``StableDiffusionXLPipeline.encode_prompt`` makes them from the same folder."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl / "diffusers", local_files_only=True)
    prompt = "a photo of a red toy on a table"
    hidden, _, pooled, _ = pipe.encode_prompt(prompt, do_classifier_free_guidance=False)
    model = load_sd_model(tiny_sdxl / "diffusers")
    with torch.no_grad():
        ours = model.text_conditioner().prompts([prompt])
    torch.testing.assert_close(ours.hidden, hidden)
    torch.testing.assert_close(ours.added["text_embeds"], pooled)


def test_the_pooled_output_is_taken_at_the_end_of_text_not_at_the_new_word(tiny_sdxl):
    """The new word's ids are the highest: CLIP's own argmax pooling would pick the new word."""
    model = load_sd_model(tiny_sdxl / "model.safetensors")
    for tokenizer in model.tokenizers:
        tokenizer.add_tokens(["mychar4"])
    for encoder in model.text_encoders:
        encoder.resize_token_embeddings(len(model.tokenizers[0]), mean_resizing=False)
    text = model.text_conditioner()
    with torch.no_grad():
        pooled = text.prompts(["a mychar4"]).added["text_embeds"]
        ids = text.tokenizers[1](["a mychar4"], padding="max_length", max_length=77, return_tensors="pt")
        output = text.encoders[1](ids.input_ids)
        end = int((ids.input_ids[0] == text.tokenizers[1].eos_token_id).nonzero()[0])
        expected = text.encoders[1].text_projection(output.last_hidden_state[0, end])
    torch.testing.assert_close(pooled[0], expected)


def test_sizes_are_kohyas_numbers():
    """(original h, w, crop top, left, target h, w): with buckets the file's size and kohya's box."""
    assert size_conditioning((64, 64), (64, 64), bucketed=True, flipped=False) == (64, 64, 0, 0, 64, 64)
    # a 100x50 picture in a 64x32 bucket fits exactly: no crop
    assert size_conditioning((64, 32), (100, 50), bucketed=True, flipped=False) == (50, 100, 0, 0, 32, 64)
    # a 100x100 picture in a 64x32 bucket: kohya's box is the square fitted inside, 16 px from the left
    assert size_conditioning((64, 32), (100, 100), bucketed=True, flipped=False) == (100, 100, 0, 16, 32, 64)
    assert size_conditioning((64, 32), (100, 100), bucketed=True, flipped=True) == (100, 100, 0, 16, 32, 64)
    assert size_conditioning((64, 64), (80, 90), bucketed=False, flipped=False) == (64, 64, 0, 0, 64, 64)
    assert size_conditioning((64, 64), (80, 90), bucketed=False, flipped=True) == (64, 64, 0, 64, 64, 64)


# ---------------------------------------------------------------------------------------------
# the trainer


TRAIN = [
    "--token_string=mychar4",
    "--init_word=toy",
    "--num_vectors_per_token=2",
    "--learning_rate=1e-2",
    "--save_model_as=safetensors",
    "--console_log_level=DEBUG",
]


@pytest.fixture(scope="module")
def sdxl_run(data, tiny_sdxl, tmp_path_factory):
    """One SDXL run on the fp16 file (its frozen layers stay in exact half precision): 4 steps,
    saves and states every 2, a sample picture at the end, each encoder's rows direction-only."""
    out = tmp_path_factory.mktemp("sdxl-run")
    prompts = out.parent / f"{out.name}-prompts.txt"
    prompts.write_text("mychar4 --w 64 --h 64 --s 2 --d 3 --ow 128 --ct 8\n")
    result = run_train(
        *common(data, out, tiny_sdxl / "model-fp16.safetensors", *TRAIN),
        "--max_train_steps=4",
        "--save_every_n_steps=2",
        "--save_state",
        f"--sample_prompts={prompts}",
        "--sample_every_n_steps=4",
        "--flip_aug",
        "--direction_only",
        sdxl=True,
    )
    return out, result


def test_the_sdxl_trainer_writes_kohyas_file(sdxl_run, tiny_sdxl):
    out, result = sdxl_run
    assert "vectors of dimension 32 + 64" in result.stderr
    tensors = load_file(str(out / "mychar4.safetensors"))
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {"clip_l": (2, 32), "clip_g": (2, 64)}
    assert all(v.dtype == torch.float32 for v in tensors.values())
    with safe_open(str(out / "mychar4.safetensors"), "pt") as f:
        metadata = f.metadata()
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/textual-inversion"
    assert not [key for key in metadata if key.startswith("ss_")]
    assert (out / "mychar4-step00000002.safetensors").is_file()
    assert len(list((out / "sample").glob("*.png"))) == 1
    start = load_file(str(out / "mychar4-step00000002.safetensors"))
    assert all(not torch.equal(start[k], tensors[k]) for k in tensors)  # both encoders' rows learn
    # --direction_only: each encoder's rows keep that encoder's mean token norm
    model = load_sd_model(tiny_sdxl / "model-fp16.safetensors")
    for key, encoder in zip(("clip_l", "clip_g"), model.text_encoders):
        mean = encoder.get_input_embeddings().weight.float().norm(dim=1).mean()
        assert torch.allclose(tensors[key].norm(dim=1), mean.expand(2), rtol=1e-4), key


def test_an_sdxl_run_resumes_exactly(sdxl_run, data, tiny_sdxl, tmp_path):
    out, _ = sdxl_run
    resumed = tmp_path / "resumed"
    run_train(
        *common(data, resumed, tiny_sdxl / "model-fp16.safetensors", *TRAIN),
        "--max_train_steps=4",
        "--flip_aug",
        "--direction_only",
        f"--resume={out / 'mychar4-step00000002-state'}",
        sdxl=True,
    )
    expected, got = (
        load_file(str(out / "mychar4.safetensors")),
        load_file(str(resumed / "mychar4.safetensors")),
    )
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_two_processes_train_sdxl_in_lock_step_clipping_both_encoders(data, tiny_sdxl, tmp_path):
    """Gradient clipping covers the rows of both encoders (kohya's clips only clip_g's): with SGD at
    learning rate 1 and a clip of 1e-6, neither encoder's rows move more than a few 1e-6."""
    out = tmp_path / "o"
    result = run_train(
        *common(data, out, tiny_sdxl / "diffusers", *TRAIN),
        "--max_train_steps=2",
        "--optimizer_type=SGDNesterov",
        "--learning_rate=1",
        "--max_grad_norm=1e-6",
        **launch_two(29521),
        sdxl=True,
    )
    sums = re.findall(r"process (\d): final vectors sum (\S+)", result.stderr)
    assert sorted(p for p, _ in sums) == ["0", "1"] and sums[0][1] == sums[1][1]
    model = load_sd_model(tiny_sdxl / "diffusers")
    toy = model.tokenizers[0]("toy", add_special_tokens=False).input_ids
    final = load_file(str(out / "mychar4.safetensors"))
    for key, encoder in zip(("clip_l", "clip_g"), model.text_encoders):
        start = encoder.get_input_embeddings().weight[toy].detach().expand(2, -1)
        moved = float((final[key] - start).norm())
        assert 0 < moved < 1e-5, (key, moved)


def test_the_sdxl_file_loads_in_the_generator_by_its_name(sdxl_run, tiny_sdxl, tmp_path):
    from library.embeddings.install import install_embeddings
    from library.generation.generator import GenerationRequest, ImageGenerator
    from library.generation.prompts import SDXLSizes

    out, _ = sdxl_run
    model = load_sd_model(tiny_sdxl / "model.safetensors")
    words = install_embeddings(model, [out / "mychar4.safetensors"])
    assert words == {"mychar4": 2}
    trained = load_file(str(out / "mychar4.safetensors"))
    for key, encoder in zip(("clip_l", "clip_g"), model.text_encoders):
        assert torch.equal(encoder.get_input_embeddings().weight[-2:], trained[key])
    generator = ImageGenerator(model, placeholder_vectors=words)
    request = GenerationRequest(
        "a mychar4", width=64, height=64, steps=2, seeds=5, negative_scale=2.0, sizes=SDXLSizes(crop_top=8)
    )
    first, again = generator.generate(request)[0], generator.generate(request)[0]
    assert first.size == (64, 64) and first.tobytes() == again.tobytes()


def test_generation_matches_diffusers_sdxl_pipeline(tiny_sdxl):
    """Our generator on an SDXL model gives the picture diffusers' own SDXL pipeline gives."""
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline

    from library.generation.generator import GenerationRequest, ImageGenerator

    model = load_sd_model(tiny_sdxl / "diffusers")
    ours = ImageGenerator(model).generate(
        GenerationRequest(
            "a red toy", negative_prompt="blurry", width=64, height=64, steps=3, seeds=7, scale=5
        )
    )[0]
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl / "diffusers", local_files_only=True)
    pipe.scheduler = DDIMScheduler.from_config(model.scheduler_config)
    theirs = pipe(
        "a red toy",
        negative_prompt="blurry",
        width=64,
        height=64,
        num_inference_steps=3,
        guidance_scale=5,
        generator=torch.Generator().manual_seed(7),
    ).images[0]
    difference = (torch.tensor(list(ours.getdata())) - torch.tensor(list(theirs.getdata()))).abs()
    assert difference.max() <= 1


# ---------------------------------------------------------------------------------------------
# files: every client's SDXL rules, --weights from every layout, wrong families


@pytest.fixture
def full_width_rows():
    torch.manual_seed(0)
    return {key: torch.randn(3, width) for key, width in FULL_WIDTHS.items()}


@pytest.mark.parametrize("ext", [".safetensors", ".pt"])
def test_our_sdxl_files_load_in_every_client(tmp_path, full_width_rows, ext):
    path = tmp_path / f"mychar{ext}"
    save_embedding(path, full_width_rows, "mychar", step=1, checkpoint_name="x", metadata=None)
    for client, load in SDXL_CLIENTS.items():
        if client == "SD.Next" and ext == ".pt":  # SD.Next reads a .pt's string_to_param only
            with pytest.raises(NotLoaded):
                load(path, FULL_WIDTHS)
            continue
        rows = load(path, FULL_WIDTHS)
        assert all(torch.equal(rows[k].float(), full_width_rows[k]) for k in FULL_WIDTHS), client
    loaded = load_embedding_file(path)
    assert rows_for_model(loaded, FULL_WIDTHS, "sdxl", path).keys() == FULL_WIDTHS.keys()


def test_weights_continue_from_kohya_webui_onetrainer_and_the_diffusers_pair(tmp_path, full_width_rows):
    from library.training.new_word import continued_vectors

    tables = {key: torch.zeros(10, width) for key, width in FULL_WIDTHS.items()}
    family = type("Family", (), {"name": "sdxl"})()
    kohya = tmp_path / "kohya.safetensors"
    save_file(full_width_rows, str(kohya))
    webui = tmp_path / "webui.pt"
    torch.save(full_width_rows, webui)
    onetrainer = tmp_path / "onetrainer.safetensors"  # OneTrainer writes the same two keys
    save_file({"clip_g": full_width_rows["clip_g"], "clip_l": full_width_rows["clip_l"]}, str(onetrainer))
    save_file({"<mychar>": full_width_rows["clip_l"]}, str(tmp_path / "learned_embeds.safetensors"))
    save_file({"<mychar>": full_width_rows["clip_g"]}, str(tmp_path / "learned_embeds_2.safetensors"))
    for path in (kohya, webui, onetrainer, tmp_path / "learned_embeds.safetensors"):
        rows = continued_vectors(str(path), tables, 3, family)
        assert all(torch.equal(rows[k], full_width_rows[k]) for k in FULL_WIDTHS), path
    with pytest.raises(
        UserError, match=r"--weights .*kohya.safetensors: 3 vectors, but --num_vectors_per_token is 2"
    ):
        continued_vectors(str(kohya), tables, 2, family)


def test_files_of_the_other_family_or_swapped_parts_are_refused_naming_both(tmp_path, full_width_rows):
    sd1 = tmp_path / "sd1.safetensors"
    save_file({"emb_params": torch.randn(2, 768)}, str(sd1))
    with pytest.raises(UserError, match=r"dimension 768 \(SD 1.x\) but the model is SDXL .*\(768 \+ 1280\)"):
        rows_for_model(load_embedding_file(sd1), FULL_WIDTHS, "sdxl", sd1)
    swapped = tmp_path / "swapped.safetensors"
    save_file({"clip_l": full_width_rows["clip_g"], "clip_g": full_width_rows["clip_l"]}, str(swapped))
    with pytest.raises(UserError, match=r"dimensions 1280 \+ 768 but the model is SDXL .* parts are swapped"):
        rows_for_model(load_embedding_file(swapped), FULL_WIDTHS, "sdxl", swapped)
    xl = tmp_path / "xl.safetensors"
    save_file(full_width_rows, str(xl))
    with pytest.raises(UserError, match=r"SDXL \(768 \+ 1280\) pair but the model's text encoder is 768"):
        rows_for_model(load_embedding_file(xl), {"emb_params": 768}, "sd1", xl)


# ---------------------------------------------------------------------------------------------
# refusals, before the model loads


def test_each_trainer_points_to_the_other_for_the_other_family(data, tiny_sdxl, tiny_sd1, tmp_path):
    """Before the data is read (the options and a look at the file decide)."""
    import train_textual_inversion

    with pytest.raises(UserError, match="an SDXL model; train it with sdxl_train_textual_inversion.py"):
        train_textual_inversion.main(common(data, tmp_path / "a", tiny_sdxl / "model.safetensors", *TRAIN))
    with pytest.raises(
        UserError, match="an SD 1.x/2.x model, not SDXL; train it with train_textual_inversion.py"
    ):
        train_textual_inversion.main(common(data, tmp_path / "b", tiny_sd1 / "diffusers", *TRAIN), sdxl=True)


@pytest.mark.parametrize(
    "option, message",
    [("--clip_skip=2", "--clip_skip: SDXL models"), ("--v2", "--v2: an SD 2.x option")],
)
def test_sd_only_options_are_refused_by_the_sdxl_trainer(tiny_sdxl, tmp_path, option, message):
    from sdxl_train_textual_inversion import main

    argv = common(tmp_path, tmp_path / "o", tiny_sdxl / "model.safetensors", *TRAIN, option)
    with pytest.raises(UserError, match=message):
        main(argv)


def test_sdxl_buckets_step_by_32_and_batches_carry_the_sizes(tmp_path):
    """kohya's SDXL trainers allow bucket_reso_steps 32; every batch has its pictures' six numbers."""
    from dataset_helpers import make_args, make_image

    from library.training.dataset import build_train_dataset

    make_image(tmp_path / "1_mychar4 toy" / "wide.png", size=(120, 40))
    options = ["--enable_bucket", "--bucket_reso_steps=32", "--resolution=64", "--min_bucket_reso=32"]
    options.append(f"--train_data_dir={tmp_path}")
    with pytest.raises(UserError, match="needs a multiple of 64"):
        build_train_dataset(make_args(*options), None, None, 1)
    batch = build_train_dataset(make_args(*options, bucket_reso_multiple=32), None, None, 1)[0]
    width, height = batch["bucket_reso"]
    assert width % 32 == 0 and height % 32 == 0 and (width, height) != (64, 64)
    assert batch["sizes"].tolist() == [list(size_conditioning((width, height), (120, 40), True, False))]


def test_size_options_on_an_sd_model_are_refused(tiny_sd1):
    from library.generation.generator import GenerationRequest, ImageGenerator
    from library.generation.prompts import SDXLSizes

    generator = ImageGenerator(load_sd_model(tiny_sd1 / "model.safetensors"))
    with pytest.raises(UserError, match="condition SDXL models only"):
        generator.generate(GenerationRequest("x", width=64, height=64, steps=1, sizes=SDXLSizes(crop_top=8)))


def test_the_tiny_sdxl_parts_have_different_widths(tiny_sdxl):
    assert len(set(WIDTHS.values())) == 2
    assert Path(tiny_sdxl / "diffusers" / "text_encoder_2").is_dir()


def test_sdxl_size_options_in_prompts_and_on_the_command_line():
    from library.generation.args import settings_from_command_line
    from library.generation.prompts import parse_prompt_options

    spec = parse_prompt_options("a toy --ow 1024 --oh 768 --nw 512 --nh 512 --ct 8 --cl 16")
    assert (spec.prompt, spec.sizes.original_width, spec.sizes.original_height) == ("a toy", 1024, 768)
    assert (spec.sizes.original_width_negative, spec.sizes.crop_top, spec.sizes.crop_left) == (512, 8, 16)
    settings = settings_from_command_line(
        ["--ckpt=x", "--prompt=a", "--original_width=2048", "--crop_left=4"]
    )
    merged = spec.sizes.over(settings.generation.sizes)
    assert (merged.original_width, merged.crop_left, merged.original_height) == (1024, 16, 768)
    assert SDXLSizes(crop_top=3).over(settings.generation.sizes).original_width == 2048


def test_the_generators_sdxl_flag_is_checked_against_the_file(tiny_sd1):
    from library.models.loading import load_model
    from library.shared_options import ModelSettings

    with pytest.raises(UserError, match="an SD 1.x/2.x model, not SDXL"):
        load_model(ModelSettings(path=str(tiny_sd1 / "model.safetensors"), expect_sdxl=True), torch.float32)


def test_the_generators_v1_flag_is_checked_against_the_file_and_the_other_flags(tiny_sdxl):
    """kohya's gen_img.py takes --v1 (it guesses SDXL from a file's size otherwise); here the file
    decides, and a flag that contradicts it or another flag is one line."""
    from library.generation.args import settings_from_command_line
    from library.models.loading import load_model

    settings = settings_from_command_line([f"--ckpt={tiny_sdxl / 'model.safetensors'}", "--prompt=a", "--v1"])
    with pytest.raises(UserError, match="an SDXL model; .* generate without --v1"):
        load_model(settings.model, torch.float32)
    for other in ("--sdxl", "--v2"):
        with pytest.raises(UserError, match=f"^--v1 and {other} name two model families"):
            settings_from_command_line(["--ckpt=m", "--prompt=a", "--v1", other])


def test_the_generator_refuses_clip_skip_for_an_sdxl_file_before_loading_it(tiny_sdxl, tmp_path, monkeypatch):
    import gen_img_diffusers
    from library.models import loading

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(loading, "load_model", no_load)
    argv = [
        f"--ckpt={tiny_sdxl / 'model.safetensors'}",
        "--prompt=a toy",
        f"--outdir={tmp_path}",
        "--clip_skip=2",
    ]
    with pytest.raises(UserError, match="--clip_skip: SDXL models are always conditioned"):
        gen_img_diffusers.main(argv)
