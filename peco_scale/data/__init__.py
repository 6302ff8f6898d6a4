"""Data: the batch interface and its three backends, sampling, masking, the demo dataset.

Modules (each imports only those listed before it, so there are no cycles):

- ``spec``: the batch contract, ``AugmentSpec``, ``TASKS``/``BACKENDS``, the ``BatchLoader``
  protocol, ``ShardedPosition``, ``DataError``.
- ``sampling``: SplitMix64 seeds (``sample_seed``), ``SeededRng``, ``ShardedSampler``.
- ``colour``, ``masking``, ``mim``: 8-bit RGB conversion, flip + jitter, block masks, the
  stage-2 two-view transform.
- ``folder`` (default backend, ImageFolder scanning and datasets), ``ffcv_backend``,
  ``dali_backend``: one module per backend; ``loaders.make_loader`` picks one by name.
- ``segmentation``: the ADE20K layout (scan, labels, mmseg's training pipeline, evaluation
  images); ``eval`` (evaluation batches), ``demo`` (offline demo dataset), ``dense_demo`` (scenes with
  exact label maps and COCO instances), ``bench`` (loader benchmark), ``__main__`` (the CLI:
  ``python -m peco_scale.data demo|dense-demo|scan|convert``).
"""

from .demo import DEMO_CLASSES, make_demo_dataset
from .folder import (
    IMG_EXTENSIONS,
    ImageFolderDataset,
    ImageListDataset,
    collate_readable,
    denormalize,
    iterate_loader,
    load_rgb,
    resolve_image_root,
    scan_image_folder,
    tokenizer_transform,
)
from .loaders import make_loader
from .sampling import ShardedSampler, sample_seed
from .spec import AugmentSpec, DataError

__all__ = [
    "DEMO_CLASSES",
    "IMG_EXTENSIONS",
    "AugmentSpec",
    "DataError",
    "ImageFolderDataset",
    "ImageListDataset",
    "ShardedSampler",
    "collate_readable",
    "denormalize",
    "iterate_loader",
    "load_rgb",
    "make_demo_dataset",
    "make_loader",
    "resolve_image_root",
    "sample_seed",
    "scan_image_folder",
    "tokenizer_transform",
]
