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
from dataclasses import dataclass
from pathlib import Path

from library.errors import UserError
from library.files import tomllib
from library.generation.samplers import SAMPLER_NAMES
from library.options import default_of, settings_from
from library.runtime import refuse_options
from library.training.dataset import add_dataset_arguments
from library.training.dataset.args import DataOptions
from library.training.loss import LossSettings, add_loss_arguments
from library.training.noise import NoiseSettings, add_noise_arguments
from library.training.optimizers import OptimizerSettings, add_optimizer_arguments
from library.training.samples import SampleSettings
from library.training.tracking import TrackerSettings
from library.training.validation import ValidationSettings

logger = logging.getLogger(__name__)


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model")
    g.add_argument(
        "--pretrained_model_name_or_path",
        type=str,
        default=None,
        help="SD 1.x/2.x checkpoint (.safetensors/.ckpt) or diffusers folder",
    )
    g.add_argument(
        "--v2", action="store_true", help="the model is SD 2.x (detected from the file; a mismatch warns)"
    )
    g.add_argument("--v_parameterization", action="store_true", help="v-prediction model (SD 2.x 768-v)")
    g.add_argument("--vae", type=str, default=None, help="replace the model's VAE (file or folder)")
    g.add_argument("--tokenizer_cache_dir", type=str, default=None, help="kohya-style tokenizer cache folder")
    g.add_argument("--fp8_base", action="store_true", help="refused: needs fp8 CUDA kernels")
    g.add_argument("--lowram", action="store_true", help="kohya memory hint; no effect here (logged)")
    g.add_argument("--highvram", action="store_true",
                   help="memory is plentiful: keep the frozen weights in fp32, not the file's exact fp16 "
                   "(faster small fp32 steps on a CPU, +1.9 GB for SD 1.5)")  # fmt: skip


def _textual_inversion_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("textual inversion")
    g.add_argument("--token_string", type=str, default=None, help="the new word, e.g. mychar (required)")
    g.add_argument(
        "--init_word",
        type=str,
        default=None,
        help="word or phrase the vectors start from (see --init_word_mode for a phrase)",
    )
    g.add_argument(
        "--init_word_mode",
        type=str,
        default="cycle",
        choices=["cycle", "spread", "mean"],
        help="a phrase over the vectors: cycle (kohya: token i %% k), spread (the WebUI: in order, "
        "each token a run of vectors) or mean (every vector the phrase's mean); not a kohya option",
    )
    g.add_argument("--num_vectors_per_token", type=int, default=1, help="vectors (tokens) the word uses")
    g.add_argument("--weights", type=str, default=None, help="continue from an embedding file of any layout")
    g.add_argument("--use_object_template", action="store_true", help="captions from the object templates")
    g.add_argument("--use_style_template", action="store_true", help="captions from the style templates")
    g.add_argument(
        "--save_model_as",
        type=str,
        default="pt",
        choices=[None, "ckpt", "pt", "safetensors"],
        help="embedding file format: .pt/.ckpt in the WebUI layout, or .safetensors",
    )
    g.add_argument("--no_half_vae", action="store_true", help="keep the VAE in fp32 under mixed precision")


def _training_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("training loop")
    g.add_argument("--max_train_steps", type=int, default=1600)
    g.add_argument("--max_train_epochs", type=int, default=None, help="overrides --max_train_steps")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--clip_skip", type=int, default=None, help="use the k-th text encoder layer from the end")

    g = parser.add_argument_group("precision, memory, distributed")
    g.add_argument("--mixed_precision", type=str, default="no", choices=["no", "fp16", "bf16"])
    g.add_argument("--full_fp16", action="store_true", help="frozen models in fp16; the vectors stay fp32")
    g.add_argument("--full_bf16", action="store_true", help="frozen models in bf16; the vectors stay fp32")
    g.add_argument("--gradient_checkpointing", action="store_true")
    g.add_argument("--xformers", action="store_true", help="xformers attention (CUDA only; else SDPA)")
    g.add_argument("--sdpa", action="store_true", help="PyTorch SDPA attention (the default)")
    g.add_argument(
        "--mem_eff_attn", action="store_true", help="memory-efficient attention (SDPA provides it)"
    )
    g.add_argument("--torch_compile", action="store_true")
    g.add_argument("--dynamo_backend", type=str, default="inductor",
                   choices=["eager", "aot_eager", "inductor", "aot_ts_nvfuser", "nvprims_nvfuser", "cudagraphs",
                            "ofi", "fx2trt", "onnxrt", "tensort", "ipex", "tvm"])  # fmt: skip
    g.add_argument("--ddp_timeout", type=int, default=None, help="minutes before a process group times out")
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
    g.add_argument("--output_dir", type=str, default=None)
    g.add_argument("--output_name", type=str, default=None, help="file stem = the word in the WebUI/ComfyUI")
    g.add_argument("--save_precision", type=str, default=None, choices=[None, "float", "fp16", "bf16"])
    g.add_argument("--save_every_n_epochs", type=int, default=None)
    g.add_argument("--save_every_n_steps", type=int, default=None)
    g.add_argument("--save_n_epoch_ratio", type=int, default=None, help="save about this many times in all")
    g.add_argument("--save_last_n_epochs", type=int, default=None)
    g.add_argument("--save_last_n_epochs_state", type=int, default=None)
    g.add_argument("--save_last_n_steps", type=int, default=None)
    g.add_argument("--save_last_n_steps_state", type=int, default=None)
    g.add_argument("--save_state", action="store_true", help="also save a resumable state with each save")
    g.add_argument("--save_state_on_train_end", action="store_true")
    g.add_argument("--resume", type=str, default=None, help="a state folder written by --save_state")
    for name in ("title", "author", "description", "license", "tags", "trigger_phrase", "usage_hint",
                 "merged_from", "preprocessor", "thumbnail", "is_negative_embedding"):  # fmt: skip
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
    g.add_argument(
        "--preserve_embedding_norm",
        action="store_true",
        help="after every step, scale each vector back to its starting norm; not a kohya option",
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
    g.add_argument("--console_log_level", type=str, default=None,
                   choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"])  # fmt: skip
    g.add_argument("--console_log_file", type=str, default=None)
    g.add_argument("--console_log_simple", action="store_true")
    g.add_argument(
        "--config_file", type=str, default=None, help="TOML file of arguments (the command line wins)"
    )
    g.add_argument(
        "--output_config", action="store_true", help="write the arguments to --config_file and stop"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="train_textual_inversion.py",
        description="Train a Textual Inversion embedding for Stable Diffusion 1.x/2.x (kohya-compatible).",
    )
    _model_arguments(parser)
    _textual_inversion_arguments(parser)
    add_dataset_arguments(parser)
    _training_arguments(parser)
    add_noise_arguments(parser)
    add_loss_arguments(parser)
    add_optimizer_arguments(parser)
    _saving_arguments(parser)
    _sample_arguments(parser)
    _validation_arguments(parser)
    _logging_arguments(parser)
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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line over ``--config_file`` values; handle ``--output_config``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.output_config:
        write_config(args)
        raise SystemExit(0)
    if args.config_file:
        path = _config_path(args.config_file)
        if not path.is_file():
            raise UserError(f"--config_file {path}: not found")
        try:
            values = _flatten(tomllib.loads(path.read_text(encoding="utf-8")), path)
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
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
    skip = {"config_file", "output_config", "wandb_api_key", "huggingface_token"}
    values = {k: v for k, v in vars(args).items() if v is not None and k not in skip}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(values), encoding="utf-8")
    print(f"saved the arguments to {path}")
    return path


# ---------------------------------------------------------------------------------------------
# options accepted for compatibility that cannot work here


DEEPSPEED = "is a DeepSpeed option; DeepSpeed is not supported"
HUB = "the Hugging Face hub is not supported (this tool works offline); upload or download the files yourself"
REFUSED_OPTIONS = {  # name: (default, why)
    "deepspeed": (False, "DeepSpeed is not supported: a Textual Inversion run trains a few vectors and needs no sharding"),
    "fp8_base": (False, "not supported: it needs fp8 CUDA kernels and saves little for Textual Inversion"),
    **{name: (default, DEEPSPEED) for name, default in (
        ("zero_stage", 2), ("fp16_master_weights_and_gradients", False), ("zero3_init_flag", False),
        ("zero3_save_16bit_model", False), ("offload_optimizer_device", None), ("offload_optimizer_nvme_path", None),
        ("offload_param_device", None), ("offload_param_nvme_path", None))},
    **{name: (default, HUB) for name, default in (
        ("huggingface_repo_id", None), ("huggingface_repo_type", None), ("huggingface_path_in_repo", None),
        ("huggingface_token", None), ("huggingface_repo_visibility", None), ("save_state_to_huggingface", False),
        ("resume_from_huggingface", False), ("async_upload", False))},
}  # fmt: skip
NO_EFFECT_OPTIONS = ("lowram", "ddp_gradient_as_bucket_view", "ddp_static_graph")


def refuse_unsupported(args: argparse.Namespace) -> None:
    """One clear line for each kohya option this trainer cannot honour; info for no-op hints."""
    refuse_options(args, REFUSED_OPTIONS)
    for name in NO_EFFECT_OPTIONS:
        if getattr(args, name):
            logger.info(
                "--%s has no effect here: only the new embedding rows are trained and synchronised, "
                "so there is no large model to place or to wrap in DDP",
                name,
            )


def check_training_arguments(args: argparse.Namespace) -> None:
    """The options every run needs, checked before anything loads."""
    for flag in ("pretrained_model_name_or_path", "token_string"):
        if not getattr(args, flag):
            raise UserError(f"--{flag} is required")
    if not args.output_dir and not args.debug_dataset:
        raise UserError("--output_dir is required")
    if args.use_object_template and args.use_style_template:
        raise UserError("--use_object_template and --use_style_template exclude each other; choose one")
    if args.train_data_dir is None and args.dataset_config is None and args.in_json is None:
        raise UserError("no training data: pass --train_data_dir, --in_json or --dataset_config")
    if args.gradient_accumulation_steps < 1:
        raise UserError("--gradient_accumulation_steps must be at least 1")
    if args.max_train_steps < 1 and args.max_train_epochs is None:
        raise UserError("--max_train_steps must be at least 1")
    if args.clip_skip is not None and args.clip_skip < 1:
        raise UserError("--clip_skip must be 1 or more (1 = the last layer)")
    if args.save_model_as == "ckpt":
        logger.warning(
            "--save_model_as ckpt: written as name.ckpt like kohya, but the WebUI, Forge and SD.Next do not "
            "load .ckpt embeddings; use pt or safetensors for them"
        )


@dataclass(frozen=True)
class RunSettings:
    """The settings of each concern, built once from the command line (``library.options``)."""

    data: DataOptions
    noise: NoiseSettings
    loss: LossSettings
    optimizer: OptimizerSettings
    sampling: SampleSettings
    tracking: TrackerSettings
    validation: ValidationSettings


def run_settings(args: argparse.Namespace) -> RunSettings:
    """Every concern's settings from the parsed options; each checks itself as it is built."""
    return RunSettings(
        data=settings_from(DataOptions, args),
        noise=settings_from(NoiseSettings, args),
        loss=settings_from(LossSettings, args),
        optimizer=settings_from(OptimizerSettings, args),
        sampling=settings_from(SampleSettings, args),
        tracking=settings_from(TrackerSettings, args),
        validation=settings_from(ValidationSettings, args),
    )
