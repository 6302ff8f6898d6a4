"""Semantic segmentation data in the ADE20K layout::

    root/images/{training,validation}/<name>.jpg
    root/annotations/{training,validation}/<name>.png     class ids, one channel

With ``reduce_zero_label`` (ADE20K's convention, the default) id 0 is "unlabelled" and becomes the
ignore id 255, and ids 1..C become 0..C-1. Training samples follow mmsegmentation's ADE20K
pipeline: random rescale into ``(4 crop, crop)`` x U(0.5, 2.0) keeping the aspect ratio, a random
``crop`` x ``crop`` window in which no class covers more than 75% (up to 10 tries), horizontal
flip, photometric distortion, normalisation, padding (label 255). Each sample is a pure function
of ``(index, sample_seed)`` (``ShardedSampler``), so batches are reproducible and resume is exact.
Evaluation images are rescaled into ``(4 crop, crop)``; labels stay at their own size.

Bad input: a missing folder, an image without its annotation and label ids above the class count
(checked on a sample before training) are one line; during training an unreadable image, an
annotation of another size or with out-of-range ids is skipped and counted.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from ..signals import ignore_stop_signals
from .colour import to_rgb
from .folder import IMG_EXTENSIONS, first_usable, iterate_loader
from .sampling import ShardedSampler
from .mim import IMAGENET_MEAN, IMAGENET_STD
from .spec import DataError, ShardedPosition

log = logging.getLogger("peco_scale")
IGNORE = 255


@dataclass(frozen=True)
class SegAugment:
    crop: int = 512
    ratio_range: tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 0.75
    hflip: float = 0.5
    photometric: bool = True


def scan_segmentation(root: str | os.PathLike[str], split: str) -> list[tuple[str, str]]:
    """(image, annotation) path pairs of ``split``, sorted by name; one line when the layout is
    wrong or an image has no annotation."""
    root = Path(root)
    images, anns = root / "images" / split, root / "annotations" / split
    for folder in (images, anns):
        if not folder.is_dir():
            raise DataError(f"segmentation data: '{folder}' does not exist; --data must hold images/{split} and "
                            f"annotations/{split} (the ADE20K layout)")
    files = sorted(p for p in images.iterdir() if p.suffix.lower() in IMG_EXTENSIONS)
    if not files:
        raise DataError(f"segmentation data: no images under '{images}'")
    missing = [p.name for p in files if not (anns / f"{p.stem}.png").is_file()]
    if missing:
        raise DataError(f"segmentation data: {len(missing)} of {len(files)} images under '{images}' have no "
                        f"annotation PNG in '{anns}' (e.g. {missing[0]} -> {Path(missing[0]).stem}.png)")
    return [(str(p), str(anns / f"{p.stem}.png")) for p in files]


def read_label(path: str, reduce_zero_label: bool) -> np.ndarray:
    """uint8 class-id map (255 = ignore) of an annotation PNG."""
    with Image.open(path) as im:
        if im.mode not in ("L", "P", "I", "I;16"):
            raise DataError(f"annotation {path} is a {im.mode} image; class ids must be one channel (L or P mode)")
        lab = np.asarray(im).astype(np.int64)
    if reduce_zero_label:  # 0 -> 255, k -> k - 1, 255 stays 255 (mmsegmentation's order)
        lab = np.where((lab == 0) | (lab == IGNORE), IGNORE, lab - 1)
    return lab


def read_pair(path: str, ann: str, reduce_zero_label: bool) -> tuple[Image.Image, np.ndarray]:
    """The RGB image and label map of one pair; an annotation of another size is a DataError."""
    with Image.open(path) as im:
        img = to_rgb(im)
    lab = read_label(ann, reduce_zero_label)
    if lab.shape != (img.size[1], img.size[0]):
        raise DataError(f"annotation {ann} is {lab.shape[1]}x{lab.shape[0]}, its image {img.size[0]}x{img.size[1]}")
    return img, lab


def check_labels(pairs: list[tuple[str, str]], num_classes: int, reduce_zero_label: bool, sample: int = 32) -> None:
    """Read up to ``sample`` annotations spread over the split: an id at or above ``num_classes``
    (other than ignore) is one line naming the file and the fix."""
    step = max(1, len(pairs) // sample)
    for _, ann in pairs[::step][:sample]:
        lab = read_label(ann, reduce_zero_label)
        bad = lab[(lab != IGNORE) & (lab >= num_classes)]
        if bad.size:
            shown = int(bad.max()) + (1 if reduce_zero_label else 0)
            raise DataError(f"annotation {ann} holds class id {shown}, above the {num_classes} classes of "
                            f"--data.num_classes {num_classes}{' (with reduce-zero-label)' if reduce_zero_label else ''}"
                            f"; set --data.num_classes to the dataset's class count")


def _rescale(img: Image.Image, lab: np.ndarray | None, crop: int, ratio: float):
    """Resize so that the long side <= 4 crop ratio and the short side <= crop ratio (mmseg's
    keep-ratio Resize); bilinear image, nearest label."""
    w, h = img.size
    s = min(4 * crop * ratio / max(w, h), crop * ratio / min(w, h))
    size = (max(1, int(w * s + 0.5)), max(1, int(h * s + 0.5)))
    img = img.resize(size, Image.Resampling.BILINEAR)
    if lab is not None:
        lab = np.asarray(Image.fromarray(lab.astype(np.uint8)).resize(size, Image.Resampling.NEAREST)).astype(np.int64)
    return img, lab


def _photometric(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """mmseg's PhotoMetricDistortion on float RGB in [0, 255]: brightness +-32, contrast 0.5-1.5
    (before or after), saturation 0.5-1.5, hue +-18 degrees (each with probability 0.5)."""
    if rng.random() < 0.5:
        x = x + rng.uniform(-32, 32)
    contrast_first = rng.random() < 0.5
    alpha = rng.uniform(0.5, 1.5) if rng.random() < 0.5 else None
    if contrast_first and alpha is not None:
        x = x * alpha
    sat = rng.uniform(0.5, 1.5) if rng.random() < 0.5 else None
    hue = rng.uniform(-18, 18) if rng.random() < 0.5 else None
    if sat is not None or hue is not None:
        hsv = np.asarray(Image.fromarray(np.clip(x, 0, 255).astype(np.uint8)).convert("HSV")).astype(np.float32)
        if sat is not None:
            hsv[..., 1] = np.clip(hsv[..., 1] * sat, 0, 255)
        if hue is not None:
            hsv[..., 0] = (hsv[..., 0] + hue * 256 / 360) % 256
        x = np.asarray(Image.fromarray(hsv.astype(np.uint8), "HSV").convert("RGB")).astype(np.float32)
    if not contrast_first and alpha is not None:
        x = x * alpha
    return np.clip(x, 0, 255)


def _normalise(x: np.ndarray) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).permute(2, 0, 1) / 255.0
    return (t - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]


def train_sample(img: Image.Image, lab: np.ndarray, aug: SegAugment, rng: np.random.Generator):
    """(normalised image [3, crop, crop], int64 label [crop, crop]) of one training sample."""
    img, lab = _rescale(img, lab, aug.crop, rng.uniform(*aug.ratio_range))
    h, w = lab.shape
    ch, cw = min(aug.crop, h), min(aug.crop, w)
    for _ in range(10):
        top, left = int(rng.integers(h - ch + 1)), int(rng.integers(w - cw + 1))
        window = lab[top:top + ch, left:left + cw]
        _, counts = np.unique(window[window != IGNORE], return_counts=True)
        if len(counts) > 1 and counts.max() / counts.sum() < aug.cat_max_ratio:
            break
    x = np.asarray(img, dtype=np.float32)[top:top + ch, left:left + cw]
    y = window
    if rng.random() < aug.hflip:
        x, y = x[:, ::-1], y[:, ::-1]
    if aug.photometric:
        x = _photometric(x, rng)
    image = torch.zeros(3, aug.crop, aug.crop)
    label = torch.full((aug.crop, aug.crop), IGNORE, dtype=torch.int64)
    image[:, :ch, :cw] = _normalise(x)
    label[:ch, :cw] = torch.from_numpy(np.ascontiguousarray(y))
    return image, label


class SegmentationDataset(Dataset):
    """Training samples of one split; ``dataset[(i, sample_seed)]`` -> ``{"image", "label",
    "index", "skipped"}``, falling through to the next readable sample (``skipped`` counts)."""

    def __init__(self, root, split: str, num_classes: int, aug: SegAugment, *, reduce_zero_label: bool = True):
        self.pairs = scan_segmentation(root, split)
        check_labels(self.pairs, num_classes, reduce_zero_label)
        self.num_classes, self.aug, self.reduce_zero_label = num_classes, aug, reduce_zero_label
        self._bad: set[int] = set()

    def __len__(self) -> int:
        return len(self.pairs)

    def load(self, j: int) -> tuple[Image.Image, np.ndarray]:
        """The image and label map of pair ``j``; raises on anything that must be skipped."""
        img, lab = read_pair(*self.pairs[j], self.reduce_zero_label)
        if ((lab != IGNORE) & (lab >= self.num_classes)).any():
            raise DataError(f"annotation {self.pairs[j][1]} has class ids above {self.num_classes - 1}")
        return img, lab

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        index, seed = int(key[0]), int(key[1])
        j, (img, lab) = first_usable(index, len(self.pairs), self._bad, self.load,
                                     lambda j: f"segmentation sample {self.pairs[j][0]}",
                                     f"none of the {len(self.pairs)} segmentation samples could be read; check the "
                                     f"images and annotations")
        image, label = train_sample(img, lab, self.aug, np.random.default_rng(seed))
        return {"image": image, "label": label, "index": index, "skipped": int(j != index)}


class SegmentationLoader(ShardedPosition):
    """This rank's training batches ``{"image" [B, 3, S, S], "label" [B, S, S], "index", "skipped"}``."""

    def __init__(self, root, split: str, num_classes: int, aug: SegAugment, *, batch_size: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, workers: int = 0, device: str = "cpu",
                 reduce_zero_label: bool = True):
        self.device = torch.device(device)
        self.dataset = SegmentationDataset(root, split, num_classes, aug, reduce_zero_label=reduce_zero_label)
        self.sampler = ShardedSampler(len(self.dataset), rank=rank, world_size=world_size, batch_size=batch_size,
                                      seed=seed)
        self._loader = DataLoader(self.dataset, batch_size=batch_size, sampler=self.sampler, num_workers=workers,
                                  drop_last=True, multiprocessing_context="fork" if workers else None,
                                  worker_init_fn=ignore_stop_signals,
                                  # its own generator: a new iterator must not draw from the global RNG
                                  # (drop path), or a resumed run would draw differently
                                  generator=torch.Generator().manual_seed(seed))

    def __iter__(self):
        for batch in iterate_loader(self._loader):
            yield {"image": batch["image"].to(self.device), "label": batch["label"].to(self.device),
                   "index": batch["index"], "skipped": int(batch["skipped"].sum())}


def eval_samples(root, split: str, crop: int, *, rank: int = 0, world_size: int = 1, reduce_zero_label: bool = True):
    """This rank's share (every ``world_size``-th pair) of the evaluation split: yields
    ``(index, normalised image [1, 3, h, w] rescaled into (4 crop, crop), label [H, W] at its own size)``;
    an unreadable pair is skipped with a warning (the caller counts the indices it saw)."""
    pairs = scan_segmentation(root, split)
    for i in range(rank, len(pairs), world_size):
        try:
            img, lab = read_pair(*pairs[i], reduce_zero_label)
        except Exception as exc:  # noqa: BLE001 - an unusable pair is skipped, as in training
            log.warning("skipping evaluation sample %s (%s: %s)", pairs[i][0], type(exc).__name__, exc)
            continue
        img, _ = _rescale(img, None, crop, 1.0)
        yield i, _normalise(np.asarray(img, dtype=np.float32))[None], torch.from_numpy(lab)
