"""Seeds and sharded sampling, shared by every backend.

Determinism contract (needed for exact mid-epoch resume under DeepSpeed): ``ShardedSampler``
yields ``(index, sample_seed)`` pairs whose order depends only on
``(seed, epoch, rank, world_size, batch_size)``; ``sample_seed(seed, epoch, index)`` is a
SplitMix64 hash, so every random draw a backend makes for a sample is a pure function of
``(seed, epoch, index)``, whichever worker, thread or rank makes it. ``SeededRng`` seeds (and
restores) the global torch / random / numpy RNGs from one sample seed, for transforms that draw
from them (the folder backend).
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler

from .spec import DataError

_MASK64 = (1 << 64) - 1
_MASK63 = (1 << 63) - 1


def splitmix64(x: int) -> int:
    """One SplitMix64 step: a cheap, well-mixed 64-bit hash of a 64-bit int."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def splitmix64_np(x: np.ndarray) -> np.ndarray:
    """Vectorised SplitMix64 over a uint64 array (numpy array arithmetic wraps mod 2**64)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _epoch_key(seed: int, epoch: int) -> int:
    return splitmix64(splitmix64(seed & _MASK64) ^ (epoch & _MASK64))


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The 63-bit augmentation seed of sample ``index`` in ``epoch`` (what ShardedSampler yields)."""
    return splitmix64(_epoch_key(seed, epoch) ^ (index & _MASK64)) & _MASK63


def sample_seeds(seed: int, epoch: int, indices: np.ndarray) -> np.ndarray:
    """``sample_seed`` for an int64 array of indices, vectorised; same values as the scalar."""
    key = np.uint64(_epoch_key(seed, epoch))
    out = splitmix64_np(indices.astype(np.uint64) ^ key) & np.uint64(_MASK63)
    return out.astype(np.int64)


class SeededRng:
    """Seed torch / random / numpy global RNGs for one sample and restore them afterwards.

    Restoring matters with ``num_workers=0``: otherwise every batch would reset the training
    loop's own RNG (dropout, masking) to a state derived from the last sample's seed.
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def __enter__(self) -> None:
        self._state = (torch.get_rng_state(), random.getstate(), np.random.get_state())
        torch.manual_seed(self.seed)
        random.seed(splitmix64(self.seed ^ 0x5EED))
        np.random.seed(splitmix64(self.seed ^ 0xA11CE) & 0xFFFFFFFF)  # numpy needs < 2**32

    def __exit__(self, *exc: object) -> None:
        torch.set_rng_state(self._state[0])
        random.setstate(self._state[1])
        np.random.set_state(self._state[2])


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
        seeds = sample_seeds(self.seed, self.epoch, idx)
        return iter(zip(idx.tolist(), seeds.tolist()))

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.batch_size
