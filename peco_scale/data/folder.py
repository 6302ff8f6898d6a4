"""ImageFolder loading for tokenizer training: scanning, robust decoding, seeded augmentation,
and a rank-sharded, resumable sampler.

Determinism contract (needed for exact mid-epoch resume under DeepSpeed):
``ShardedSampler`` yields ``(index, sample_seed)`` pairs whose order depends only on
``(seed, epoch, rank, world_size, batch_size)``, and ``ImageFolderDataset`` seeds the
augmentation RNGs from ``sample_seed`` right before the transform. So the tensor for a sample
is a pure function of ``(index, sample_seed)``, whichever DataLoader worker builds it.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms as T

from .colour import to_rgb

log = logging.getLogger(__name__)

IMG_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
_MASK64 = (1 << 64) - 1
_MASK63 = (1 << 63) - 1


class DataError(ValueError):
    """Bad dataset input (missing folder, no images, impossible batch split, ...).

    Messages are one line naming the offending value and how to fix it.
    """


def is_image_file(path: str | os.PathLike[str]) -> bool:
    """True if the file name has an image extension (case-insensitive)."""
    return str(path).lower().endswith(IMG_EXTENSIONS)


# ----------------------------------------------------------------------------- scanning


def _missing_msg(root: Path, what: str) -> str:
    return (f"data folder '{root}' {what}; pass --data pointing to an ImageFolder tree "
            f"(root/<class>/<image>) or run `python -m peco_scale.data demo --out {root}`")


def resolve_image_root(root: str | os.PathLike[str]) -> Path:
    """``root/train`` if that folder exists, else ``root``; DataError if neither is a folder."""
    path = Path(root)
    if not path.is_dir():
        raise DataError(_missing_msg(path, "does not exist" if not path.exists() else
                                     "is not a directory"))
    return path / "train" if (path / "train").is_dir() else path


def scan_image_folder(root: str | os.PathLike[str]) -> tuple[list[tuple[str, int]], list[str], int]:
    """List an ImageFolder tree without decoding anything.

    Accepts ``root/<class>/...`` or ``root/train/<class>/...``. Class folders are the
    non-hidden sub-directories of the image root, sorted; files are found recursively
    (following symlinks) and sorted by relative path, so the result is deterministic.

    Returns:
        samples: list of (path, class_index), length N.
        classes: sorted class names; class_index indexes this list.
        n_ignored: files skipped because their extension is not in IMG_EXTENSIONS
            (including stray files directly under the image root).
    """
    base = resolve_image_root(root)
    with os.scandir(base) as it:
        entries = sorted(it, key=lambda e: e.name)
    classes = [e.name for e in entries if e.is_dir() and not e.name.startswith(".")]
    n_ignored = sum(1 for e in entries if not e.is_dir())
    samples: list[tuple[str, int]] = []
    for idx, cls in enumerate(classes):
        for dirpath, dirnames, filenames in sorted(os.walk(base / cls, followlinks=True)):
            dirnames.sort()
            for name in sorted(filenames):
                if is_image_file(name):
                    samples.append((os.path.join(dirpath, name), idx))
                else:
                    n_ignored += 1
    if not samples:
        if n_ignored and not classes:
            what = f"has files but no class sub-folders (move the images into '{base}/<class>/')"
        else:
            exts = "/".join(e.lstrip(".") for e in IMG_EXTENSIONS)
            what = f"contains no images ({exts}) in its {len(classes)} class sub-folders"
        raise DataError(_missing_msg(base, what))
    return samples, classes, n_ignored


# ----------------------------------------------------------------------------- seeding


def _splitmix64(x: int) -> int:
    """One SplitMix64 step: a cheap, well-mixed 64-bit hash of a 64-bit int."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _splitmix64_np(x: np.ndarray) -> np.ndarray:
    """Vectorised SplitMix64 over a uint64 array (numpy array arithmetic wraps mod 2**64)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _epoch_key(seed: int, epoch: int) -> int:
    return _splitmix64(_splitmix64(seed & _MASK64) ^ (epoch & _MASK64))


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The 63-bit augmentation seed of sample ``index`` in ``epoch`` (what ShardedSampler yields)."""
    return _splitmix64(_epoch_key(seed, epoch) ^ (index & _MASK64)) & _MASK63


def _sample_seeds(seed: int, epoch: int, indices: np.ndarray) -> np.ndarray:
    """``sample_seed`` for an int64 array of indices, vectorised; same values as the scalar."""
    key = np.uint64(_epoch_key(seed, epoch))
    out = _splitmix64_np(indices.astype(np.uint64) ^ key) & np.uint64(_MASK63)
    return out.astype(np.int64)


class _SeededRng:
    """Seed torch / random / numpy global RNGs for one sample and restore them afterwards.

    Restoring matters with ``num_workers=0``: otherwise every batch would reset the training
    loop's own RNG (dropout, masking) to a state derived from the last sample's seed.
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def __enter__(self) -> None:
        self._state = (torch.get_rng_state(), random.getstate(), np.random.get_state())
        torch.manual_seed(self.seed)
        random.seed(_splitmix64(self.seed ^ 0x5EED))
        np.random.seed(_splitmix64(self.seed ^ 0xA11CE) & 0xFFFFFFFF)  # numpy needs < 2**32

    def __exit__(self, *exc: object) -> None:
        torch.set_rng_state(self._state[0])
        random.setstate(self._state[1])
        np.random.set_state(self._state[2])


# ----------------------------------------------------------------------------- transforms


def tokenizer_transform(
    img_size: int, *, train: bool = True, scale: tuple[float, float] = (0.08, 1.0)
) -> Callable[[Image.Image], torch.Tensor]:
    """PIL RGB image -> float tensor (3, img_size, img_size) in [-1, 1].

    train: RandomResizedCrop(scale, bicubic) + horizontal flip; eval: resize short side
    (bicubic) + center crop. Randomness comes from torch's global RNG (torchvision v1), which
    ImageFolderDataset seeds per sample.
    """
    bicubic = T.InterpolationMode.BICUBIC
    if train:
        geometry = [T.RandomResizedCrop(img_size, scale=scale, interpolation=bicubic),
                    T.RandomHorizontalFlip()]
    else:
        geometry = [T.Resize(img_size, interpolation=bicubic), T.CenterCrop(img_size)]
    return T.Compose([*geometry, T.ToTensor(), T.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])


def denormalize(x: torch.Tensor) -> torch.Tensor:
    """Inverse of the tokenizer Normalize: [-1, 1] -> [0, 1] (clamped), any shape."""
    return (x * 0.5 + 0.5).clamp(0.0, 1.0)


# ----------------------------------------------------------------------------- dataset


def load_rgb(path: str | os.PathLike[str]) -> Image.Image:
    """Decode fully (so truncation raises here, not later) and convert to 8-bit RGB
    (``colour.to_rgb``: 16-bit and float images are scaled, not clipped)."""
    with Image.open(path) as img:
        return to_rgb(img)  # forces load(); a truncated file raises OSError


class ImageFolderDataset(Dataset):
    """ImageFolder dataset returning ``{"image", "label", "index", "skipped"}`` dicts.

    ``dataset[i]`` applies the transform with whatever the global RNG state is;
    ``dataset[(i, sample_seed)]`` makes the transform a pure function of (i, sample_seed).

    Unreadable files are never fatal: the item falls through to i+1, i+2, ... (wrapping), so
    ``len`` never changes. ``skipped`` is 1 when the file at ``i`` itself was unreadable, else
    0, so summing it over one full pass counts the corrupt files exactly (a run of k adjacent
    corrupt files still adds k, not k + (k-1) + ...). ``index`` is always the requested i.
    A tree in which no file decodes raises DataError at construction.
    """

    def __init__(self, root: str | os.PathLike[str],
                 transform: Callable[[Image.Image], Any] | None, *, seed: int = 0) -> None:
        self.root = resolve_image_root(root)
        self.samples, self.classes, self.n_ignored = scan_image_folder(root)
        self.transform = transform
        # Kept for reproducibility bookkeeping; per-sample seeds come from ShardedSampler.
        self.seed = seed
        self._bad: set[int] = set()  # per-process cache so corrupt files are decoded once
        # A folder with no decodable file fails here, in the constructing process, before any
        # DataLoader worker or process group exists (normally one decode: the first file).
        self._first_readable(0)

    @property
    def targets(self) -> list[int]:
        return [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def _first_readable(self, index: int) -> tuple[int, Image.Image]:
        n = len(self.samples)
        for step in range(n):
            j = (index + step) % n
            if j in self._bad:
                continue
            try:
                return j, load_rgb(self.samples[j][0])
            except Exception as exc:  # noqa: BLE001 - any decode failure means "skip this file"
                self._bad.add(j)
                log.warning("skipping unreadable image %s (%s: %s)", self.samples[j][0],
                            type(exc).__name__, exc)
        raise DataError(f"none of the {n} images under '{self.root}' could be decoded; "
                        "check the files (e.g. open one with PIL) or point --data elsewhere")

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        if isinstance(key, (tuple, list)):  # (index, sample_seed) from ShardedSampler
            index, seed = int(key[0]), int(key[1])
        else:
            index, seed = int(key), None
        n = len(self.samples)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} images")
        index %= n
        j, img = self._first_readable(index)
        label = self.samples[j][1]
        if self.transform is None:
            out: Any = img
        elif seed is None:
            out = self.transform(img)
        else:
            with _SeededRng(seed):
                out = self.transform(img)
        return {"image": out, "label": label, "index": index, "skipped": int(j != index)}


class ImageListDataset(Dataset):
    """``(transform(image), label, i)`` for each ``(path, label)`` of a list, or None when the file
    does not decode (tools that read every image once: tokenize, probe). Batch with
    :func:`collate_readable`, which drops the Nones and counts them."""

    def __init__(self, samples: list[tuple[str, int]], transform: Callable[[Image.Image], torch.Tensor]):
        self.samples, self.transform = samples, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int] | None:
        path, label = self.samples[i]
        try:
            img = load_rgb(path)
        except Exception:  # noqa: BLE001 - any decode failure means "skip this file"
            return None
        return self.transform(img), label, i


def collate_readable(items: list[tuple[torch.Tensor, int, int] | None]) -> tuple[Any, Any, Any, int]:
    """-> (images [B, 3, S, S], int64 labels [B], int64 indices [B], unreadable count); the first
    three are None when no file of the batch decoded."""
    good = [it for it in items if it is not None]
    if not good:
        return None, None, None, len(items)
    images, labels, idx = zip(*good)
    return (torch.stack(images), torch.tensor(labels, dtype=torch.int64), torch.tensor(idx, dtype=torch.int64),
            len(items) - len(good))


def iterate_loader(loader: DataLoader) -> Iterator[Any]:
    """Iterate a DataLoader; when iteration stops for any reason (an error included), shut its
    workers down at once.

    An error raised in a worker leaves the DataLoader's iterator (held by the traceback) and its
    workers alive; at interpreter exit torch then skips shutting them down, and multiprocessing's
    exit handler, whose SIGTERM they ignore (``preempt.ignore_stop_signals``), waits on them forever. A DataError from a
    worker, which torch re-raises with the worker's traceback in its message, is re-raised as
    its own one-line message.
    """
    it = iter(loader)
    try:
        yield from it
    except DataError as exc:
        text = str(exc)
        if "\n" not in text:
            raise
        last = text.rstrip().splitlines()[-1]
        name = f"{DataError.__module__}.{DataError.__qualname__}: "
        raise DataError(last[len(name):] if last.startswith(name) else last) from None
    finally:
        shutdown = getattr(it, "_shutdown_workers", None)  # multi-process iterators only
        if shutdown is not None:
            shutdown()


# ----------------------------------------------------------------------------- sampler


class ShardedSampler(Sampler):
    """Per-rank sampler with a seeded per-epoch shuffle, drop-last and mid-epoch resume.

    Each epoch: permute range(n) with ``torch.Generator().manual_seed(seed + epoch)`` (or keep
    order if not shuffle), keep the first ``B * world_size * batch_size`` entries where
    ``B = n // (world_size * batch_size)``, and give rank r the strided shard ``perm[r::world_size]``.
    Every rank therefore yields exactly ``B`` batches (unequal counts hang collectives), the
    shards are disjoint, and the dropped remainder is different every epoch.

    Yields ``(index, sample_seed)`` tuples, ``sample_seed = sample_seed(seed, epoch, index)``.
    ``set_epoch`` resets the start batch to 0; call ``set_start_batch`` after it when resuming.
    """

    def __init__(self, n: int, *, rank: int, world_size: int, batch_size: int, seed: int,
                 shuffle: bool = True) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"rank={rank} / world_size={world_size} is invalid; "
                            "need world_size >= 1 and 0 <= rank < world_size")
        if batch_size < 1:
            raise DataError(f"batch_size={batch_size} must be >= 1; pass a positive --batch_size")
        per_step = world_size * batch_size
        if n // per_step == 0:
            raise DataError(f"dataset of {n} images is smaller than one global batch "
                            f"(world_size={world_size} x batch_size={batch_size} = {per_step}); "
                            "use more images or a smaller batch size")
        self.n, self.rank, self.world_size = n, rank, world_size
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self.epoch = 0
        self.start_batch = 0

    @property
    def batches_per_epoch(self) -> int:
        """Batches each rank gets in a full epoch (identical on all ranks)."""
        return self.n // (self.world_size * self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's permutation; also resets the resume offset to 0."""
        self.epoch = int(epoch)
        self.start_batch = 0

    def set_start_batch(self, b: int) -> None:
        """Skip this rank's first ``b`` batches of the current epoch (no images are touched)."""
        if not 0 <= b <= self.batches_per_epoch:
            raise DataError(f"start batch {b} is outside [0, {self.batches_per_epoch}] for epoch "
                            f"{self.epoch}; check the resumed checkpoint's step and batch size")
        self.start_batch = int(b)

    def shard_indices(self) -> np.ndarray:
        """This rank's indices for the current epoch after the start-batch skip, int64 (L,)."""
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            perm = torch.randperm(self.n, generator=g).numpy()
        else:
            perm = np.arange(self.n, dtype=np.int64)
        total = self.batches_per_epoch * self.world_size * self.batch_size
        shard = perm[:total][self.rank :: self.world_size]
        return shard[self.start_batch * self.batch_size :]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        idx = self.shard_indices()
        seeds = _sample_seeds(self.seed, self.epoch, idx)
        return iter(zip(idx.tolist(), seeds.tolist()))

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.batch_size
