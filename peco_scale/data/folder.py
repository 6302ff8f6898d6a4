"""The folder backend (the default): an ImageFolder tree read with PIL/torchvision in DataLoader
workers. Also the ImageFolder scanning every backend starts from, and the image-list dataset the
one-pass tools (tokenize, probe) read with.

Contract: ``scan_image_folder`` lists a tree deterministically without decoding; ``load_rgb``
decodes fully to 8-bit RGB or raises; ``ImageFolderDataset`` never fails on an unreadable file
(the next readable one takes its place and ``skipped`` counts it) and, given
``(index, sample_seed)`` from ``sampling.ShardedSampler``, makes the transform a pure function
of them (``sampling.SeededRng``), whichever DataLoader worker builds the sample.
:class:`FolderLoader` is the ``spec.BatchLoader`` of this backend.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from ..signals import ignore_stop_signals
from .colour import to_rgb
from .masking import mask_generator
from .mim import IMAGENET_MEAN, IMAGENET_STD, MIMTransform
from .sampling import SeededRng, ShardedSampler
from .spec import TASKS, AugmentSpec, DataError, ShardedPosition

log = logging.getLogger(__name__)

IMG_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


# ----------------------------------------------------------------------------- scanning


def is_image_file(path: str | os.PathLike[str]) -> bool:
    """True if the file name has an image extension (case-insensitive)."""
    return str(path).lower().endswith(IMG_EXTENSIONS)


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


# ----------------------------------------------------------------------------- datasets


def load_rgb(path: str | os.PathLike[str]) -> Image.Image:
    """Decode fully (so truncation raises here, not later) and convert to 8-bit RGB
    (``colour.to_rgb``: 16-bit and float images are scaled, not clipped)."""
    with Image.open(path) as img:
        return to_rgb(img)  # forces load(); a truncated file raises OSError


def first_usable(index: int, n: int, bad: set[int], load: Callable[[int], Any], what: Callable[[int], str],
                 none_msg: str) -> tuple[int, Any]:
    """``(j, load(j))`` for the first ``j`` from ``index`` on (wrapping) whose load succeeds; a failure is
    logged once, remembered in ``bad`` and skipped. No usable item at all: ``DataError(none_msg)``."""
    for step in range(n):
        j = (index + step) % n
        if j in bad:
            continue
        try:
            return j, load(j)
        except Exception as exc:  # noqa: BLE001 - any failure to read an item means "skip it"
            bad.add(j)
            log.warning("skipping %s (%s: %s)", what(j), type(exc).__name__, exc)
    raise DataError(none_msg)


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
        return first_usable(index, len(self.samples), self._bad, lambda j: load_rgb(self.samples[j][0]),
                            lambda j: f"unreadable image {self.samples[j][0]}",
                            f"none of the {len(self.samples)} images under '{self.root}' could be decoded; "
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
            with SeededRng(seed):
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
    exit handler, whose SIGTERM they ignore (``signals.ignore_stop_signals``), waits on them forever. A DataError from a
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


# ----------------------------------------------------------------------------- the loader


class FolderLoader(ShardedPosition):
    """The default backend: an ImageFolder tree read with PIL/torchvision in DataLoader workers.

    Sample ``i`` of epoch ``e`` is a pure function of (seed, e, i) (see ShardedSampler), so the
    batches are reproducible whichever worker builds them, and resume is by index.
    """

    def __init__(self, root, spec: AugmentSpec, *, batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, workers: int = 0, device: str = "cpu"):
        if spec.task not in TASKS:
            raise DataError(f"task='{spec.task}' must be one of {', '.join(TASKS)}")
        self.spec, self.device = spec, torch.device(device)
        self.dataset = ImageFolderDataset(root, _folder_transform(spec))
        self.sampler = ShardedSampler(len(self.dataset), rank=rank, world_size=world_size, batch_size=batch_size,
                                      seed=seed)
        self._loader = DataLoader(self.dataset, batch_size=batch_size, sampler=self.sampler, num_workers=workers,
                                  drop_last=True, pin_memory=self.device.type == "cuda",
                                  multiprocessing_context="fork" if workers else None,
                                  worker_init_fn=ignore_stop_signals, generator=torch.Generator().manual_seed(seed))

    def __iter__(self):
        for batch in iterate_loader(self._loader):
            views = batch.pop("image")
            out = dict(views) if isinstance(views, dict) else {"image": views}
            out = {k: v.to(self.device, non_blocking=True) for k, v in out.items()}
            out.update(label=batch["label"].to(self.device), index=batch["index"], skipped=int(batch["skipped"].sum()))
            yield out


def _folder_transform(spec: AugmentSpec):
    if spec.task == "pretrain":
        return MIMTransform(spec.img_size, spec.tokenizer_size, mask_generator(**spec.mask), scale=spec.scale,
                            ratio=spec.ratio, hflip=spec.hflip, jitter=spec.jitter)
    if spec.task == "tokenizer" and spec.jitter == 0 and spec.hflip == 0.5 and tuple(spec.ratio) == (3 / 4, 4 / 3):
        return tokenizer_transform(spec.img_size, scale=spec.scale)  # the stage-1 trainer's own transform
    ops = [T.RandomResizedCrop(spec.img_size, scale=spec.scale, ratio=spec.ratio,
                               interpolation=T.InterpolationMode.BICUBIC), T.RandomHorizontalFlip(spec.hflip)]
    if spec.jitter > 0:
        ops.append(T.ColorJitter(spec.jitter, spec.jitter, spec.jitter))
    mean, std = ((0.5,) * 3, (0.5,) * 3) if spec.task == "tokenizer" else (IMAGENET_MEAN, IMAGENET_STD)
    return T.Compose([*ops, T.ToTensor(), T.Normalize(mean, std)])
