"""Config tree of a detection / instance-segmentation run (Mask R-CNN on a pre-trained ViT) and its
checks. Defaults follow ViTDet on COCO (docs/dense.md): 1024 px large-scale jitter, AdamW at 1e-4
for batch 64 with weight decay 0.1, 250 warm-up steps, x0.1 steps at 8/9 and 26/27 of 184375
iterations, layer decay 0.7 / 0.8 / 0.9 and drop path 0.1 / 0.4 / 0.5 for B / L / H, window
attention (14) with 4 global blocks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..config import ConfigError, field, with_defaults
from .config import (DataConfig, EvalTrainConfig, OptimConfig, StageConfig, TransferModelConfig, TransferResolved,
                     check_common, transfer_backbone, world_from_env)

# ViTDet's recipes by backbone (B and smaller take B's)
DET_LAYER_DECAY = {"vit_large_patch16": 0.8, "vit_huge_patch14": 0.9}
DET_DROP_PATH = {"vit_large_patch16": 0.4, "vit_huge_patch14": 0.5}


@dataclass
class DetectModelConfig(TransferModelConfig):
    """Backbone (patch 16), simple feature pyramid and Mask R-CNN. Recipe by backbone (-1, ViTDet's):
    drop path 0.1 B and smaller, 0.4 L, 0.5 H; layer decay 0.7 B and smaller, 0.8 L, 0.9 H."""

    window: int = field(14, "window attention size in patches (0 = global attention in every block)")
    global_attn: tuple[int, ...] = field((), "blocks with global attention (() = the last of each quarter: "
                                             "B 2,5,8,11; L 5,11,17,23)")
    channels: int = field(256, "feature pyramid and mask head width (the box head's MLP is 4x)")
    detections: int = field(100, "detections kept per image at evaluation")
    anchors: tuple[int, ...] = field((32, 64, 128, 256, 512), "RPN anchor sizes in pixels on P2..P6, one per "
                                     "level (aspect ratios 0.5, 1, 2); scale them with your objects' sizes")


@dataclass
class DetectDataConfig(DataConfig):
    """COCO-format data, large-scale jitter and evaluation."""

    path: str = field("", "dataset root: annotations/instances_<split>.json and images/<split>/ (or <split>/)")
    train_split: str = field("training", "training split name (COCO: train2017)")
    val_split: str = field("validation", "evaluation split name (COCO: val2017)")
    size: int = field(1024, "square input size (a multiple of 32): longer side at evaluation, jitter target")
    scale_min: float = field(0.1, "large-scale jitter: smallest factor of data.size")
    scale_max: float = field(2.0, "large-scale jitter: largest factor")


DetectOptimConfig = with_defaults(OptimConfig, "DetectOptimConfig", lr=1e-4, base_batch=64, weight_decay=0.1,
                                  schedule="step", warmup_steps=250, min_lr=0.0)
DetectTrainConfig = with_defaults(EvalTrainConfig, "DetectTrainConfig", output_dir="runs/detect",
                                  deepspeed_config="ds_configs/detect_zero2_vitb.json", max_steps=184375,
                                  new={"eval_every": (int, 20000, "steps between evaluations (and one at the end)")})


class DetectConfig(StageConfig, model=DetectModelConfig, data=DetectDataConfig, optim=DetectOptimConfig,
                   train=DetectTrainConfig):
    ALIASES: ClassVar[dict[str, str]] = {"init": "model.init", "model": "model.name", "size": "data.size"}


@dataclass(kw_only=True)
class DetectResolved(TransferResolved):
    size: int
    categories: list[tuple[int, str]]
    window: int
    global_attn: tuple[int, ...]


def resolve_detect(cfg: DetectConfig, world: int | None = None) -> DetectResolved:
    """Every cheap check, one line each, before any launch cost (reads the annotation files once
    per process; no weights are read)."""
    from ..data.detection import CocoSplit, check_categories
    from ..data.spec import DataError
    from ..models.dense import check_blocks, global_blocks

    m, d, t = cfg.model, cfg.data, cfg.train
    world = world or world_from_env()
    name, preset, size, drop_path, layer_decay = transfer_backbone(
        m, d.size, " (data.size is the backbone's resolution)", lambda n: DET_LAYER_DECAY.get(n, 0.7),
        lambda n: DET_DROP_PATH.get(n, 0.1))
    if preset.patch_size != 16:
        raise ConfigError(f"model.name={name}: the detector's feature pyramid needs patch 16 (strides 4-64); "
                          f"use a patch-16 backbone such as vit_large_patch16")
    if size % 32:
        raise ConfigError(f"data.size={size} must be a multiple of 32 (the pyramid's P5 stride); "
                          f"use {max(32, size // 32 * 32)} or {size // 32 * 32 + 32}")
    if d.backend != "folder":
        raise ConfigError(f"data.backend='{d.backend}': detection reads COCO JSON and its image folder (folder only)")
    if not 0 < d.scale_min <= d.scale_max:
        raise ConfigError(f"data.scale_min={d.scale_min}, data.scale_max={d.scale_max}: need 0 < min <= max, "
                          f"e.g. 0.1, 2.0")
    if m.window < 0 or m.detections < 1 or m.channels < 1 or t.eval_every < 1:
        raise ConfigError(f"model.window={m.window} (>= 0), model.detections={m.detections}, model.channels="
                          f"{m.channels} and train.eval_every={t.eval_every} (each >= 1): one is out of range")
    if len(m.anchors) != 5 or any(a <= 0 for a in m.anchors):
        raise ConfigError(f"model.anchors={list(m.anchors)}: give 5 positive sizes in pixels, one per pyramid level "
                          f"P2..P6, e.g. [32, 64, 128, 256, 512] (ViTDet at 1024 px)")
    glob = check_blocks(tuple(m.global_attn) or global_blocks(preset.depth), preset.depth) if m.window else ()
    accum = check_common(cfg, world)
    try:
        train, val = CocoSplit(d.path, d.train_split), CocoSplit(d.path, d.val_split)
        check_categories(train, val)
    except DataError as exc:
        raise ConfigError(str(exc)) from None
    if not any(val.has_instances(i) for i in val.image_ids):
        raise ConfigError(f"{val.ann_file} has no non-crowd instance: nothing to score AP on; pass a validation "
                          f"split with annotations (--data.val_split)")
    return DetectResolved(model_name=name, size=size, num_classes=len(train.categories),
                          categories=train.categories, window=m.window, global_attn=glob, drop_path=drop_path,
                          layer_decay=layer_decay, batch_size=t.batch_size, grad_accum=accum, world_size=world)
