"""The dataset layer: kohya-compatible image folders, captions, TOML configs, buckets, augmentation,
latent cache and ``--debug_dataset``.

Modules, one concern each:
- ``args``: the command-line options (kohya's names, types and defaults)
- ``config``: ``--dataset_config`` schema and loading, the subset -> dataset -> general -> CLI lookup
- ``sources``: DreamBooth folders, regularization folders, fine-tuning JSON/JSONL metadata
- ``images``: image files and sizes, resizing, face boxes (pixels are read by ``library.images``)
- ``captions``: caption files, kohya's caption processing, the Textual Inversion caption rules
- ``buckets``: bucket resolutions, each image's bucket, the per-epoch batch order
- ``augment``: per-item random streams, crops, face crops, flips, colour changes
- ``latent_cache``: memory and ``.npz`` latent caches shared with kohya
- ``debug``: ``--debug_dataset`` printing and contact sheets
- ``dataset``: ``TrainDataset``, the batches of an epoch, tying them together
- ``build``: ``build_train_dataset``, a run's dataset from the options, checked before the model loads
"""

from library.training.dataset.args import add_dataset_arguments, parse_resolution
from library.training.dataset.build import build_train_dataset
from library.training.dataset.captions import OBJECT_TEMPLATES, STYLE_TEMPLATES, TokenCaptionRule
from library.training.dataset.dataset import TrainDataset, collate_batch, make_train_dataloader

__all__ = [
    "OBJECT_TEMPLATES",
    "STYLE_TEMPLATES",
    "TokenCaptionRule",
    "TrainDataset",
    "add_dataset_arguments",
    "build_train_dataset",
    "collate_batch",
    "make_train_dataloader",
    "parse_resolution",
]
