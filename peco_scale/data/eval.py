"""Evaluation batches: deterministic centre crops of an ImageFolder tree, split over ranks.

``resize shorter side to round(img_size / crop_pct)`` (bicubic), ``centre crop img_size``,
ImageNet normalisation (timm/BEiT evaluation). Every rank gets the same number of batches (ZeRO-3
gathers parameters inside the forward pass, so ranks must run the same number of forwards): the
index list is padded by wrapping around to a multiple of ``world_size x batch_size`` and the
padding carries ``valid = False``, so each image counts exactly once over all ranks.
Unreadable files are replaced by the next readable one and counted (``skipped``), as in training.
"""

from __future__ import annotations

import math
import os
from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader

from ..signals import ignore_stop_signals
from .folder import ImageFolderDataset, iterate_loader
from .mim import IMAGENET_MEAN, IMAGENET_STD


def eval_transform(img_size: int, crop_pct: float = 0.875, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    from torchvision import transforms as T

    return T.Compose([T.Resize(int(round(img_size / crop_pct)), interpolation=T.InterpolationMode.BICUBIC),
                      T.CenterCrop(img_size), T.ToTensor(), T.Normalize(mean, std)])


class EvalLoader:
    def __init__(self, root: str | os.PathLike[str], img_size: int, *, batch_size: int, rank: int = 0,
                 world_size: int = 1, workers: int = 0, crop_pct: float = 0.875, device: str = "cpu") -> None:
        self.dataset = ImageFolderDataset(root, eval_transform(img_size, crop_pct))  # DataError if missing/empty
        self.classes = self.dataset.classes
        n = len(self.dataset)
        per_step = batch_size * world_size
        total = math.ceil(n / per_step) * per_step
        order = torch.arange(total)
        self.indices = (order % n)[rank::world_size].tolist()
        self.valid = (order < n)[rank::world_size]
        self.batch_size, self.device, self.num_images = batch_size, torch.device(device), n
        # its own generator: evaluating never draws from the global RNG that training (drop path) uses
        self._loader = DataLoader(self.dataset, batch_size=batch_size, sampler=self.indices, num_workers=workers,
                                  multiprocessing_context="fork" if workers else None,
                                  worker_init_fn=ignore_stop_signals, generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.indices) // self.batch_size

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for b, batch in enumerate(iterate_loader(self._loader)):
            valid = self.valid[b * self.batch_size:(b + 1) * self.batch_size]
            yield {"image": batch["image"].to(self.device, non_blocking=True), "label": batch["label"].to(self.device),
                   "valid": valid.to(self.device), "skipped": int(batch["skipped"][valid].sum())}
