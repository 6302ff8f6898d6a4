"""The one place that calls ``deepspeed.initialize``; models know nothing of DeepSpeed."""

from __future__ import annotations

import json
from typing import Any

import torch


def finalize_ds_config(cfg: dict[str, Any], *, micro_batch: int, grad_accum: int, world_size: int,
                       grad_clip: float, zero_stage: int | None, bf16: bool) -> dict[str, Any]:
    """Write the run's resolved batch, clipping, ZeRO stage and precision into a recipe dict."""
    cfg = json.loads(json.dumps(cfg))
    cfg["train_micro_batch_size_per_gpu"] = micro_batch
    cfg["gradient_accumulation_steps"] = grad_accum
    cfg["train_batch_size"] = micro_batch * grad_accum * world_size
    cfg["gradient_clipping"] = grad_clip
    zero = cfg.setdefault("zero_optimization", {"stage": 0})
    if zero_stage is not None:
        zero["stage"] = zero_stage
    if zero.get("stage", 0) != 3:
        for key in [k for k in zero if k.startswith("stage3_") or k == "leaf_module"]:
            zero.pop(key)
    cfg["bf16"] = {**cfg.get("bf16", {}), "enabled": bool(bf16)}
    cfg.pop("fp16", None)
    cfg.setdefault("zero_allow_untested_optimizer", True)  # client torch optimizers; DeepSpeed asks to be told
    cfg.setdefault("steps_per_print", 10**9)  # progress is ours to print
    return cfg


def initialize(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ds_config: dict[str, Any]):
    """Wrap ``model``/``optimizer`` in a DeepSpeed engine. Returns the engine."""
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    return engine
