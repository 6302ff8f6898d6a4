"""The one place that calls ``deepspeed.initialize``; models know nothing of DeepSpeed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..config import ConfigError, apply_overrides, load_file, parse_cli


def _read_json(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"DeepSpeed config '{path}' not found; pass --deepspeed_config PATH (see ds_configs/)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"DeepSpeed config '{path}' is not valid JSON: {exc}") from None


def load_ds_config(path: str | Path, *, micro_batch: int, grad_accum: int, world_size: int,
                   grad_clip: float, zero_stage: int | None, allowed_stages: tuple[int, ...]) -> dict[str, Any]:
    """Read a stage-1 DeepSpeed JSON and make its batch and clipping fields agree with the run config.

    The run config owns batch size, accumulation and clipping (one source of truth), so they
    are written into the DeepSpeed dict rather than read from it. Precision is torch autocast,
    so DeepSpeed's bf16 mode stays off.
    """
    cfg = finalize_ds_config(_read_json(path), micro_batch=micro_batch, grad_accum=grad_accum, world_size=world_size,
                             grad_clip=grad_clip, zero_stage=zero_stage, bf16=False)
    stage = cfg["zero_optimization"].get("stage", 0)
    if stage not in allowed_stages:
        raise ConfigError(f"ZeRO stage {stage} in '{path}' is not supported here; use one of {allowed_stages}")
    return cfg


def initialize(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ds_config: dict[str, Any]):
    """Wrap ``model``/``optimizer`` in a DeepSpeed engine. Returns the engine."""
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    return engine


# -- stage-2 recipes ---------------------------------------------------------------------------
#
# A recipe is a DeepSpeed JSON that also names its run: the block "peco_scale" holds dotted
# config overrides (model, resolution, schedule), and the DeepSpeed fields that describe the
# run's batch and optimizer are read into the run config too, so the JSON is the one place a
# setting is written. peco-scale builds the AdamW itself (parameter groups without weight decay
# on norms/biases/tokens, lr scaled with the batch), so the "optimizer" block is read, checked
# and removed before DeepSpeed sees the dict; so is "peco_scale".

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


def config_from_recipe_argv(argv: list[str], cls: type, aliases: dict[str, str]) -> tuple[Any, dict[str, Any]]:
    """Flags -> (config of type ``cls``, the recipe's DeepSpeed dict without our blocks).

    Precedence: ``cls`` defaults -> the recipe (``train.deepspeed_config``) -> --config FILE ->
    --section.key flags.
    """
    cli, options = parse_cli(argv, aliases)
    file_overrides = load_file(options.pop("config")) if "config" in options else {}
    options.pop("local_rank", None)  # passed by the deepspeed launcher; LOCAL_RANK is read from env
    if options:
        raise ConfigError(f"unknown option(s) {', '.join('--' + k for k in options)}; options are --config FILE "
                          f"and --section.key VALUE (see --help)")
    recipe_path = cli.get("train.deepspeed_config", file_overrides.get("train.deepspeed_config",
                                                                       cls().train.deepspeed_config))
    ds_dict, recipe = read_recipe(recipe_path)
    cfg = cls()
    for source, layer in ((f"recipe '{recipe_path}'", recipe), ("config file", file_overrides), ("command line", cli)):
        apply_overrides(cfg, layer, source)
    return cfg, ds_dict
