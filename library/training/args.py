"""Command-line options of ``train_textual_inversion.py``: kohya's names, types and defaults.

Each area module adds its own options (dataset, noise, loss, optimizer); this module adds the
rest (model, saving and state, logging, precision, Textual Inversion, training loop), reads
``--config_file`` like kohya (TOML values first, the command line wins) and writes
``--output_config``. Options that cannot work here are accepted by the parser, so that a kohya
command line is understood, and then refused with one line saying why (``refuse_unsupported``).
"""

from __future__ import annotations

import argparse
import functools
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from library.errors import OneLineParser, UserError
from library.files import read_text_file, tomllib
from library.generation.samplers import SAMPLER_NAMES, check_steps
from library.options import default_of, settings_from
from library.runtime import refuse_impossible_numbers, refuse_options, setup_console_logging
from library.shared_options import (
    ConsoleSettings,
    ModelSettings,
    add_attention_options,
    add_console_options,
    add_model_options,
    without_secrets,
)
from library.text.tokens import words_in_no_text
from library.training.accelerator import ComputeSettings
from library.training.dataset import add_dataset_arguments
from library.training.dataset.args import DataOptions
from library.training.loss import LossSettings, add_loss_arguments
from library.training.new_word import INIT_WORD_MODES, WordSettings
from library.training.noise import NoiseSettings, add_noise_arguments
from library.training.optimizers import OptimizerSettings, add_optimizer_arguments, optimizer_class_for
from library.training.pivotal import LoRASettings, add_lora_arguments, check_lora_settings
from library.training.run import LoopSettings
from library.training.samples import DEFAULTS as SAMPLE_DEFAULTS
from library.training.samples import SampleSettings, read_sample_prompts
from library.training.state import METADATA_OPTIONS, MetadataSettings, SaveSettings
from library.training.steering import DIRECTION_NORMS, SteeringSettings
from library.training.tracking import TrackerSettings
from library.training.validation import ValidationSettings

logger = logging.getLogger(__name__)


def _model_arguments(parser: argparse.ArgumentParser, sdxl: bool) -> None:
    add_model_options(
        parser,
        "--pretrained_model_name_or_path",
        f"{'SDXL' if sdxl else 'SD 1.x/2.x'} checkpoint (.safetensors/.ckpt) or diffusers folder",
    )
    g = parser.add_argument_group("model (trainer)")
    g.add_argument("--fp8_base", action="store_true", help="refused: needs fp8 CUDA kernels")
    g.add_argument("--lowram", action="store_true", help="kohya memory hint; no effect here (logged)")
    g.add_argument("--no_half_vae", action="store_true", help="keep the VAE in fp32 under mixed precision")
    if sdxl:
        g.add_argument(
            "--disable_mmap_load_safetensors",
            action="store_true",
            help="kohya's option; models are always read without a memory map here (logged)",
        )


def _textual_inversion_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("textual inversion")
    default = functools.partial(default_of, WordSettings)
    g.add_argument(
        "--token_string",
        type=str,
        default=default("token_string"),
        help="the new word, e.g. mychar (required)",
    )
    g.add_argument(
        "--init_word",
        type=str,
        default=default("init_word"),
        help="word or phrase the vectors start from (see --init_word_mode for a phrase)",
    )
    g.add_argument(
        "--init_word_mode",
        type=str,
        default=default("init_word_mode"),
        choices=INIT_WORD_MODES,
        help="a phrase over the vectors: cycle (kohya: token i %% k), spread (the WebUI: in order, "
        "each token a run of vectors) or mean (every vector the phrase's mean); not a kohya option",
    )
    g.add_argument(
        "--num_vectors_per_token",
        type=int,
        default=default("num_vectors_per_token"),
        help="vectors (tokens) the word uses",
    )
    g.add_argument(
        "--weights",
        type=str,
        default=default("weights"),
        help="continue from an embedding file of any layout",
    )
    g.add_argument("--use_object_template", action="store_true", help="captions from the object templates")
    g.add_argument("--use_style_template", action="store_true", help="captions from the style templates")


def _steering_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group(
        "the vectors' start and norm (not kohya options; docs/quality.md measures them)"
    )
    default = functools.partial(default_of, SteeringSettings)
    g.add_argument(
        "--cross_init",
        action="store_true",
        help="start from the text encoder's output for --init_word instead of its token rows (CrossInit)",
    )
    g.add_argument(
        "--preserve_embedding_norm",
        action="store_true",
        help="after every step, scale each vector back to its starting norm",
    )
    g.add_argument(
        "--direction_only",
        action="store_true",
        help="train only each vector's direction at a fixed norm (DTI): the gradient is projected onto "
        "the sphere and the vector put back on it after every step",
    )
    g.add_argument(
        "--direction_norm",
        type=str,
        default=default("direction_norm"),
        choices=DIRECTION_NORMS,
        help="--direction_only's norm: the vocabulary's mean token norm (default) or the start's",
    )
    g.add_argument(
        "--init_pull",
        type=float,
        default=default("init_pull"),
        help="add W * mean squared distance to the start vectors to the loss (default 0: off)",
    )


def _training_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("training loop")
    default = functools.partial(default_of, LoopSettings)
    g.add_argument("--max_train_steps", type=int, default=default("max_train_steps"))
    g.add_argument(
        "--max_train_epochs",
        type=int,
        default=default("max_train_epochs"),
        help="overrides --max_train_steps",
    )
    g.add_argument("--gradient_accumulation_steps", type=int, default=default("gradient_accumulation_steps"))
    g.add_argument("--seed", type=int, default=default("seed"))
    g.add_argument(
        "--clip_skip",
        type=int,
        default=default("clip_skip"),
        help="use the k-th text encoder layer from the end",
    )
    _steering_arguments(parser)

    add_attention_options(parser)
    g = parser.add_argument_group("precision, memory, distributed")
    default = functools.partial(default_of, ComputeSettings)
    g.add_argument(
        "--mixed_precision", type=str, default=default("mixed_precision"), choices=["no", "fp16", "bf16"]
    )
    g.add_argument("--full_fp16", action="store_true", help="frozen models in fp16; the vectors stay fp32")
    g.add_argument("--full_bf16", action="store_true", help="frozen models in bf16; the vectors stay fp32")
    g.add_argument("--gradient_checkpointing", action="store_true")
    g.add_argument(
        "--mem_eff_attn", action="store_true", help="memory-efficient attention (SDPA provides it)"
    )
    g.add_argument("--torch_compile", action="store_true")
    g.add_argument(
        "--dynamo_backend",
        type=str,
        default=default("dynamo_backend"),
        choices=[
            "eager",
            "aot_eager",
            "inductor",
            "aot_ts_nvfuser",
            "nvprims_nvfuser",
            "cudagraphs",
            "ofi",
            "fx2trt",
            "onnxrt",
            "tensort",
            "ipex",
            "tvm",
        ],
    )
    g.add_argument(
        "--ddp_timeout",
        type=int,
        default=default("ddp_timeout"),
        help="minutes before a process group times out",
    )
    g.add_argument("--ddp_gradient_as_bucket_view", action="store_true")
    g.add_argument("--ddp_static_graph", action="store_true")
    g.add_argument("--deepspeed", action="store_true", help="refused: not needed to train a few vectors")
    g.add_argument("--zero_stage", type=int, default=2, choices=[0, 1, 2, 3])
    g.add_argument("--offload_optimizer_device", type=str, default=None, choices=[None, "cpu", "nvme"])
    g.add_argument("--offload_optimizer_nvme_path", type=str, default=None)
    g.add_argument("--offload_param_device", type=str, default=None, choices=[None, "cpu", "nvme"])
    g.add_argument("--offload_param_nvme_path", type=str, default=None)
    g.add_argument("--zero3_init_flag", action="store_true")
    g.add_argument("--zero3_save_16bit_model", action="store_true")
    g.add_argument("--fp16_master_weights_and_gradients", action="store_true")


def _saving_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("saving & state")
    default = functools.partial(default_of, SaveSettings)
    g.add_argument("--output_dir", type=str, default=default("output_dir"))
    g.add_argument(
        "--output_name",
        type=str,
        default=default("output_name"),
        help="file stem = the word in the WebUI/ComfyUI",
    )
    g.add_argument(
        "--save_model_as",
        type=str,
        default=default("save_model_as"),
        choices=[None, "ckpt", "pt", "safetensors"],
        help="embedding file format: .pt/.ckpt in the WebUI layout, or .safetensors",
    )
    g.add_argument(
        "--save_precision",
        type=str,
        default=default("save_precision"),
        choices=[None, "float", "fp16", "bf16"],
    )
    g.add_argument("--save_every_n_epochs", type=int, default=default("save_every_n_epochs"))
    g.add_argument("--save_every_n_steps", type=int, default=default("save_every_n_steps"))
    g.add_argument(
        "--save_n_epoch_ratio",
        type=int,
        default=default("save_n_epoch_ratio"),
        help="save about this many times in all",
    )
    g.add_argument("--save_last_n_epochs", type=int, default=default("save_last_n_epochs"))
    g.add_argument("--save_last_n_epochs_state", type=int, default=default("save_last_n_epochs_state"))
    g.add_argument("--save_last_n_steps", type=int, default=default("save_last_n_steps"))
    g.add_argument("--save_last_n_steps_state", type=int, default=default("save_last_n_steps_state"))
    g.add_argument("--save_state", action="store_true", help="also save a resumable state with each save")
    g.add_argument("--save_state_on_train_end", action="store_true")
    g.add_argument(
        "--resume", type=str, default=default("resume"), help="a state folder written by --save_state"
    )
    for name in METADATA_OPTIONS:
        g.add_argument(
            f"--metadata_{name}", type=str, default=None, help="written into .safetensors metadata"
        )
    g.add_argument(
        "--huggingface_repo_id", type=str, default=None, help="refused: uploading needs the network"
    )
    g.add_argument("--huggingface_repo_type", type=str, default=None)
    g.add_argument("--huggingface_path_in_repo", type=str, default=None)
    g.add_argument("--huggingface_token", type=str, default=None)
    g.add_argument("--huggingface_repo_visibility", type=str, default=None)
    g.add_argument("--save_state_to_huggingface", action="store_true")
    g.add_argument("--resume_from_huggingface", action="store_true")
    g.add_argument("--async_upload", action="store_true")


def _sample_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("sample images during training")
    default = functools.partial(default_of, SampleSettings)
    g.add_argument(
        "--sample_prompts",
        type=str,
        default=default("sample_prompts"),
        help=".txt, .toml or .json prompt file",
    )
    g.add_argument("--sample_every_n_steps", type=int, default=default("sample_every_n_steps"))
    g.add_argument("--sample_every_n_epochs", type=int, default=default("sample_every_n_epochs"))
    g.add_argument("--sample_at_first", action="store_true")
    g.add_argument("--sample_sampler", type=str, default=default("sample_sampler"), choices=SAMPLER_NAMES)


def _validation_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group(
        "validation and stopping (--validation_split/--validation_seed: see dataset)"
    )
    default = functools.partial(default_of, ValidationSettings)
    g.add_argument(
        "--validate_every_n_steps",
        type=int,
        default=default("validate_every_n_steps"),
        help="score the validation loss every N steps (default: every epoch when images are held out)",
    )
    g.add_argument("--validate_every_n_epochs", type=int, default=default("validate_every_n_epochs"))
    g.add_argument(
        "--max_validation_steps",
        type=int,
        default=default("max_validation_steps"),
        help="validation batches scored (default: all held-out ones; 1 fixed training batch without)",
    )
    g.add_argument(
        "--early_stopping",
        action="store_true",
        help="stop when the validation loss has flattened (DVAR's variance rule); not a kohya option",
    )
    g.add_argument(
        "--early_stopping_window",
        type=int,
        default=default("early_stopping_window"),
        help="validation values compared against the whole history (default 200, DVAR's)",
    )
    g.add_argument(
        "--early_stopping_threshold",
        type=float,
        default=default("early_stopping_threshold"),
        help="stop when recent variance / overall variance falls below this (default 0.15, DVAR's)",
    )


def _logging_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("logging")
    default = functools.partial(default_of, TrackerSettings)
    g.add_argument(
        "--logging_dir", type=str, default=default("logging_dir"), help="TensorBoard/W&B logs go here"
    )
    g.add_argument(
        "--log_with", type=str, default=default("log_with"), choices=["tensorboard", "wandb", "all"]
    )
    g.add_argument("--log_prefix", type=str, default=default("log_prefix"))
    g.add_argument("--log_tracker_name", type=str, default=default("log_tracker_name"))
    g.add_argument("--log_tracker_config", type=str, default=default("log_tracker_config"))
    g.add_argument("--log_config", action="store_true", help="record the arguments in the tracker")
    g.add_argument("--wandb_run_name", type=str, default=default("wandb_run_name"))
    g.add_argument("--wandb_api_key", type=str, default=default("wandb_api_key"))
    g.add_argument(
        "--config_file", type=str, default=None, help="TOML file of arguments (the command line wins)"
    )
    g.add_argument(
        "--output_config", action="store_true", help="write the arguments to --config_file and stop"
    )


def build_parser(sdxl: bool = False) -> argparse.ArgumentParser:
    """The trainer's options; ``sdxl``: those of ``sdxl_train_textual_inversion.py`` (kohya adds one)."""
    parser = OneLineParser(
        prog="sdxl_train_textual_inversion.py" if sdxl else "train_textual_inversion.py",
        description=f"Train a Textual Inversion embedding for {'SDXL' if sdxl else 'Stable Diffusion 1.x/2.x'} "
        "(kohya-compatible).",
    )
    _model_arguments(parser, sdxl)
    _textual_inversion_arguments(parser)
    add_dataset_arguments(parser)
    _training_arguments(parser)
    add_noise_arguments(parser)
    add_loss_arguments(parser)
    add_optimizer_arguments(parser)
    add_lora_arguments(parser)
    _saving_arguments(parser)
    _sample_arguments(parser)
    _validation_arguments(parser)
    _logging_arguments(parser)
    add_console_options(parser)
    return parser


# ---------------------------------------------------------------------------------------------
# --config_file / --output_config


def _config_path(config_file: str) -> Path:
    return Path(config_file if config_file.endswith(".toml") else config_file + ".toml")


def _flatten(table: dict, path: Path) -> dict:
    """kohya ignores the TOML sections: every key of every table is an argument."""
    flat = {}
    for key, value in table.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, path))
        else:
            flat[key] = value
    return flat


def parse_args(argv: list[str] | None = None, sdxl: bool = False) -> argparse.Namespace:
    """Parse the command line over ``--config_file`` values; handle ``--output_config``."""
    parser = build_parser(sdxl)
    args = parser.parse_args(argv)
    if args.output_config:
        write_config(args)
        raise SystemExit(0)
    if args.config_file:
        path = _config_path(args.config_file)
        if not path.is_file():
            raise UserError(f"--config_file {path}: not found")
        text = read_text_file(path, "--config_file")
        try:
            values = _flatten(tomllib.loads(text), path)
        except tomllib.TOMLDecodeError as exc:
            raise UserError(f"--config_file {path}: not valid TOML ({exc})") from exc
        known = vars(parser.parse_args([]))
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise UserError(f"--config_file {path}: unknown option {unknown[0]!r}; check its spelling")
        args = parser.parse_args(argv, namespace=argparse.Namespace(**values))
    return args


def write_config(args: argparse.Namespace) -> Path:
    """kohya's ``--output_config``: the arguments (without secrets) as TOML at ``--config_file``."""
    import tomli_w

    if not args.config_file:
        raise UserError("--output_config needs --config_file naming the TOML file to write")
    path = _config_path(args.config_file)
    if path.exists():
        raise UserError(f"--output_config: {path} exists already; choose another --config_file")
    skip = {"config_file", "output_config"}
    values = {k: v for k, v in without_secrets(vars(args)).items() if v is not None and k not in skip}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(values), encoding="utf-8")
    print(f"saved the arguments to {path}")
    return path


# ---------------------------------------------------------------------------------------------
# options accepted for compatibility that cannot work here


DEEPSPEED = "is a DeepSpeed option; DeepSpeed is not supported"
HUB = "the Hugging Face hub is not supported (this tool works offline); upload or download the files yourself"
REFUSED_OPTIONS = {  # name: why (each option's default is its declaration's)
    "deepspeed": "DeepSpeed is not supported: a Textual Inversion run trains a few vectors and needs no sharding",
    "fp8_base": "not supported: it needs fp8 CUDA kernels and saves little for Textual Inversion",
    **dict.fromkeys(
        (
            "zero_stage",
            "fp16_master_weights_and_gradients",
            "zero3_init_flag",
            "zero3_save_16bit_model",
            "offload_optimizer_device",
            "offload_optimizer_nvme_path",
            "offload_param_device",
            "offload_param_nvme_path",
        ),
        DEEPSPEED,
    ),
    **dict.fromkeys(
        (
            "huggingface_repo_id",
            "huggingface_repo_type",
            "huggingface_path_in_repo",
            "huggingface_token",
            "huggingface_repo_visibility",
            "save_state_to_huggingface",
            "resume_from_huggingface",
            "async_upload",
        ),
        HUB,
    ),
}
NOTHING_TO_PLACE = (
    "only the new embedding rows are trained and synchronised, so there is no large model to place or "
    "to wrap in DDP"
)
NO_EFFECT_OPTIONS = {  # name: why it has nothing to act on here (logged, not refused: kohya setups pass them)
    **dict.fromkeys(("lowram", "ddp_gradient_as_bucket_view", "ddp_static_graph"), NOTHING_TO_PLACE),
    "mem_eff_attn": "attention runs through PyTorch's SDPA, which is memory-efficient already",
}


def refuse_unsupported(args: argparse.Namespace, sdxl: bool = False) -> None:
    """One clear line for each kohya option this trainer cannot honour; info for no-op hints."""
    refuse_options(args, build_parser(sdxl), REFUSED_OPTIONS)
    for name, why in NO_EFFECT_OPTIONS.items():
        if getattr(args, name):
            logger.info("--%s has no effect here: %s", name, why)
    if sdxl:
        if args.v2 or args.v_parameterization:
            raise UserError(
                f"--{'v2' if args.v2 else 'v_parameterization'}: an SD 2.x option; SDXL models are "
                "recognised from the file, remove it"
            )
        if args.clip_skip is not None:
            raise UserError(
                "--clip_skip: SDXL models are always conditioned on the penultimate layer of both text "
                "encoders (kohya ignores the option with a warning); remove --clip_skip"
            )
        if getattr(args, "disable_mmap_load_safetensors", False):
            logger.info("--disable_mmap_load_safetensors: models are always read without a memory map here")


def check_settings(settings: RunSettings) -> None:
    """What every run needs, checked before anything loads; options that do nothing here are named."""
    model, word, data, saving = settings.model, settings.word, settings.data, settings.saving
    if not model.path:
        raise UserError("--pretrained_model_name_or_path is required")
    if not word.token_string:
        raise UserError("--token_string is required")
    if not saving.output_dir and not data.debug_dataset:
        raise UserError("--output_dir is required")
    if word.use_object_template and word.use_style_template:
        raise UserError("--use_object_template and --use_style_template exclude each other; choose one")
    if data.train_data_dir is None and data.dataset_config is None and data.in_json is None:
        raise UserError("no training data: pass --train_data_dir, --in_json or --dataset_config")
    _check_word(word)
    _check_steering(word, settings.steering)
    _check_counts(settings)
    _check_rates(settings.optimizer)
    check_lora_settings(settings.lora)
    name = saving.name(word.token_string)
    if settings.lora.enabled and "." in name:
        raise UserError(
            f"{'--output_name' if saving.output_name else '--token_string'} {name!r}: the LoRA bundles the word as "
            f"bundle_emb.{name}.*, which the WebUI cuts at the first dot; use a name without dots"
        )
    check_output_name(saving.output_name)
    _warn_if_file_word_differs(name, word.token_string)
    settings.tracking.init_kwargs()  # a missing or broken --log_tracker_config, before the model
    if saving.resume and not Path(saving.resume).is_dir():
        raise UserError(
            f"--resume {saving.resume}: no such folder; pass a state folder written by --save_state "
            "(name-state, name-step00000100-state, ...)"
        )
    if settings.sampling.sample_prompts:  # a missing or broken file, before the model
        specs = read_sample_prompts(settings.sampling.sample_prompts)
        if words_in_no_text([word.token_string], [spec.prompt for spec in specs]):
            logger.warning(
                "--sample_prompts %s: no prompt contains the token string '%s', so the samples cannot show "
                "what it learns",
                settings.sampling.sample_prompts,
                word.token_string,
            )
        for spec in specs:
            sampler, steps = (
                spec.sampler or settings.sampling.sample_sampler,
                spec.steps or SAMPLE_DEFAULTS["steps"],
            )
            check_steps(
                sampler, steps, f"--sample_prompts {settings.sampling.sample_prompts}: {spec.prompt!r} with"
            )
    optimizer_class_for(settings.optimizer)  # an unknown optimizer or a missing package, before the model
    if saving.save_model_as == "ckpt":
        logger.warning(
            "--save_model_as ckpt: written as name.ckpt like kohya, but the WebUI, Forge and SD.Next do not "
            "load .ckpt embeddings; use pt or safetensors for them"
        )
    settings.noise.warn_about_unused(model.v_parameterization)
    settings.loss.warn_about_unused()


def _warn_if_file_word_differs(file_stem: str, token_string: str) -> None:
    """The WebUI, ComfyUI and the generators read an embedding's word from its file name, so a
    file named otherwise than the token string is typed by its name, not by the word it learned."""
    if file_stem.lower() != token_string.lower():
        logger.warning(
            "--output_name %s: the WebUI, ComfyUI and gen_img_diffusers.py take an embedding's word from its "
            "file name, so prompts there need '%s', not '%s'; leave --output_name out to type '%s' everywhere",
            file_stem,
            file_stem,
            token_string,
            token_string,
        )


def _check_word(word: WordSettings) -> None:
    """The new word must be one word the tokenizer can add; the init word must be another word."""
    token = word.token_string
    if any(character.isspace() for character in token) or token.strip(",()[]:") != token:
        raise UserError(
            f"--token_string {token!r}: the new word must be a single word without spaces, commas or "
            "brackets, e.g. mychar"
        )
    if word.init_word and any(part.lower() == token.lower() for part in re.split(r"[\s,]+", word.init_word)):
        raise UserError(
            f"--init_word {word.init_word!r} contains the new word {token!r} itself, which has no vectors yet; "
            "start from a word the model knows (e.g. the class: person, dog, style)"
        )


def _check_steering(word: WordSettings, steering: SteeringSettings) -> None:
    """The start and norm controls: each needs what it acts on, and two that fight are refused."""
    if word.cross_init and not word.init_word:
        raise UserError("--cross_init starts from --init_word's output: give --init_word too")
    if word.cross_init and word.weights:
        raise UserError("--cross_init and --weights both choose the start vectors; give one of them")
    if steering.direction_only and steering.preserve_embedding_norm:
        raise UserError(
            "--direction_only and --preserve_embedding_norm both fix the norm; give --direction_only "
            "--direction_norm init to hold the starting norm"
        )
    if steering.direction_norm and not steering.direction_only:
        raise UserError("--direction_norm is --direction_only's norm: give --direction_only too")
    if not (steering.init_pull >= 0 and math.isfinite(steering.init_pull)):
        raise UserError(f"--init_pull {steering.init_pull}: must be 0 (off) or a positive weight")


def _check_counts(settings: RunSettings) -> None:
    """Counts and intervals: at least 1 where 0 would end in a traceback or a run that does nothing."""
    loop, data, saving = settings.loop, settings.data, settings.saving
    at_least_one = {
        "train_batch_size": data.train_batch_size,
        "vae_batch_size": data.vae_batch_size,
        "dataset_repeats": data.dataset_repeats,
        "gradient_accumulation_steps": loop.gradient_accumulation_steps,
        "max_train_epochs": loop.max_train_epochs,
        "save_every_n_steps": saving.save_every_n_steps,
        "save_every_n_epochs": saving.save_every_n_epochs,
        "save_n_epoch_ratio": saving.save_n_epoch_ratio,
        "sample_every_n_steps": settings.sampling.sample_every_n_steps,
        "sample_every_n_epochs": settings.sampling.sample_every_n_epochs,
    }
    for name, value in at_least_one.items():
        if value is not None and value < 1:
            raise UserError(f"--{name} {value}: must be at least 1")
    if loop.max_train_steps < 1 and loop.max_train_epochs is None:
        raise UserError("--max_train_steps must be at least 1")
    if loop.clip_skip is not None and loop.clip_skip < 1:
        raise UserError("--clip_skip must be 1 or more (1 = the last layer)")
    if loop.seed is not None and not 0 <= loop.seed < 2**32:
        raise UserError(
            f"--seed {loop.seed}: must be between 0 and {2**32 - 1} (a 32-bit seed, as kohya's seeding takes)"
        )
    if data.keep_tokens < 0:
        raise UserError(f"--keep_tokens {data.keep_tokens}: must be 0 or more (0 keeps no token in place)")
    if data.max_data_loader_n_workers < 0:
        raise UserError(f"--max_data_loader_n_workers {data.max_data_loader_n_workers}: must be 0 or more")


FLOAT32_MAX = 3.4028234663852886e38  # the vectors are fp32: a larger rate overflows inside the optimizer


def _check_rates(optimizer: OptimizerSettings) -> None:
    for name in ("learning_rate", "max_grad_norm"):
        value = getattr(optimizer, name)
        if not math.isfinite(value) or not 0 <= value <= FLOAT32_MAX:
            raise UserError(f"--{name} {value}: must be a finite number of 0 or more (e.g. 5e-3)")


def check_output_name(name: str | None) -> None:
    """``--output_name`` is a file stem: every save must land inside ``--output_dir``."""
    if name is None:
        return
    if not name or name in (".", "..") or any(sep in name for sep in ("/", "\\")) or name != name.strip():
        raise UserError(
            f"--output_name {name!r}: must be a plain file name without folders (files are written into "
            "--output_dir); to save elsewhere, change --output_dir"
        )


@dataclass(frozen=True)
class RunSettings:
    """The settings of each concern, built once from the command line (``library.options``)."""

    model: ModelSettings
    word: WordSettings
    data: DataOptions
    noise: NoiseSettings
    loss: LossSettings
    optimizer: OptimizerSettings
    loop: LoopSettings
    steering: SteeringSettings
    lora: LoRASettings
    compute: ComputeSettings
    saving: SaveSettings
    metadata: MetadataSettings
    sampling: SampleSettings
    validation: ValidationSettings
    tracking: TrackerSettings
    console: ConsoleSettings
    options: dict = field(repr=False)  # every option as given: what --log_config records (no secrets)


def run_settings(args: argparse.Namespace, sdxl: bool = False) -> RunSettings:
    """Every concern's settings from the parsed options; each checks itself as it is built.
    ``sdxl``: the SDXL trainer's (an SDXL model only, buckets in steps of 32 like kohya's)."""
    return RunSettings(
        # torch.compile keeps tensors that the shared buffer of half-stored weights would overwrite
        model=settings_from(
            ModelSettings,
            args,
            path=args.pretrained_model_name_or_path,
            highvram=args.highvram or args.torch_compile,
            expect_sdxl=sdxl,
        ),
        word=settings_from(WordSettings, args),
        data=settings_from(DataOptions, args, bucket_reso_multiple=32 if sdxl else 64),
        noise=settings_from(NoiseSettings, args),
        loss=settings_from(LossSettings, args),
        optimizer=settings_from(OptimizerSettings, args),
        loop=settings_from(LoopSettings, args),
        steering=settings_from(SteeringSettings, args),
        lora=settings_from(LoRASettings, args),
        compute=settings_from(ComputeSettings, args),
        saving=settings_from(SaveSettings, args),
        metadata=settings_from(MetadataSettings, args),
        sampling=settings_from(SampleSettings, args),
        validation=settings_from(ValidationSettings, args),
        tracking=settings_from(TrackerSettings, args),
        console=settings_from(ConsoleSettings, args),
        options=without_secrets(vars(args)),
    )


def check_command_line(sdxl: bool = False) -> None:
    """``settings_from_command_line``'s checks of this process's command line, saying nothing but
    a mistake: the entry scripts call it before they import the libraries a run needs (seconds),
    so that a mistaken option is answered at once; the run then reads the options again and logs
    what they call for, once. Logging is left as it was found (a ``--console_log_file`` closed)."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    logging.disable(logging.CRITICAL)
    try:
        settings_from_command_line(None, sdxl)
    finally:
        logging.disable(logging.NOTSET)
        for handler in root.handlers:
            if handler not in handlers:
                handler.close()
        root.handlers[:], root.level = handlers, level


def settings_from_command_line(argv: list[str] | None = None, sdxl: bool = False) -> RunSettings:
    """The command line (and ``--config_file``) as settings, checked; console logging is set up first,
    so that what the checks say reaches the user's log. ``sdxl``: the SDXL trainer's command line."""
    args = parse_args(argv, sdxl)
    setup_console_logging(settings_from(ConsoleSettings, args))
    refuse_unsupported(args, sdxl)
    settings = run_settings(args, sdxl)
    check_settings(settings)
    refuse_impossible_numbers(args, build_parser(sdxl))
    return settings
