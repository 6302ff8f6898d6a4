"""Data: ImageFolder scanning/loading, seeded augmentation, sharded sampling, demo dataset."""

from .demo import DEMO_CLASSES, make_demo_dataset
from .folder import (
    IMG_EXTENSIONS,
    DataError,
    ImageFolderDataset,
    ShardedSampler,
    denormalize,
    sample_seed,
    scan_image_folder,
    tokenizer_transform,
)

__all__ = [
    "DEMO_CLASSES",
    "IMG_EXTENSIONS",
    "DataError",
    "ImageFolderDataset",
    "ShardedSampler",
    "denormalize",
    "make_demo_dataset",
    "sample_seed",
    "scan_image_folder",
    "tokenizer_transform",
]
