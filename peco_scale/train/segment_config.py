"""Config tree of a semantic-segmentation run (UperNet on a pre-trained ViT) and its checks.
Defaults follow BEiT / MAE on ADE20K (docs/dense.md): 512 crop, 160k iterations at batch 16,
AdamW at 1e-4 with layer decay (0.65 B and smaller, 0.9 L/H), 1500 warm-up steps, poly decay."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..config import ConfigError, field, with_defaults
from ..models.transfer import default_drop_path
from .config import (DataConfig, EvalTrainConfig, OptimConfig, StageConfig, TransferModelConfig, TransferResolved,
                     check_common, transfer_backbone, world_from_env)

# layer decay of the segmentation recipes by backbone (BEiT / MAE practice)
SEG_LAYER_DECAY = {"vit_large_patch16": 0.9, "vit_huge_patch14": 0.9}


@dataclass
class SegmentModelConfig(TransferModelConfig):
    """Backbone, neck and UperNet head. Recipe by backbone (-1): drop path 0.1 B and smaller, 0.2 L,
    0.3 H; layer decay 0.65 B and smaller, 0.9 L and H."""

    blocks: tuple[int, ...] = field((), "the 4 blocks feeding the neck (() = B 3,5,7,11; L 7,11,15,23; H 7,15,23,31)")
    channels: int = field(512, "UperNet channels (the auxiliary head has half)")
    aux_weight: float = field(0.4, "weight of the auxiliary FCN head's loss (the decode head's is 1)")


@dataclass
class SegmentDataConfig(DataConfig):
    """ADE20K-layout data, augmentation and sliding-window evaluation."""

    path: str = field("", "dataset root in the ADE20K layout: images/{training,validation}, annotations/{...}")
    num_classes: int = field(150, "classes scored (ids 0..C-1 after reduce-zero-label)")
    reduce_zero_label: bool = field(True, "id 0 is 'unlabelled' (ignored) and ids 1..C become 0..C-1 (ADE20K)")
    crop: int = field(512, "training crop and sliding-window size (the backbone's resolution)")
    ratio_min: float = field(0.5, "random rescale: smallest factor of the (4 crop, crop) scale")
    ratio_max: float = field(2.0, "random rescale: largest factor")
    cat_max_ratio: float = field(0.75, "a crop is redrawn (up to 10 times) while one class covers more than this")
    photometric: bool = field(True, "mmseg's photometric distortion (brightness, contrast, saturation, hue)")
    eval_stride: int = field(341, "sliding-window stride at evaluation")
    eval_flip: bool = field(False, "also score the mirrored windows at evaluation")


SegmentOptimConfig = with_defaults(OptimConfig, "SegmentOptimConfig", lr=1e-4, base_batch=16, schedule="poly",
                                   warmup_steps=1500, min_lr=0.0)
SegmentTrainConfig = with_defaults(EvalTrainConfig, "SegmentTrainConfig", output_dir="runs/segment",
                                   deepspeed_config="ds_configs/segment_zero2_vitb.json", max_steps=160000,
                                   new={"eval_every": (int, 16000, "steps between evaluations (and one at the end)")})


class SegmentConfig(StageConfig, model=SegmentModelConfig, data=SegmentDataConfig,
                    optim=SegmentOptimConfig, train=SegmentTrainConfig):
    ALIASES: ClassVar[dict[str, str]] = {"init": "model.init", "model": "model.name", "crop": "data.crop"}


@dataclass(kw_only=True)
class SegmentResolved(TransferResolved):
    crop: int
    blocks: tuple[int, ...]


def resolve_segment(cfg: SegmentConfig, world: int | None = None) -> SegmentResolved:
    """Every cheap check, one line each, before any launch cost (no weights are read)."""
    from ..data.segmentation import scan_segmentation
    from ..data.spec import DataError
    from ..models.dense import check_blocks, default_blocks

    m, d, t = cfg.model, cfg.data, cfg.train
    world = world or world_from_env()
    name, preset, crop, drop_path, layer_decay = transfer_backbone(
        m, d.crop, " (data.crop is the backbone's resolution)", lambda n: SEG_LAYER_DECAY.get(n, 0.65), default_drop_path)
    if d.backend != "folder":
        raise ConfigError(f"data.backend='{d.backend}': segmentation reads the ADE20K folder layout (folder only)")
    accum = check_common(cfg, world)
    blocks = check_blocks(tuple(m.blocks) or default_blocks(preset.depth), preset.depth, want=4)
    if d.num_classes < 2:
        raise ConfigError(f"data.num_classes={d.num_classes} must be >= 2 (ADE20K: 150)")
    if not 0 < d.ratio_min <= d.ratio_max:
        raise ConfigError(f"data.ratio_min={d.ratio_min}, data.ratio_max={d.ratio_max}: need 0 < min <= max, e.g. 0.5, 2.0")
    if not 0 < d.eval_stride <= crop:
        raise ConfigError(f"data.eval_stride={d.eval_stride} must be in 1..{crop} (data.crop), e.g. {crop * 2 // 3}")
    if t.eval_every < 1:
        raise ConfigError(f"train.eval_every={t.eval_every} must be >= 1 (steps)")
    try:  # both splits exist and every image has its annotation
        for split in ("training", "validation"):
            scan_segmentation(d.path, split)
    except DataError as exc:
        raise ConfigError(str(exc)) from None
    return SegmentResolved(model_name=name, crop=crop, num_classes=d.num_classes, blocks=blocks,
                           drop_path=drop_path,
                           layer_decay=layer_decay, batch_size=t.batch_size, grad_accum=accum, world_size=world)
