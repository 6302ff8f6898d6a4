"""The data interface every backend implements: the batch contract, the augmentation spec, the
loader protocol and the shared epoch/resume half of it, and the one error type. Imports nothing
heavy (no torch) and nothing else from ``peco_scale.data``.

Every backend's loader yields, per task (tensors on the loader's device, channel-first):

- ``"tokenizer"``: {"image": float [B, 3, S, S] in [-1, 1], "label": int64 [B], "skipped": int}
- ``"pretrain"``:  {"patch": float [B, 3, S, S] ImageNet-normalised, "tokenizer": float
                   [B, 3, T, T] in [-1, 1] (absent when ``tokenizer_size`` is 0: the MAE tasks),
                   "mask": bool [B, h, w], "label": int64 [B], "skipped": int}
- ``"finetune"``:  {"image": float [B, 3, S, S] ImageNet-normalised, "label": int64 [B], "skipped": int}

"skipped" counts the unreadable images replaced in that batch. ``batches_per_epoch`` is the same
on every rank; ``set_epoch``/``set_start_batch`` give a seeded, drop-last, rank-sharded order and
mid-epoch resume (:class:`ShardedPosition`).

Design notes: docs/design.md
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Protocol

BACKENDS = ("folder", "ffcv", "dali")
TASKS = ("tokenizer", "pretrain", "finetune")


class DataError(ValueError):
    """Bad dataset input (missing folder, no images, impossible batch split, ...).

    Messages are one line naming the offending value and how to fix it.
    """


@dataclass(frozen=True)
class AugmentSpec:
    """The augmentation every backend applies, with the same distributions."""

    img_size: int
    task: str = "pretrain"
    scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop area fraction
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # RandomResizedCrop aspect ratio (log-uniform)
    hflip: float = 0.5  # horizontal flip probability
    jitter: float = 0.4  # brightness, contrast, saturation factors uniform in [1-j, 1+j] (0 = off)
    tokenizer_size: int = 0  # stage 2: side of the tokenizer view (0 = none: the MAE tasks)
    mask: dict[str, Any] = field(default_factory=dict)  # stage 2: masking.mask_generator kwargs (kind, grid, num_masked, ...)


class BatchLoader(Protocol):
    batches_per_epoch: int

    def set_epoch(self, epoch: int) -> None: ...

    def set_start_batch(self, batch: int) -> None: ...

    def __iter__(self) -> Iterator[dict[str, Any]]: ...


class ShardedPosition:
    """The epoch/resume half of the protocol, shared by every backend: delegated to
    ``self.sampler`` (a ``ShardedSampler``), so all backends shard and resume identically."""

    sampler: Any

    @property
    def batches_per_epoch(self) -> int:
        return self.sampler.batches_per_epoch

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's permutation; resets the start batch to 0."""
        self.sampler.set_epoch(epoch)

    def set_start_batch(self, batch: int) -> None:
        """Skip this rank's first ``batch`` batches of the current epoch (resume by index)."""
        self.sampler.set_start_batch(batch)

    def __len__(self) -> int:
        """Batches left in the current epoch."""
        return self.sampler.batches_per_epoch - self.sampler.start_batch
