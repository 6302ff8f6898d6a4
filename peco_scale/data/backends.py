"""One interface over the three ways peco-scale reads images: folder, ffcv, dali.

Every backend's loader yields the same batches for each task (all tensors on the loader's
device, channel-first):

- ``"stage1"``:   {"image": float [B, 3, S, S] in [-1, 1], "label": int64 [B], "skipped": int}
- ``"stage2"``:   {"patch": float [B, 3, S, S] ImageNet-normalised, "tokenizer": float
                  [B, 3, T, T] in [-1, 1], "mask": bool [B, h, w], "label": int64 [B], "skipped": int}
- ``"finetune"``: {"image": float [B, 3, S, S] ImageNet-normalised, "label": int64 [B], "skipped": int}

"skipped" counts the unreadable images replaced in that batch (0 where a backend filters them
at conversion time). Both stage-2 views come from ONE random-resized crop (+ flip, jitter);
the mask comes from the BlockMaskGenerator with the sample's seed.

Distributed contract (DeepSpeed hangs on uneven counts): ``batches_per_epoch`` is identical on
every rank; each epoch is a seeded permutation of the dataset cut to a multiple of
``world_size * batch_size`` (drop-last) and sharded by rank; ``set_epoch(e)`` picks the
permutation and ``set_start_batch(b)`` skips the first b batches of this rank (mid-epoch
resume by index).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Protocol

BACKENDS = ("folder", "ffcv", "dali")
TASKS = ("stage1", "stage2", "finetune")


@dataclass(frozen=True)
class AugmentSpec:
    """The augmentation every backend applies, with the same distributions."""

    img_size: int
    task: str = "stage2"
    scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop area fraction
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # RandomResizedCrop aspect ratio (log-uniform)
    hflip: float = 0.5  # horizontal flip probability
    jitter: float = 0.4  # brightness, contrast, saturation factors uniform in [1-j, 1+j] (0 = off)
    tokenizer_size: int = 0  # stage 2: side of the tokenizer view
    mask: dict[str, Any] = field(default_factory=dict)  # stage 2: BlockMaskGenerator kwargs (grid, num_masked, ...)


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


# -- the folder backend -------------------------------------------------------------------------


class FolderLoader(ShardedPosition):
    """The default backend: an ImageFolder tree read with PIL/torchvision in DataLoader workers.

    Sample ``i`` of epoch ``e`` is a pure function of (seed, e, i) (see ShardedSampler), so the
    batches are reproducible whichever worker builds them, and resume is by index.
    """

    def __init__(self, root, spec: AugmentSpec, *, batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, workers: int = 0, device: str = "cpu"):
        import torch
        from torch.utils.data import DataLoader

        from ..engine.preempt import ignore_stop_signals
        from .folder import ImageFolderDataset, ShardedSampler

        if spec.task not in TASKS:
            from .folder import DataError

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
        from .folder import iterate_loader

        for batch in iterate_loader(self._loader):
            views = batch.pop("image")
            out = dict(views) if isinstance(views, dict) else {"image": views}
            out = {k: v.to(self.device, non_blocking=True) for k, v in out.items()}
            out.update(label=batch["label"].to(self.device), index=batch["index"], skipped=int(batch["skipped"].sum()))
            yield out


def _folder_transform(spec: AugmentSpec):
    from torchvision import transforms as T

    from .folder import tokenizer_transform
    from .masking import BlockMaskGenerator
    from .mim import IMAGENET_MEAN, IMAGENET_STD, MIMTransform

    if spec.task == "stage2":
        return MIMTransform(spec.img_size, spec.tokenizer_size, BlockMaskGenerator(**spec.mask), scale=spec.scale,
                            ratio=spec.ratio, hflip=spec.hflip, jitter=spec.jitter)
    if spec.task == "stage1" and spec.jitter == 0 and spec.hflip == 0.5 and tuple(spec.ratio) == (3 / 4, 4 / 3):
        return tokenizer_transform(spec.img_size, scale=spec.scale)  # the stage-1 trainer's own transform
    ops = [T.RandomResizedCrop(spec.img_size, scale=spec.scale, ratio=spec.ratio,
                               interpolation=T.InterpolationMode.BICUBIC), T.RandomHorizontalFlip(spec.hflip)]
    if spec.jitter > 0:
        ops.append(T.ColorJitter(spec.jitter, spec.jitter, spec.jitter))
    mean, std = ((0.5,) * 3, (0.5,) * 3) if spec.task == "stage1" else (IMAGENET_MEAN, IMAGENET_STD)
    return T.Compose([*ops, T.ToTensor(), T.Normalize(mean, std)])


def make_loader(backend: str, source, spec: AugmentSpec, **kwargs) -> BatchLoader:
    """``backend`` folder (source: ImageFolder root), ffcv (source: .beton), dali (source: root)."""
    if backend == "folder":
        return FolderLoader(source, spec, **kwargs)
    if backend == "ffcv":
        from .ffcv_backend import FFCVLoader

        return FFCVLoader(source, spec, **kwargs)
    if backend == "dali":
        from .dali_backend import DALILoader

        return DALILoader(source, spec, **kwargs)
    from .folder import DataError

    raise DataError(f"data backend '{backend}' is unknown; choose one of {', '.join(BACKENDS)}")
