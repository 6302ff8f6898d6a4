"""Config tree of a fine-tuning run (stage 3) and its checks; shared sections and the resolution
order are in ``config.py``. Defaults follow the BEiT/PeCo fine-tuning recipe (docs/method.md)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..config import ConfigError, field, with_defaults
from ..models.transfer import default_drop_path, default_layer_decay
from .config import (DataConfig, EvalTrainConfig, OptimConfig, StageConfig, TransferModelConfig, TransferResolved,
                     check_common, transfer_backbone, world_from_env)


@dataclass
class FinetuneModelConfig(TransferModelConfig):
    """Classifier and its initialisation. Recipe by backbone (-1): drop path 0.1 B and smaller,
    0.2 L, 0.3 H; layer decay 0.65 B and smaller, 0.75 L, 0.8 H."""

    img_size: int = field(0, "fine-tuning resolution (0 = the name's suffix, else 224); position embeddings are resized")
    num_classes: int = field(0, "classifier outputs (0 = the number of classes in data.path)")
    ema: bool = field(False, "keep an EMA of the weights (partitioned like the weights under ZeRO-3) and evaluate it")
    ema_decay: float = field(0.9999, "EMA decay per optimizer step")


@dataclass
class FinetuneDataConfig(DataConfig):
    """Data, augmentation, mixup/cutmix and evaluation."""

    path: str = field("", "training ImageFolder root (root/<class>/<img> or root/train/<class>/<img>), or a .beton")
    val_path: str = field("", "held-out ImageFolder root evaluated every epoch (same classes as data.path)")
    backend: str = field("folder", "training reader: folder, ffcv (a .beton) or dali; evaluation reads the folder")
    mixup: float = field(0.8, "mixup alpha (0 = off; timm Mixup)")
    cutmix: float = field(1.0, "cutmix alpha (0 = off)")
    smoothing: float = field(0.1, "label smoothing")
    eval_crop_pct: float = field(0.875, "evaluation: resize to img_size / crop_pct, centre crop img_size")
    eval_batch_size: int = field(0, "evaluation micro-batch per rank (0 = train.batch_size)")


FinetuneOptimConfig = with_defaults(OptimConfig, "FinetuneOptimConfig", lr=4e-3, base_batch=1024, warmup_epochs=20.0,
                                    min_lr=1e-6)


FinetuneTrainConfig = with_defaults(EvalTrainConfig, "FinetuneTrainConfig", output_dir="runs/finetune",
                                    deepspeed_config="ds_configs/finetune_zero2_vitb.json",
                                    new={"eval_every": (int, 1, "epochs between evaluations (and one at the end)")})


class FinetuneConfig(StageConfig, model=FinetuneModelConfig, data=FinetuneDataConfig,
                     optim=FinetuneOptimConfig, train=FinetuneTrainConfig):
    ALIASES: ClassVar[dict[str, str]] = {"val": "data.val_path", "init": "model.init", "model": "model.name",
                                         "img_size": "model.img_size", "ema": "model.ema"}


@dataclass(kw_only=True)
class FinetuneResolved(TransferResolved):
    img_size: int
    classes: list[str]
    eval_batch_size: int


def _classes_of(path: str, backend: str) -> list[str]:
    if backend == "ffcv" and path.endswith(".beton"):
        from ..data.ffcv_backend import read_sidecar

        side = read_sidecar(path)
        if side is None:
            raise ConfigError(f"'{path}' has no sidecar '{path}.json' with its classes; rewrite it with "
                              f"`python -m peco_scale.data convert --to ffcv`")
        return list(side["classes"])
    from ..data import scan_image_folder

    return scan_image_folder(path)[1]


def _check_classes(d: FinetuneDataConfig) -> list[str]:
    from ..data import DataError, scan_image_folder

    if not d.val_path:
        raise ConfigError("no evaluation data given; pass --val DIR (a held-out ImageFolder tree with the same classes)")
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
    return classes


def resolve_finetune(cfg: FinetuneConfig, world: int | None = None) -> FinetuneResolved:
    """Every cheap check, one line each, before any launch cost (no weights are read)."""
    m, t, d = cfg.model, cfg.train, cfg.data
    world = world or world_from_env()
    name, _, img_size, drop_path, layer_decay = transfer_backbone(
        m, m.img_size, ", so the position embeddings cannot be resized to it", default_layer_decay, default_drop_path)
    accum = check_common(cfg, world)
    classes = _check_classes(d)
    num_classes = m.num_classes or len(classes)
    if num_classes != len(classes):
        raise ConfigError(f"model.num_classes={m.num_classes} but '{d.path}' has {len(classes)} classes; set "
                          f"model.num_classes={len(classes)} (or 0)")
    if m.ema and not 0 <= m.ema_decay < 1:
        raise ConfigError(f"model.ema_decay={m.ema_decay} must be in [0, 1), e.g. 0.9999")
    if (d.mixup > 0 or d.cutmix > 0) and t.batch_size % 2:
        raise ConfigError(f"mixup/cutmix mix each batch with its reverse and need an even micro-batch; "
                          f"train.batch_size={t.batch_size} is odd (use {t.batch_size + 1}, or --data.mixup 0 --data.cutmix 0)")
    if not 0 < d.eval_crop_pct <= 1:
        raise ConfigError(f"data.eval_crop_pct={d.eval_crop_pct} must be in (0, 1], e.g. 0.875")
    if t.eval_every < 1:
        raise ConfigError(f"train.eval_every={t.eval_every} must be >= 1 (epochs)")
    return FinetuneResolved(model_name=name, img_size=img_size, num_classes=num_classes, classes=classes,
                            drop_path=drop_path, layer_decay=layer_decay, eval_batch_size=d.eval_batch_size or t.batch_size,
                            batch_size=t.batch_size, grad_accum=accum, world_size=world)
