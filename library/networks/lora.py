"""LoRA networks in kohya's layout (sd-scripts ``networks.lora``): layer names, adapters, files.

A kohya LoRA file holds, for each adapted layer ``<name>``, ``<name>.lora_down.weight``
(``[dim, in]``, or ``[dim, in, kh, kw]`` for a convolution), ``<name>.lora_up.weight``
(``[out, dim]`` or ``[out, dim, 1, 1]``) and ``<name>.alpha``; the layer's output gains
``multiplier * alpha / dim * up(down(x))``. ``<name>`` is the layer's module path, dots written
as underscores, behind a prefix:

* ``lora_unet_`` and diffusers' UNet path on SD 1.x/2.x (``lora_unet_down_blocks_0_attentions_0_proj_in``),
  the original LDM path on SDXL (``lora_unet_input_blocks_4_1_proj_in``, kohya's SDXL UNet keeps
  those names);
* the family's text prefixes (``lora_te_`` on SD 1.x/2.x; ``lora_te1_`` and ``lora_te2_`` on
  SDXL) and the transformers path (``text_model_encoder_layers_0_self_attn_q_proj``).

A file may also bundle embeddings as the WebUI reads them: ``bundle_emb.<word>.<key>``.

The adapters run beside the frozen layers (a forward hook adds their output), so no frozen weight
is ever rewritten, whatever dtype or storage it has.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

from library.embeddings.formats import LoadedEmbedding, bundled_embedding
from library.errors import UserError
from library.files import write_atomically

logger = logging.getLogger(__name__)

UNET_PREFIX = "lora_unet"
BUNDLE_PREFIX = "bundle_emb."
# kohya's networks.lora adapts, in the UNet, the linear and 1x1 layers inside these blocks, and
# with network_args conv_dim also every layer of these (3x3 convolutions at conv_dim's rank)
DEFAULT_UNET_BLOCKS = ("Transformer2DModel",)
CONV_UNET_BLOCKS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
LORA_PARTS = ("lora_down.weight", "lora_up.weight", "alpha")
# other networks' keys, to name them when refused
OTHER_NETWORKS = {
    "hada_w1_a": "LyCORIS LoHa",
    "lokr_w1": "LyCORIS LoKr",
    "oft_blocks": "OFT",
    "dora_scale": "DoRA",
}


def layer_names(model) -> dict[str, nn.Module]:
    """Every linear and convolution layer of the model's UNet and text encoders, by kohya LoRA name."""
    # imported here: it imports diffusers, and option parsing imports this module
    from library.models.ldm_export import unet_key_to_ldm

    names = {}
    for path, module in model.unet.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            if model.family.lora_unet_ldm_names:
                path = unet_key_to_ldm(path + ".weight", model.unet.config).removesuffix(".weight")
            names[f"{UNET_PREFIX}_{path.replace('.', '_')}"] = module
    for prefix, encoder in zip(model.family.lora_text_prefixes, model.text_encoders):
        for path, module in encoder.named_modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                names[f"{prefix}_{_with_text_model(path).replace('.', '_')}"] = module
    return names


def _with_text_model(path: str) -> str:
    """kohya names the encoder's layers under ``text_model`` (transformers 4's nesting), which
    transformers 5's ``CLIPTextModel`` no longer has."""
    if path.startswith(("text_model.", "text_projection")):
        return path
    return "text_model." + path


def default_unet_layers(model, with_convs: bool = False) -> dict[str, nn.Module]:
    """The UNet layers kohya's ``networks.lora`` trains: the linear and 1x1 layers of its
    transformer blocks (attention projections, feed-forward, proj_in/proj_out); ``with_convs``
    (kohya's ``conv_dim``) adds every linear and convolution of the ResNet, down- and upsampling
    blocks."""
    by_module = {id(module): name for name, module in layer_names(model).items()}
    blocks = DEFAULT_UNET_BLOCKS + (CONV_UNET_BLOCKS if with_convs else ())
    chosen = {}
    for block in model.unet.modules():
        if type(block).__name__ in blocks:
            for module in block.modules():
                one_by_one = isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1)
                wide_conv = with_convs and isinstance(module, nn.Conv2d)
                if isinstance(module, nn.Linear) or one_by_one or wide_conv:
                    chosen[by_module[id(module)]] = module
    return chosen


def is_wide_conv(layer: nn.Module) -> bool:
    """A convolution with a kernel larger than 1x1: kohya gives it ``conv_dim``'s rank and alpha."""
    return isinstance(layer, nn.Conv2d) and layer.kernel_size != (1, 1)


class LoRAAdapter(nn.Module):
    """``multiplier * alpha / dim * up(down(x))``, added to one frozen layer's output.

    ``down`` has the layer's input width, kernel, stride and padding; ``up`` starts at zero when
    created for training, so a new network changes nothing before its first step (kohya's init).
    """

    def __init__(self, layer: nn.Module, dim: int, alpha: float):
        super().__init__()
        if isinstance(layer, nn.Conv2d):
            self.lora_down = nn.Conv2d(
                layer.in_channels, dim, layer.kernel_size, layer.stride, layer.padding, bias=False
            )
            self.lora_up = nn.Conv2d(dim, layer.out_channels, 1, bias=False)
        else:
            self.lora_down = nn.Linear(layer.in_features, dim, bias=False)
            self.lora_up = nn.Linear(dim, layer.out_features, bias=False)
        nn.init.zeros_(self.lora_up.weight)
        self.register_buffer("alpha", torch.tensor(float(alpha)))  # saved in the file as kohya's
        self.scale = float(alpha) / dim  # a number here: reading the buffer would sync a GPU every call
        self.multiplier = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.lora_down.weight.device != x.device:  # follows its layer (not its submodule) to the device
            self.to(x.device)
        weight_dtype = self.lora_down.weight.dtype
        out = self.lora_up(self.lora_down(x.to(weight_dtype)))
        return (out * (self.multiplier * self.scale)).to(x.dtype)


class LoRANetwork(nn.Module):
    """Adapters by kohya name, attached to the model's layers with forward hooks."""

    def __init__(self, adapters: dict[str, LoRAAdapter], layers: dict[str, nn.Module]):
        super().__init__()
        self.adapters = nn.ModuleDict(adapters)
        self._layers = {name: layers[name] for name in adapters}  # not submodules: not saved, not trained
        self._hooks: list = []

    @classmethod
    def create(
        cls, layers: dict[str, nn.Module], dim: int, alpha: float, conv: tuple[int, float] | None = None
    ) -> LoRANetwork:
        """A fresh network over ``layers`` (e.g. ``default_unet_layers(model)``); ``conv``: the rank
        and alpha of the 3x3 convolutions among them (kohya's ``conv_dim``, ``conv_alpha``)."""
        adapters = {}
        for name, layer in layers.items():
            rank, scale = conv if conv is not None and is_wide_conv(layer) else (dim, alpha)
            adapters[name] = LoRAAdapter(layer, rank, scale)
        return cls(adapters, layers)

    def attach(self) -> LoRANetwork:
        for name, adapter in self.adapters.items():
            self._hooks.append(self._layers[name].register_forward_hook(_adds(adapter)))
        return self

    def detach(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()

    def set_multiplier(self, multiplier: float) -> None:
        for adapter in self.adapters.values():
            adapter.multiplier = multiplier

    def kohya_state_dict(self) -> dict[str, torch.Tensor]:
        """``<name>.lora_down.weight``, ``<name>.lora_up.weight``, ``<name>.alpha`` (kohya's keys)."""
        return {
            f"{name}.{key}": value.detach().to("cpu").contiguous()
            for name, adapter in self.adapters.items()
            for key, value in adapter.state_dict().items()
        }


def lora_file_tensors(
    network: LoRANetwork, bundle: dict[str, dict[str, torch.Tensor]], dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """A LoRA file's tensors: the network's in kohya's keys (in ``dtype``, as kohya saves at
    ``--save_precision``) and each bundled embedding's rows as ``bundle_emb.<word>.<key>``, with the
    embedding-file keys the WebUI reads (``emb_params``; SDXL ``clip_l`` and ``clip_g``)."""
    tensors = {key: value.to(dtype) for key, value in network.kohya_state_dict().items()}
    for word, parts in bundle.items():
        for key, rows in parts.items():
            tensors[f"{BUNDLE_PREFIX}{word}.{key}"] = rows.detach().to("cpu", dtype).contiguous()
    return tensors


def save_lora_file(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write a ``.safetensors`` LoRA atomically, with the two hashes kohya precomputes for galleries
    (``sshs_model_hash``: sha256 of the tensor bytes of the file written with only its ``ss_*``
    metadata; ``sshs_legacy_hash``: the 8-hex hash of 64 KiB at 1 MiB of that file)."""
    training = {key: value for key, value in metadata.items() if key.startswith("ss_")}
    reference = safetensors.torch.save(tensors, training)
    header = int.from_bytes(reference[:8], "little")
    hashes = {
        "sshs_model_hash": hashlib.sha256(reference[8 + header :]).hexdigest(),
        "sshs_legacy_hash": hashlib.sha256(reference[0x100000 : 0x100000 + 0x10000]).hexdigest()[:8],
    }
    payload = safetensors.torch.save(tensors, {**metadata, **hashes})
    write_atomically(path, lambda f: f.write(payload))


def load_kohya_state_dict(network: LoRANetwork, tensors: dict[str, torch.Tensor]) -> None:
    """Put ``kohya_state_dict`` tensors back into a network of the same layers and ranks;
    ``ValueError`` naming the first difference otherwise."""
    expected = network.kohya_state_dict()
    if set(tensors) != set(expected):
        missing = sorted(set(expected) ^ set(tensors))[0]
        raise ValueError(f"the layers differ ({missing})")
    for key, value in expected.items():
        if tensors[key].shape != value.shape:
            raise ValueError(f"{key} is {list(tensors[key].shape)}, not {list(value.shape)}")
        if key.endswith(".alpha") and float(tensors[key]) != float(value):
            raise ValueError(f"{key} is {float(tensors[key]):g}, not {float(value):g}")
    with torch.no_grad():
        for name, adapter in network.adapters.items():
            adapter.lora_down.weight.copy_(tensors[f"{name}.lora_down.weight"])
            adapter.lora_up.weight.copy_(tensors[f"{name}.lora_up.weight"])


def _adds(adapter: LoRAAdapter):
    def hook(_module, args, output):
        return output + adapter(args[0])

    return hook


# ---------------------------------------------------------------------------------------------
# Files


@dataclass
class LoRAFile:
    """A kohya LoRA file's parts: each layer's tensors, bundled embeddings by word, metadata."""

    path: Path
    layers: dict[str, dict[str, torch.Tensor]]
    bundled: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)


def read_lora_file(path: str | os.PathLike) -> LoRAFile:
    """A ``.safetensors`` (or ``.ckpt``/``.pt`` of tensors) LoRA file; one-line ``UserError`` when it is none."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--network_weights {path}: file not found")
    tensors, metadata = _read_tensors(path)
    layers: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    bundled: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for key, value in tensors.items():
        if key.startswith(BUNDLE_PREFIX):
            word, _, rest = key[len(BUNDLE_PREFIX) :].partition(".")
            bundled[word][rest] = value
            continue
        name, _, part = key.partition(".")
        other = next((label for marker, label in OTHER_NETWORKS.items() if marker in part), None)
        if other:
            raise UserError(
                f"--network_weights {path}: a {other} network; only kohya's networks.lora files are read"
            )
        if part in LORA_PARTS:
            layers[name][part] = value
    if not layers:
        raise UserError(f"--network_weights {path}: not a LoRA file (no '*.lora_down.weight' tensors)")
    for name, parts in layers.items():
        if "lora_down.weight" not in parts or "lora_up.weight" not in parts:
            raise UserError(
                f"--network_weights {path}: layer {name} lacks lora_down or lora_up; the file is damaged"
            )
    return LoRAFile(path, dict(layers), dict(bundled), metadata)


def _read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if path.suffix.lower() == ".safetensors":
        try:
            with safetensors.safe_open(str(path), framework="pt", device="cpu") as f:
                return {key: f.get_tensor(key) for key in f.keys()}, dict(f.metadata() or {})
        except Exception as exc:  # safetensors raises its own error type for every kind of damage
            raise UserError(f"--network_weights {path}: not a readable .safetensors file ({exc})") from exc
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # tensors only: never runs code
    except Exception as exc:
        raise UserError(f"--network_weights {path}: not a LoRA file of tensors ({str(exc)[:200]})") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"--network_weights {path}: not a LoRA file of tensors")
    return state, {}


def network_from_file(lora: LoRAFile, model) -> LoRANetwork:
    """The file's adapters for ``model``'s layers; a file for another model ends in one line."""
    layers = layer_names(model)
    unknown = [name for name in lora.layers if name not in layers]
    if unknown:
        raise UserError(f"--network_weights {lora.path}: {_mismatch(lora, unknown, model)}")
    adapters = {}
    for name, parts in lora.layers.items():
        layer = layers[name]
        down, up = parts["lora_down.weight"], parts["lora_up.weight"]
        dim = int(down.shape[0])
        alpha = float(parts["alpha"]) if "alpha" in parts else float(dim)  # kohya: no alpha means alpha = dim
        adapter = LoRAAdapter(layer, dim, alpha)
        for target, value, what in ((adapter.lora_down, down, "lora_down"), (adapter.lora_up, up, "lora_up")):
            if value.numel() != target.weight.numel():
                raise UserError(
                    f"--network_weights {lora.path}: {name}.{what} is {list(value.shape)}, the model's layer "
                    f"needs {list(target.weight.shape)}: a LoRA for another model (dimension mismatch)"
                )
            with torch.no_grad():  # a 1x1 convolution and a linear layer hold the same numbers
                target.weight.copy_(value.reshape(target.weight.shape).float())
        adapters[name] = adapter
    return LoRANetwork(adapters, layers)


def _mismatch(lora: LoRAFile, unknown: list[str], model) -> str:
    """Why the file's layer names are not this model's: another family when its names say so."""
    names = list(lora.layers)
    sdxl_names = any(n.startswith(("lora_te1_", "lora_te2_", "lora_unet_input_blocks_")) for n in names)
    sd_names = any(n.startswith(("lora_te_", "lora_unet_down_blocks_")) for n in names)
    made_for = "SDXL" if sdxl_names else "SD 1.x/2.x" if sd_names else None
    if made_for and made_for != ("SDXL" if model.family.name == "sdxl" else "SD 1.x/2.x"):
        return f"a LoRA for {made_for}, but the model is {model.family.label}; use a LoRA made for this model"
    more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
    return f"layer {unknown[0]}{more} is not in this model: a LoRA for another model or architecture"


def bundled_embeddings(lora: LoRAFile) -> list[tuple[str, LoadedEmbedding]]:
    """The embeddings the file bundles, each under its word (``bundle_emb.<word>.*``)."""
    return [
        (f"{lora.path} (bundle_emb.{word})", bundled_embedding(parts, f"{lora.path}:{word}", word))
        for word, parts in lora.bundled.items()
    ]


def attach_lora_files(model, loras: list[LoRAFile], multipliers: list[float], show_meta: bool = False):
    """Each file's adapters on the model's layers at its strength (``--network_mul``)."""
    networks = []
    for lora, multiplier in zip(loras, multipliers):
        if show_meta:
            for key, value in sorted(lora.metadata.items()):
                logger.info(
                    "%s metadata %s: %s", lora.path, key, value if len(value) <= 300 else value[:300] + "..."
                )
        network = network_from_file(lora, model)
        network.set_multiplier(multiplier)
        network.attach()
        logger.info("LoRA %s: %d layers at strength %g", lora.path, len(network.adapters), multiplier)
        networks.append(network)
    return networks
