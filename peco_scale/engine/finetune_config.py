"""Config tree of a fine-tuning run (stage 3) and the checks run before training.

Precedence as in stage 2: defaults -> the DeepSpeed recipe (its batch/optimizer fields and its
"peco_scale" block) -> --config FILE -> --section.key flags. The run-control and optimizer
sections are stage 2's with fine-tuning defaults (BEiT/PeCo recipe, docs/method.md).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import ConfigError, field, section
from ..models.transfer import default_drop_path, default_layer_decay
from ..models.vit import parse_model_name
from .ds import config_from_recipe_argv, resolve_accum
from .stage2_config import OptimConfig, TrainConfig


@dataclass
class FinetuneModelConfig:
    name: str = field("vit_base_patch16", "backbone preset (vit_pico_patch16 ... vit_huge_patch14), optional _224/_448 suffix")
    img_size: int = field(0, "fine-tuning resolution (0 = the name's suffix, else 224); position embeddings are resized")
    init: str = field("", "pretrained weights: a stage-2 run/checkpoint folder, an exported backbone.safetensors, "
                          "or a timm checkpoint file ('' = random init)")
    num_classes: int = field(0, "classifier outputs (0 = the number of classes in data.path)")
    drop_path: float = field(-1.0, "stochastic depth (-1 = preset: 0.1 for B and smaller, 0.2 L, 0.3 H)")
    layer_decay: float = field(-1.0, "layer-wise lr decay (-1 = preset: 0.65 B and smaller, 0.75 L, 0.8 H; 1 = off)")
    ema: bool = field(False, "keep an EMA of the weights (partitioned like the weights under ZeRO-3) and evaluate it")
    ema_decay: float = field(0.9999, "EMA decay per optimizer step")


@dataclass
class FinetuneDataConfig:
    path: str = field("", "training ImageFolder root (root/<class>/<img> or root/train/<class>/<img>), or a .beton")
    val_path: str = field("", "held-out ImageFolder root evaluated every epoch (same classes as data.path)")
    backend: str = field("folder", "training reader: folder, ffcv (a .beton) or dali; evaluation reads the folder")
    workers: int = field(8, "loader workers (folder, ffcv) or threads (dali) per rank")
    min_crop_scale: float = field(0.08, "RandomResizedCrop minimum area fraction")
    jitter: float = field(0.4, "colour jitter strength (brightness, contrast, saturation)")
    hflip: float = field(0.5, "horizontal flip probability")
    mixup: float = field(0.8, "mixup alpha (0 = off; timm Mixup)")
    cutmix: float = field(1.0, "cutmix alpha (0 = off)")
    smoothing: float = field(0.1, "label smoothing")
    eval_crop_pct: float = field(0.875, "evaluation: resize to img_size / crop_pct, centre crop img_size")
    eval_batch_size: int = field(0, "evaluation micro-batch per rank (0 = train.batch_size)")


@dataclass
class FinetuneOptimConfig(OptimConfig):
    lr: float = field(4e-3, "AdamW lr at optim.base_batch images (scaled linearly with the global batch)")
    base_batch: int = field(1024, "global batch at which optim.lr is given")
    warmup_epochs: float = field(20.0, "linear warm-up in epochs")
    min_lr: float = field(1e-6, "cosine schedule ends here")
    grad_clip: float = field(0.0, "gradient-norm clipping (0 = off, as BEiT fine-tuning)")


@dataclass
class FinetuneTrainConfig(TrainConfig):
    output_dir: str = field("runs/finetune", "run folder: config, metrics.jsonl, checkpoints")
    epochs: int = field(100, "epochs to train (ignored when max_steps > 0)")
    deepspeed_config: str = field("ds_configs/finetune_zero2_vitb.json", "the recipe: DeepSpeed JSON (+ its peco_scale block)")
    eval_every: int = field(1, "epochs between evaluations (and one at the end)")


@dataclass
class FinetuneConfig:
    model: FinetuneModelConfig = section(FinetuneModelConfig, "classifier and its initialisation")
    data: FinetuneDataConfig = section(FinetuneDataConfig, "data, augmentation, mixup/cutmix")
    optim: FinetuneOptimConfig = section(FinetuneOptimConfig, "AdamW, layer decay schedule")
    train: FinetuneTrainConfig = section(FinetuneTrainConfig, "run control")


FINETUNE_ALIASES = {
    "data": "data.path", "val": "data.val_path", "init": "model.init", "model": "model.name",
    "img_size": "model.img_size", "output_dir": "train.output_dir", "epochs": "train.epochs",
    "max_steps": "train.max_steps", "resume": "train.resume", "deepspeed_config": "train.deepspeed_config",
    "batch_size": "train.batch_size", "global_batch": "train.global_batch", "grad_accum": "train.grad_accum",
    "seed": "train.seed", "lr": "optim.lr", "workers": "data.workers", "ema": "model.ema",
}


def config_from_argv(argv: list[str]) -> tuple[FinetuneConfig, dict[str, Any]]:
    """Flags -> (resolved config, the DeepSpeed dict of the recipe without our blocks)."""
    return config_from_recipe_argv(argv, FinetuneConfig, FINETUNE_ALIASES)


@dataclass
class FinetuneResolved:
    model_name: str
    img_size: int
    num_classes: int
    classes: list[str]
    drop_path: float
    layer_decay: float
    batch_size: int
    grad_accum: int
    world_size: int
    eval_batch_size: int

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.grad_accum * self.world_size


def _classes_of(path: str, backend: str) -> list[str]:
    if backend == "ffcv" and path.endswith(".beton"):
        from ..data.ffcv_backend import read_sidecar

        side = read_sidecar(path)
        if side is None:
            raise ConfigError(f"'{path}' has no sidecar '{path}.json' with its classes; rewrite it with "
                              f"`python -m peco_scale.data convert --to ffcv`")
        return list(side["classes"])
    from ..data.folder import scan_image_folder

    return scan_image_folder(path)[1]


def resolve_finetune(cfg: FinetuneConfig, world_size: int | None = None) -> FinetuneResolved:
    """Every cheap check, one line each, before any launch cost (no weights are read)."""
    m, t, o, d = cfg.model, cfg.train, cfg.optim, cfg.data
    world = world_size or int(os.environ.get("WORLD_SIZE", "1"))
    name, preset, img_size = parse_model_name(m.name, m.img_size or None)
    p = preset.patch_size
    if img_size <= 0 or img_size % p:
        lo = max(p, img_size // p * p)
        raise ConfigError(f"model.img_size={img_size} is not divisible by the patch size {p} of {name}, so the "
                          f"position embeddings cannot be resized to it; use {lo} or {lo + p}")
    if m.init and not Path(m.init).exists():
        raise ConfigError(f"model.init='{m.init}' does not exist; pass a stage-2 run folder, an exported "
                          f"backbone.safetensors or a timm checkpoint file (or '' for random init)")
    if not d.path:
        raise ConfigError("no training data given; pass --data DIR (an ImageFolder tree)")
    if not d.val_path:
        raise ConfigError("no evaluation data given; pass --val DIR (a held-out ImageFolder tree with the same classes)")
    if d.backend not in ("folder", "ffcv", "dali"):
        raise ConfigError(f"data.backend='{d.backend}' must be folder, ffcv or dali")
    from ..data.folder import DataError, scan_image_folder

    try:
        classes = _classes_of(d.path, d.backend)
        val_classes = scan_image_folder(d.val_path)[1]
    except DataError as exc:
        raise ConfigError(str(exc)) from None
    if val_classes != classes:
        diff = next((f"'{a}' vs '{b}'" for a, b in zip(classes, val_classes) if a != b),
                    f"{len(classes)} vs {len(val_classes)} classes")
        raise ConfigError(f"the classes of data.path ({len(classes)}) and data.val_path ({len(val_classes)}) differ "
                          f"({diff}); both trees need the same class folders")
    num_classes = m.num_classes or len(classes)
    if num_classes != len(classes):
        raise ConfigError(f"model.num_classes={m.num_classes} but '{d.path}' has {len(classes)} classes; set "
                          f"model.num_classes={len(classes)} (or 0)")
    drop_path = default_drop_path(name) if m.drop_path < 0 else m.drop_path
    layer_decay = default_layer_decay(name) if m.layer_decay < 0 else m.layer_decay
    if not 0 < layer_decay <= 1:
        raise ConfigError(f"model.layer_decay={m.layer_decay} must be in (0, 1] (1 = no decay)")
    if m.ema and not 0 <= m.ema_decay < 1:
        raise ConfigError(f"model.ema_decay={m.ema_decay} must be in [0, 1), e.g. 0.9999")
    accum = resolve_accum(t.batch_size, t.grad_accum, t.global_batch, world, t.deepspeed_config)
    if (d.mixup > 0 or d.cutmix > 0) and t.batch_size % 2:
        raise ConfigError(f"mixup/cutmix mix each batch with its reverse and need an even micro-batch; "
                          f"train.batch_size={t.batch_size} is odd (use {t.batch_size + 1}, or --data.mixup 0 --data.cutmix 0)")
    if not 0 < d.eval_crop_pct <= 1:
        raise ConfigError(f"data.eval_crop_pct={d.eval_crop_pct} must be in (0, 1], e.g. 0.875")
    if t.precision not in ("auto", "bf16", "fp32"):
        raise ConfigError(f"train.precision='{t.precision}' must be auto, bf16 or fp32")
    if t.zero_stage not in (-1, 0, 1, 2, 3):
        raise ConfigError(f"train.zero_stage={t.zero_stage} must be 0-3 (or -1 to keep the recipe's)")
    if t.max_steps <= 0 and t.epochs <= 0:
        raise ConfigError(f"train.epochs={t.epochs} and train.max_steps={t.max_steps}: set one of them positive")
    if t.eval_every < 1:
        raise ConfigError(f"train.eval_every={t.eval_every} must be >= 1 (epochs)")
    if not (math.isfinite(o.lr) and o.lr > 0) or o.base_batch <= 0:
        raise ConfigError(f"optim.lr={o.lr} and optim.base_batch={o.base_batch} must be positive")
    if t.resume not in ("", "auto") and not Path(t.resume).is_dir():
        raise ConfigError(f"train.resume='{t.resume}' is neither 'auto' nor a checkpoint folder")
    return FinetuneResolved(name, img_size, num_classes, classes, drop_path, layer_decay, t.batch_size, accum, world,
                            d.eval_batch_size or t.batch_size)
