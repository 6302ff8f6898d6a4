"""Config tree of a semantic-segmentation run (UperNet on a pre-trained ViT) and its checks.
Defaults follow BEiT / MAE on ADE20K (docs/dense.md): 512 crop, 160k iterations at batch 16,
AdamW at 1e-4 with layer decay (0.65 B and smaller, 0.9 L/H), 1500 warm-up steps, poly decay."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from ..config import ConfigError, field, section
from ..models.transfer import default_drop_path
from .config import Batching, DataConfig, OptimConfig, StageConfig, TrainConfig, check_common, world_from_env
from .pretrain_config import model_size

# layer decay of the segmentation recipes by backbone (BEiT / MAE practice)
SEG_LAYER_DECAY = {"vit_large_patch16": 0.9, "vit_huge_patch14": 0.9}


@dataclass
class SegmentModelConfig:
    name: str = field("vit_base_patch16", "backbone preset (vit_pico_patch16 ... vit_huge_patch14)")
    init: str = field("", "pretrained weights: a stage-2 run/checkpoint folder, an exported backbone.safetensors, "
                          "or a timm checkpoint file ('' = random init)")
    blocks: tuple[int, ...] = field((), "the 4 blocks feeding the neck (() = B 3,5,7,11; L 7,11,15,23; H 7,15,23,31)")
    channels: int = field(512, "UperNet channels (the auxiliary head has half)")
    aux_weight: float = field(0.4, "weight of the auxiliary FCN head's loss (the decode head's is 1)")
    drop_path: float = field(-1.0, "stochastic depth (-1 = preset: 0.1 for B and smaller, 0.2 L, 0.3 H)")
    layer_decay: float = field(-1.0, "layer-wise lr decay (-1 = 0.65 for B and smaller, 0.9 L/H; 1 = off)")


@dataclass
class SegmentDataConfig(DataConfig):
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


@dataclass
class SegmentOptimConfig(OptimConfig):
    lr: float = field(1e-4, "AdamW lr at optim.base_batch images (scaled linearly with the global batch)")
    base_batch: int = field(16, "global batch at which optim.lr is given")
    schedule: str = field("poly", "after warm-up: poly (linear), cosine or constant")
    warmup_steps: int = field(1500, "linear warm-up in steps (-1 = from warmup_epochs)")
    min_lr: float = field(0.0, "the poly / cosine schedule ends here")


@dataclass
class SegmentTrainConfig(TrainConfig):
    output_dir: str = field("runs/segment", "run folder: config, metrics.jsonl, checkpoints")
    deepspeed_config: str = field("ds_configs/segment_zero2_vitb.json", "the recipe: DeepSpeed JSON (+ its peco_scale block)")
    max_steps: int = field(160000, "optimizer steps to train (0 = use epochs)")
    eval_every: int = field(16000, "steps between evaluations (and one at the end)")


@dataclass
class SegmentConfig(StageConfig):
    model: SegmentModelConfig = section(SegmentModelConfig, "backbone, neck and UperNet head")
    data: SegmentDataConfig = section(SegmentDataConfig, "ADE20K-layout data and augmentation")
    optim: SegmentOptimConfig = section(SegmentOptimConfig, "AdamW, layer decay, schedule")
    train: SegmentTrainConfig = section(SegmentTrainConfig, "run control")

    ALIASES: ClassVar[dict[str, str]] = {"init": "model.init", "model": "model.name", "crop": "data.crop"}


@dataclass(kw_only=True)
class SegmentResolved(Batching):
    model_name: str
    crop: int
    num_classes: int
    blocks: tuple[int, ...]
    drop_path: float
    layer_decay: float


def resolve_segment(cfg: SegmentConfig, world: int | None = None) -> SegmentResolved:
    """Every cheap check, one line each, before any launch cost (no weights are read)."""
    from ..data.segmentation import scan_segmentation
    from ..data.spec import DataError
    from ..models.dense import check_blocks, default_blocks

    m, d, t = cfg.model, cfg.data, cfg.train
    world = world or world_from_env()
    name, preset, crop = model_size(m.name, d.crop, " (data.crop is the backbone's resolution)")
    if m.init and not Path(m.init).exists():
        raise ConfigError(f"model.init='{m.init}' does not exist; pass a stage-2 run folder, an exported "
                          f"backbone.safetensors or a timm checkpoint file (or '' for random init)")
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
    layer_decay = SEG_LAYER_DECAY.get(name, 0.65) if m.layer_decay < 0 else m.layer_decay
    if not 0 < layer_decay <= 1:
        raise ConfigError(f"model.layer_decay={m.layer_decay} must be in (0, 1] (1 = no decay)")
    if t.eval_every < 1:
        raise ConfigError(f"train.eval_every={t.eval_every} must be >= 1 (steps)")
    try:  # both splits exist and every image has its annotation
        for split in ("training", "validation"):
            scan_segmentation(d.path, split)
    except DataError as exc:
        raise ConfigError(str(exc)) from None
    return SegmentResolved(model_name=name, crop=crop, num_classes=d.num_classes, blocks=blocks,
                           drop_path=default_drop_path(name) if m.drop_path < 0 else m.drop_path,
                           layer_decay=layer_decay, batch_size=t.batch_size, grad_accum=accum, world_size=world)
