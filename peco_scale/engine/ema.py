"""Exponential moving average of a model's weights that is correct under ZeRO-3.

``ShardedEMA`` keeps an fp32 shadow of exactly the partition a rank owns (the whole tensor
without ZeRO-3): 4 bytes x parameters / world size per rank, and no communication per update.
``swapped()`` evaluates with the EMA weights and puts the training weights back afterwards;
``full_state_dict()`` (all ranks call it) gives rank 0 whole fp32 tensors; ``state_dict()`` is
the rank's own shadow (same world size on resume).

Design notes: docs/design.md
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
import torch.distributed as dist
import torch.nn as nn


def _local(p: torch.Tensor) -> torch.Tensor:
    """The storage this rank updates for ``p``: its ZeRO-3 partition, or the whole tensor."""
    return p.ds_tensor.data if hasattr(p, "ds_tensor") else p.data


def _whole(shard: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """The whole tensor of ``p`` from every rank's ``shard`` (collective under ZeRO-3)."""
    if not hasattr(p, "ds_tensor"):
        return shard
    group = getattr(p, "ds_process_group", None)
    parts = [torch.empty_like(shard) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, shard.contiguous(), group=group)
    return torch.cat(parts)[: p.ds_numel].view(p.ds_shape)


class ShardedEMA:
    def __init__(self, module: nn.Module, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay {decay} must be in [0, 1)")
        self.decay = float(decay)
        self.named = [(n, p) for n, p in module.named_parameters()]
        self.shadow = [_local(p).detach().float().clone() for _, p in self.named]

    @torch.no_grad()
    def update(self) -> None:
        for s, (_, p) in zip(self.shadow, self.named):
            s.lerp_(_local(p).float(), 1.0 - self.decay)

    @contextmanager
    def swapped(self) -> Iterator[None]:
        """Run the model with the EMA weights inside the block (collective under ZeRO-3)."""
        stores = []  # (storage, EMA value to put there): the partition, and p.data if held whole
        for s, (_, p) in zip(self.shadow, self.named):
            stores.append((_local(p), s))
            if hasattr(p, "ds_tensor") and getattr(p, "ds_persist", False):
                whole = _whole(s, p)
                if p.data.numel() == whole.numel():
                    stores.append((p.data, whole))
        backup = [t.clone() for t, _ in stores]
        try:
            with torch.no_grad():
                for t, value in stores:
                    t.copy_(value)
            yield
        finally:
            with torch.no_grad():
                for (t, _), b in zip(stores, backup):
                    t.copy_(b)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Whole fp32 EMA tensors by parameter name (collective: every rank must call it)."""
        return {name: _whole(s, p).detach().cpu().clone() for s, (name, p) in zip(self.shadow, self.named)}

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "names": [n for n, _ in self.named], "shadow": [s.cpu() for s in self.shadow]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["names"] != [n for n, _ in self.named]:
            raise ValueError("EMA state was saved for another model (parameter names differ)")
        for s, saved in zip(self.shadow, state["shadow"]):
            if s.shape != saved.shape:
                raise ValueError(f"EMA shard shape {tuple(saved.shape)} != {tuple(s.shape)} (another world size?)")
            s.copy_(saved)
        self.decay = float(state["decay"])
