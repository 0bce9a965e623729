"""End-to-end: the real trainer CLI on the tiny models, checked the way users' clients read the files."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from cli_helpers import ROOT, common, error_line, launch_two, make_images, picture_folder, run_train
from safetensors.torch import load_file
from webui_rules import assert_webui_loadable

from library.embeddings.formats import load_embedding_file, save_embedding
from library.errors import UserError
from library.host_memory import glibc_version

char_data = picture_folder(3, repeats=2)  # kohya DreamBooth layout: <repeats>_<class tokens> folders


def text_output(
    model_dir: Path, embedding: Path, token: str, prompt: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The text encoder's output for ``prompt`` before and after diffusers loads ``embedding``."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        model_dir, safety_checker=None, requires_safety_checker=False
    )
    with torch.no_grad():
        before_ids = pipe.tokenizer(
            prompt, padding="max_length", max_length=77, return_tensors="pt"
        ).input_ids
        before = pipe.text_encoder(before_ids)[0]
        original_rows = pipe.text_encoder.get_input_embeddings().weight[:49408].clone()
        pipe.load_textual_inversion(str(embedding), token=token)
        ids = pipe.tokenizer(
            pipe.maybe_convert_prompt(prompt, pipe.tokenizer),
            padding="max_length",
            max_length=77,
            return_tensors="pt",
        ).input_ids
        after = pipe.text_encoder(ids)[0]
        assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[:49408], original_rows)
    return before, after


def test_seed_command_cpu_adapted(char_data, tiny_sd1, tmp_path):
    """The issue's seed command (paths and size aside): 8-bit AdamW, xformers and fp16 fall back on CPU
    (fp16 becomes bf16 where the CPU has native bf16, fp32 elsewhere)."""
    out = tmp_path / "ti_train1"
    result = run_train(
        *common(char_data, out, tiny_sd1 / "model.ckpt"),
        "--train_batch_size=1",
        "--learning_rate=1e-4",
        "--max_train_steps=8",
        "--use_8bit_adam",
        "--xformers",
        "--mixed_precision=fp16",
        "--save_every_n_epochs=1",
        "--save_model_as=safetensors",
        "--clip_skip=2",
        "--color_aug",
        "--token_string=mychar4",
        "--init_word=cute",
        "--num_vectors_per_token=4",
    )
    assert "xformers" in result.stderr and "--mixed_precision fp16: float16 needs a GPU" in result.stderr
    assert "Failed to load" not in result.stderr  # bitsandbytes' hub notice (on AVX512-BF16 CPUs) is quiet
    final = out / "mychar4.safetensors"
    assert final.is_file()
    assert (out / "mychar4-000001.safetensors").is_file()  # 6 batches per epoch: epoch 1 ends at step 6
    vectors = load_file(str(final))["emb_params"]
    assert vectors.shape == (4, 32) and vectors.dtype == torch.float32
    emb = load_embedding_file(final)
    assert emb.metadata.get("modelspec.architecture") == "stable-diffusion-v1/textual-inversion"
    before, after = text_output(tiny_sd1 / "diffusers", final, "mychar4", "a photo of mychar4")
    assert not torch.allclose(before, after)


def test_sd2_folder_pt_output_object_template_and_webui_rules(char_data, tiny_sd2, tmp_path):
    out = tmp_path / "out"
    run_train(
        *common(char_data, out, tiny_sd2 / "diffusers"),
        "--max_train_steps=3",
        "--learning_rate=5e-3",
        "--token_string=mychar4",
        "--init_word=toy",
        "--num_vectors_per_token=2",
        "--use_object_template",
        "--output_name=mytoy",
        "--save_model_as=pt",
        "--v2",
        "--v_parameterization",
        "--gradient_checkpointing",
        "--cache_latents",
        "--min_snr_gamma=5",
        f"--logging_dir={tmp_path / 'logs'}",
        "--log_with=tensorboard",
    )
    assert list((tmp_path / "logs").rglob("events.out.tfevents.*"))
    path = out / "mytoy.pt"
    assert_webui_loadable(path)
    data = torch.load(path, weights_only=True)
    assert data["string_to_param"]["*"].shape == (2, 64)
    assert data["name"] == "mytoy" and data["step"] == 3
    before, after = text_output(tiny_sd2 / "diffusers", path, "mytoy", "a photo of mytoy")
    assert not torch.allclose(before, after)


def test_weights_continue_from_a_file_and_mismatch_errors(char_data, tiny_sd1, tmp_path):
    start = tmp_path / "start.safetensors"
    save_embedding(start, torch.full((2, 32), 0.01), "start", step=0, checkpoint_name=None, metadata=None)
    out = tmp_path / "out"
    run_train(
        *common(char_data, out, tiny_sd1 / "diffusers"),
        "--max_train_steps=1",
        "--learning_rate=0",
        "--token_string=mychar4",
        f"--weights={start}",
        "--num_vectors_per_token=2",
        "--save_model_as=safetensors",
    )
    assert torch.equal(load_file(str(out / "mychar4.safetensors"))["emb_params"], torch.full((2, 32), 0.01))

    wrong = run_train(
        *common(char_data, tmp_path / "o2", tiny_sd1 / "model.safetensors"),
        "--max_train_steps=1",
        "--token_string=mychar4",
        f"--weights={start}",
        "--num_vectors_per_token=3",
        check=False,
    )
    assert wrong.returncode == 2
    assert "2 vectors" in wrong.stderr and "--num_vectors_per_token is 3" in wrong.stderr


def test_vectors_that_never_move_are_reported(char_data, tiny_sd2, tmp_path):
    result = run_train(
        *common(char_data, tmp_path / "o", tiny_sd2 / "model.safetensors"),
        "--max_train_steps=10",
        "--learning_rate=0",
        "--token_string=mychar4",
        "--init_word=toy",
    )
    assert "have not changed" in result.stderr
    assert "SD 2.x" in result.stderr  # detected from the file without --v2


def test_token_missing_from_captions_stops_before_training(tiny_sd1, tmp_path):
    data = tmp_path / "data"
    make_images(data / "1_toy", 2, caption="a photo of a toy")
    result = run_train(
        *common(data, tmp_path / "o", tiny_sd1 / "model.safetensors"), "--token_string=mychar4", check=False
    )
    assert "mychar4" in error_line(result)
    assert not (tmp_path / "o" / "mychar4.pt").exists()


def test_token_already_in_vocabulary_is_refused_with_a_suggestion(char_data, tiny_sd1, tmp_path):
    result = run_train(
        *common(char_data, tmp_path / "o", tiny_sd1 / "model.safetensors"), "--token_string=toy", check=False
    )
    line = error_line(result)
    assert "'toy' already exists" in line and "--token_string toyx" in line


def test_an_unsupported_option_is_refused_in_one_line(char_data, tiny_sd1, tmp_path):
    """Through the CLI once; every refused option's message is checked in test_train_args."""
    result = run_train(
        *common(char_data, tmp_path / "o", tiny_sd1 / "model.safetensors"),
        "--token_string=mychar4",
        "--deepspeed",
        check=False,
    )
    assert "DeepSpeed" in error_line(result)


def test_missing_model_is_one_line(char_data, tmp_path):
    result = run_train(
        *common(char_data, tmp_path / "o", tmp_path / "nope.safetensors"),
        "--token_string=mychar4",
        check=False,
    )
    assert "nope.safetensors" in error_line(result)


def test_cross_init_direction_only_and_a_pull_together(char_data, tiny_sd1, tmp_path):
    """The three start and norm controls in one run: the vectors end on the vocabulary's mean norm."""
    from library.models.loading import load_sd_model

    out = tmp_path / "steered"
    result = run_train(
        *common(char_data, out, tiny_sd1 / "model.safetensors"),
        "--max_train_steps=3",
        "--learning_rate=1e-2",
        "--token_string=mychar4",
        "--init_word=toy",
        "--num_vectors_per_token=2",
        "--save_model_as=safetensors",
        "--cross_init",
        "--direction_only",
        "--init_pull=1",
    )
    assert "--cross_init: the vectors start from the text encoder's output for 'toy'" in result.stderr
    vectors = load_embedding_file(out / "mychar4.safetensors").vectors.float()
    table = load_sd_model(tiny_sd1 / "model.safetensors").text_encoder.get_input_embeddings().weight.float()
    assert torch.allclose(vectors.norm(dim=1), table.norm(dim=1).mean().expand(2), rtol=1e-4)


def _batches_by_step(stderr: str) -> dict[int, tuple[int, str]]:
    """The debug log's ``step N, epoch E: [keys]`` lines."""
    found = {}
    for match in re.finditer(r"step (\d+), epoch (\d+): (\[.*?\])", stderr):
        found[int(match.group(1))] = (int(match.group(2)), match.group(3))
    return found


def test_resume_ends_with_the_same_vectors_as_an_uninterrupted_run(char_data, tiny_sd1, tmp_path):
    args = [
        "--max_train_steps=6",
        "--learning_rate=1e-2",
        "--token_string=mychar4",
        "--init_word=toy",
        "--num_vectors_per_token=2",
        "--save_model_as=safetensors",
        "--optimizer_type=AdamW",
        "--lr_scheduler=cosine",
        "--train_batch_size=2",
        "--flip_aug",
        "--console_log_level=DEBUG",
        "--preserve_embedding_norm",  # its norms are the run's first, kept in the state (they used to be the resumed ones)
        "--init_pull=0.5",  # pulls toward the start before step 1, not toward the resumed vectors
    ]
    whole = tmp_path / "whole"
    first = run_train(
        *common(char_data, whole, tiny_sd1 / "model.safetensors"),
        *args,
        "--save_every_n_steps=2",
        "--save_state",
    )
    state = whole / "mychar4-step00000002-state"
    assert (state / "progress.json").is_file()
    resumed = tmp_path / "resumed"
    # a different --seed on resume is overridden by the state's seed (with a warning), so the run repeats
    second = run_train(
        *common(char_data, resumed, tiny_sd1 / "model.safetensors"), *args, f"--resume={state}", "--seed=7"
    )
    assert "differs from the resumed run's seed 42" in second.stderr
    if glibc_version() is not None:  # a CPU run keeps freed memory for the next step (library/host_memory.py)
        assert "freed memory kept for reuse" in first.stderr

    # 3 batches per epoch: the resumed run continues mid-epoch 0 and sees the same batches from then on
    batches, resumed_batches = _batches_by_step(first.stderr), _batches_by_step(second.stderr)
    assert sorted(batches) == list(range(6)) and sorted(resumed_batches) == list(range(2, 6))
    assert all(resumed_batches[step] == batches[step] for step in range(2, 6))
    epoch0 = [batches[step][1] for step in range(3)]
    epoch1 = [batches[step][1] for step in range(3, 6)]
    assert [batches[step][0] for step in range(6)] == [0, 0, 0, 1, 1, 1]
    assert epoch0 != epoch1  # each epoch has its own order

    a = load_file(str(whole / "mychar4.safetensors"))["emb_params"]
    b = load_file(str(resumed / "mychar4.safetensors"))["emb_params"]
    start = load_file(str(whole / "mychar4-step00000002.safetensors"))["emb_params"]
    assert not torch.allclose(a, start)  # training went on after the state was saved
    assert (a - b).abs().max().item() <= 1e-6


def test_nan_guard_keeps_the_last_good_vectors_and_lora(char_data, tiny_sd1, tmp_path):
    # a learning rate of 1e38 makes the vectors huge after one step; the next forward pass overflows
    out = tmp_path / "o"
    result = run_train(
        *common(char_data, out, tiny_sd1 / "model.safetensors"),
        "--max_train_steps=5",
        "--learning_rate=1e38",
        "--max_grad_norm=0",
        "--token_string=mychar4",
        "--init_word=toy",
        "--optimizer_type=SGDNesterov",
        "--save_model_as=safetensors",
        "--network_module=networks.lora",
        check=False,
    )
    line = error_line(result)
    assert "the loss became nan" in line and "last good vectors and LoRA" in line and "learning_rate" in line
    (saved,) = out.glob("mychar4-last-good-step*.safetensors")
    assert torch.isfinite(load_file(str(saved))["emb_params"]).all()
    (lora,) = out.glob("mychar4_lora-last-good-step*.safetensors")
    assert lora.name.endswith(saved.name.removeprefix("mychar4")) and str(lora) in line
    tensors = load_file(str(lora))
    assert all(torch.isfinite(t).all() for t in tensors.values())
    assert torch.equal(tensors["bundle_emb.mychar4.emb_params"], load_file(str(saved))["emb_params"])
    assert not (out / "mychar4.safetensors").exists()


def test_sample_images_are_written(char_data, tiny_sd1, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# a comment\nmychar4 on a table --w 64 --h 64 --s 2 --d 5\n")
    out = tmp_path / "o"
    run_train(
        *common(char_data, out, tiny_sd1 / "model.safetensors"),
        "--max_train_steps=2",
        "--token_string=mychar4",
        "--init_word=toy",
        "--num_vectors_per_token=2",
        f"--sample_prompts={prompts}",
        "--sample_every_n_steps=2",
        "--sample_at_first",
    )
    names = sorted(p.name for p in (out / "sample").glob("*.png"))
    assert len(names) == 2
    # kohya's names: --sample_at_first counts as epoch 0, later samples carry the step
    assert names[0].startswith("mychar4_000002_00_") and names[0].endswith("_5.png")
    assert names[1].startswith("mychar4_e000000_00_")


def test_debug_dataset_shows_new_token_ids_without_training(char_data, tiny_sd1, tmp_path):
    out = tmp_path / "o"
    result = run_train(
        *common(char_data, out, tiny_sd1 / "model.safetensors"),
        "--token_string=mychar4",
        "--num_vectors_per_token=3",
        "--debug_dataset",
    )
    text = result.stdout + result.stderr
    assert "49408" in text and "49409" in text and "49410" in text
    assert not list(out.glob("*.pt"))
    assert list(out.glob("*.png"))  # the contact sheet


def test_output_config_then_config_file(char_data, tiny_sd1, tmp_path):
    config = tmp_path / "run.toml"
    out = tmp_path / "o"
    from library.training.args import parse_args

    with pytest.raises(SystemExit) as written:  # kohya: --output_config writes the file and stops
        parse_args(
            [
                *common(char_data, out, tiny_sd1 / "model.safetensors"),
                "--token_string=mychar4",
                "--max_train_steps=1",
                "--output_name=fromconfig",
                f"--config_file={config}",
                "--output_config",
            ]
        )
    assert written.value.code == 0 and config.is_file() and not out.exists()
    run_train(f"--config_file={config}")
    assert (out / "fromconfig.pt").is_file()
    config.write_text(config.read_text() + "\nlearning_rat = 0.1\n")
    with pytest.raises(UserError, match="learning_rat"):
        parse_args([f"--config_file={config}"])


def learning_rates(stderr: str) -> dict[int, float]:
    return {int(s): float(lr) for s, lr in re.findall(r"step (\d+): loss [^,]+, lr ([^,\s]+)", stderr)}


def test_two_processes_train_in_lock_step_and_resume_exactly(char_data, tiny_sd1, tmp_path):
    """accelerate's launcher starts CPU processes with --multi_gpu plus ACCELERATE_USE_CPU (gloo). A
    pivotal-tuning LoRA (3x3 convolutions too, vectors stopped after two steps) stays in lock-step
    beside the word; the learning rate follows one process's course (kohya's single-GPU trajectory:
    it used to stop at 1/N of it), with cycles and restarts; two processes resume from a state to
    the same vectors and LoRA. The SDXL test trains the word alone."""
    out = tmp_path / "o"
    prompts = tmp_path / "p.txt"
    prompts.write_text("mychar4 --w 64 --h 64 --s 2 --d 3\n")
    args = [
        "--max_train_steps=4",
        "--token_string=mychar4",
        "--init_word=toy",
        "--save_model_as=safetensors",
        "--learning_rate=1e-2",
        "--lr_scheduler=cosine_with_restarts",
        "--lr_scheduler_num_cycles=2",
        "--console_log_level=DEBUG",
        "--network_module=networks.lora",
        "--network_args",
        "conv_dim=2",
        "--unet_lr=1e-3",
        "--train_vectors_fraction=0.4",
    ]
    result = run_train(
        *common(char_data, out, tiny_sd1 / "model.safetensors"),
        *args,
        "--save_every_n_steps=2",
        "--save_state",
        f"--sample_prompts={prompts}",
        "--sample_every_n_steps=3",
        **launch_two(29517),
    )
    assert "x2 process(es)" in result.stderr and "3 steps each" in result.stderr  # 6 batches split in two
    assert (out / "mychar4.safetensors").is_file() and (out / "mychar4-step00000002.safetensors").is_file()
    assert (out / "mychar4-step00000002-state" / "progress.json").is_file()
    assert len(list((out / "sample").glob("*.png"))) == 1  # sampled once, by the main process
    sums = re.findall(r"process (\d): final vectors sum (\S+)", result.stderr)
    assert sorted(p for p, _ in sums) == ["0", "1"] and sums[0][1] == sums[1][1]  # lock-step
    lora = dict(re.findall(r"process (\d): final LoRA sum (\S+)", result.stderr))
    assert sorted(lora) == ["0", "1"] and lora["0"] == lora["1"]
    one = run_train(*common(char_data, tmp_path / "one", tiny_sd1 / "model.safetensors"), *args)
    assert sorted(learning_rates(one.stderr)) == [1, 2, 3, 4]
    assert learning_rates(one.stderr) == pytest.approx(learning_rates(result.stderr))

    resumed = tmp_path / "resumed"
    state = out / "mychar4-step00000002-state"
    run_train(
        *common(char_data, resumed, tiny_sd1 / "model.safetensors"),
        *args,
        f"--resume={state}",
        **launch_two(29518),
    )
    for name in ("mychar4.safetensors", "mychar4_lora.safetensors"):
        whole, again = load_file(str(out / name)), load_file(str(resumed / name))
        assert set(whole) == set(again) and all((whole[k] - again[k]).abs().max() <= 1e-6 for k in whole), (
            name
        )


def test_killed_or_interrupted_runs_resume_exactly_from_their_newest_state(char_data, tiny_sd1, tmp_path):
    """kill -9 while saving every step, or Ctrl-C (SIGINT): the newest complete state resumes to the
    vectors of an uninterrupted run, and a killed save's leftovers are removed at the next start."""
    import signal

    args = [
        *common(char_data, tmp_path / "o", tiny_sd1 / "model.safetensors"),
        "--token_string=mychar4",
        "--init_word=toy",
        "--learning_rate=1e-2",
        "--max_train_steps=12",
        "--save_model_as=safetensors",
    ]
    reference = tmp_path / "reference"
    run_train(*[a.replace(str(tmp_path / "o"), str(reference)) for a in args])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    for how, out in ((signal.SIGKILL, tmp_path / "killed"), (signal.SIGINT, tmp_path / "interrupted")):
        command = [a.replace(str(tmp_path / "o"), str(out)) for a in args]
        process = subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "train_textual_inversion.py"),
                *command,
                "--save_every_n_steps=1",
                "--save_state",
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            # a shell's background job inherits SIGINT ignored; the trainer must see Ctrl-C as a user's would
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        while not (out / "mychar4-step00000003-state").exists() and process.poll() is None:
            time.sleep(0.01)
        process.send_signal(how)
        _, errors = process.communicate(timeout=120)
        if how == signal.SIGINT:
            assert process.returncode == 130 and errors.rstrip().endswith("interrupted"), errors[-2000:]
        else:
            assert process.returncode == -signal.SIGKILL
    states = sorted((tmp_path / "killed").glob("mychar4-step*-state"))
    newest = states[-1]
    assert 3 <= int(newest.name[len("mychar4-step") :][:8]) < 12
    resumed = run_train(
        *[a.replace(str(tmp_path / "o"), str(tmp_path / "killed")) for a in args], f"--resume={newest}"
    )
    leftovers = [p.name for p in (tmp_path / "killed").iterdir() if p.name.startswith(".")]
    assert not leftovers, (leftovers, resumed.stderr[-2000:])
    a = load_file(str(reference / "mychar4.safetensors"))["emb_params"]
    b = load_file(str(tmp_path / "killed" / "mychar4.safetensors"))["emb_params"]
    assert (a - b).abs().max().item() <= 1e-6
