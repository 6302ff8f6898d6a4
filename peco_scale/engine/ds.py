"""The one place that calls ``deepspeed.initialize``; models know nothing of DeepSpeed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..config import ConfigError


def load_ds_config(path: str | Path, *, micro_batch: int, grad_accum: int, world_size: int,
                   grad_clip: float, zero_stage: int | None, allowed_stages: tuple[int, ...]) -> dict[str, Any]:
    """Read a DeepSpeed JSON and make its batch and clipping fields agree with the run config.

    The run config owns batch size, accumulation and clipping (one source of truth), so they
    are written into the DeepSpeed dict rather than read from it.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"DeepSpeed config '{path}' not found; pass --deepspeed_config PATH (see ds_configs/)")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"DeepSpeed config '{path}' is not valid JSON: {exc}") from None
    cfg["train_micro_batch_size_per_gpu"] = micro_batch
    cfg["gradient_accumulation_steps"] = grad_accum
    cfg["train_batch_size"] = micro_batch * grad_accum * world_size
    cfg["gradient_clipping"] = grad_clip
    zero = cfg.setdefault("zero_optimization", {"stage": 0})
    if zero_stage is not None:
        zero["stage"] = zero_stage
    if zero.get("stage", 0) not in allowed_stages:
        raise ConfigError(f"ZeRO stage {zero.get('stage')} in '{path}' is not supported here; use one of {allowed_stages}")
    # client optimizers (torch Adam) are fine under ZeRO 1/2; DeepSpeed asks to be told
    cfg.setdefault("zero_allow_untested_optimizer", True)
    cfg.setdefault("steps_per_print", 10**9)  # progress is ours to print
    return cfg


def initialize(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ds_config: dict[str, Any]):
    """Wrap ``model``/``optimizer`` in a DeepSpeed engine. Returns the engine."""
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    return engine
