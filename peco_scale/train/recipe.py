"""Recipes: a DeepSpeed JSON that also names its run. The block "peco_scale" holds dotted
config overrides (model, resolution, schedule), and the DeepSpeed fields that describe the
run's batch and optimizer are read into the run config too, so the JSON is the one place a
setting is written. peco-scale builds the AdamW itself (parameter groups without weight decay
on norms/biases/tokens, lr scaled with the batch), so the "optimizer" block is read, checked
and removed before DeepSpeed sees the dict; so is "peco_scale".
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..config import ConfigError


def _read_json(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"DeepSpeed config '{path}' not found; pass --deepspeed_config PATH (see ds_configs/)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"DeepSpeed config '{path}' is not valid JSON: {exc}") from None


RECIPE_KEY = "peco_scale"
_BATCH_FIELDS = {"train_batch_size": "train.global_batch", "train_micro_batch_size_per_gpu": "train.batch_size",
                 "gradient_accumulation_steps": "train.grad_accum", "gradient_clipping": "optim.grad_clip"}
_ADAMW_FIELDS = {"lr": "optim.lr", "betas": "optim.betas", "eps": "optim.eps", "weight_decay": "optim.weight_decay"}


def read_recipe(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """-> (DeepSpeed dict without our blocks, dotted run-config overrides the recipe makes)."""
    cfg = _read_json(path)
    overrides: dict[str, Any] = {}
    for key, dotted in _BATCH_FIELDS.items():
        if key in cfg:
            value = cfg.pop(key)
            if value != "auto":
                overrides[dotted] = value
    opt = cfg.pop("optimizer", None)
    if opt is not None:
        kind = str(opt.get("type", "")).lower()
        if kind not in ("adamw", "adam"):
            raise ConfigError(f"optimizer.type='{opt.get('type')}' in '{path}': peco-scale builds AdamW from this "
                              f"block (lr, betas, eps, weight_decay); use type AdamW")
        for key, dotted in _ADAMW_FIELDS.items():
            if key in opt.get("params", {}):
                overrides[dotted] = opt["params"][key]
    if "scheduler" in cfg:
        raise ConfigError(f"'{path}' has a DeepSpeed 'scheduler' block; the schedule is set in its '{RECIPE_KEY}' "
                          f"block (optim.warmup_epochs, optim.min_lr) so that it is measured in epochs")
    block = cfg.pop(RECIPE_KEY, {}) or {}
    if not isinstance(block, dict):
        raise ConfigError(f"'{RECIPE_KEY}' in '{path}' must be an object of dotted config keys")
    overrides.update(block)
    return cfg, overrides


def resolve_accum(micro: int, grad_accum: int, global_batch: int, world: int, recipe: str) -> int:
    """Gradient-accumulation steps such that micro x accum x world == global batch (checked)."""
    if micro < 1:
        raise ConfigError(f"train.batch_size={micro}: set a micro-batch per rank (--batch_size N) or "
                          f"train_micro_batch_size_per_gpu in the recipe")
    if grad_accum < 0 or global_batch < 0:
        raise ConfigError(f"train.grad_accum={grad_accum} and train.global_batch={global_batch} must be >= 0")
    if global_batch and grad_accum:
        if micro * grad_accum * world != global_batch:
            raise ConfigError(f"micro-batch {micro} x gradient accumulation {grad_accum} x world size {world} = "
                              f"{micro * grad_accum * world}, but the train batch size is {global_batch} "
                              f"(train_batch_size in {recipe} or --global_batch); change one of them, "
                              f"or drop the accumulation to have it derived")
        return grad_accum
    if global_batch:
        if global_batch % (micro * world):
            raise ConfigError(f"train batch size {global_batch} is not divisible by micro-batch {micro} x world size "
                              f"{world} = {micro * world}; change --batch_size or --global_batch")
        return global_batch // (micro * world)
    return grad_accum or 1
