"""The config every stage shares: the Train/Optim/Data sections, one argv parser, one precedence
order and the checks common to all stages.

A stage's config tree (``tokenizer_config.py``, ``pretrain_config.py``, ``finetune_config.py``)
is a dataclass whose ``train``, ``optim`` and ``data`` sections extend the ones here (other
defaults, extra keys) beside its own sections. Every stage resolves in the same order:

    dataclass defaults -> preset (stages that have them) -> the recipe (``train.deepspeed_config``:
    its batch/optimizer fields and its "peco_scale" block) -> --config FILE -> --section.key flags

Keys renamed since earlier versions are mapped with a warning (``RENAMED``); removed ones give
one line naming the replacement (``REMOVED``). The resolved values are checked once, by the
stage's ``resolve`` (it calls :func:`check_common`), before any process group or model exists.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping

from peco_kernels import BACKENDS as KERNEL_BACKENDS

from ..config import ConfigError, apply_overrides, field, load_file, parse_cli, section
from ..data.spec import BACKENDS as DATA_BACKENDS
from ..models.vit import parse_model_name
from .recipe import read_recipe, resolve_accum

log = logging.getLogger("peco_scale")

PRECISIONS = ("auto", "bf16", "fp32")
SCHEDULES = ("constant", "cosine", "poly", "step")

# old key -> new key (both config files and flags)
RENAMED = {"train.grad_clip": "optim.grad_clip", "quantizer.kernels": "train.kernels", "model.kernels": "train.kernels"}
# old key -> what to write instead
REMOVED = {"optim.min_lr_ratio": "set optim.min_lr, the cosine schedule's final learning rate (lr x ratio)"}


@dataclass
class DataConfig:
    """Input data and augmentation."""

    path: str = field("", "ImageFolder root (root/<class>/<img> or root/train/<class>/<img>), or a .beton for ffcv")
    backend: str = field("folder", "folder (PIL in DataLoader workers), ffcv (a .beton) or dali (the folder)")
    workers: int = field(8, "loader workers (folder, ffcv) or threads (dali) per rank")
    min_crop_scale: float = field(0.08, "RandomResizedCrop minimum area fraction")
    jitter: float = field(0.4, "colour jitter strength (brightness, contrast, saturation)")
    hflip: float = field(0.5, "horizontal flip probability")


@dataclass
class OptimConfig:
    """Optimizer (AdamW; the tokenizer's Adam) and learning-rate schedule."""

    lr: float = field(1.5e-3, "learning rate at optim.base_batch images (scaled linearly with the global batch)")
    base_batch: int = field(2048, "global batch at which optim.lr is given (0 = lr is not scaled)")
    betas: tuple[float, float] = field((0.9, 0.999), "Adam(W) betas")
    eps: float = field(1e-8, "Adam(W) eps")
    weight_decay: float = field(0.05, "weight decay")
    schedule: str = field("cosine", "after warm-up: cosine or poly (linear, power 1; both down to optim.min_lr), "
                                              "step (x0.1 at 8/9 and again at 26/27 of the steps) or constant")
    warmup_epochs: float = field(10.0, "linear warm-up in epochs")
    warmup_steps: int = field(-1, "linear warm-up in steps (-1 = from warmup_epochs)")
    min_lr: float = field(1e-5, "the cosine schedule ends here")
    grad_clip: float = field(0.0, "gradient-norm clipping (0 = off)")


@dataclass
class TrainConfig:
    """Run control."""

    output_dir: str = field("runs/run", "run folder: config, metrics.jsonl, checkpoints")
    batch_size: int = field(0, "micro-batch per rank (0 = the recipe's train_micro_batch_size_per_gpu)")
    grad_accum: int = field(0, "micro-steps per optimizer step (0 = global_batch / (batch_size x world size))")
    global_batch: int = field(0, "images per optimizer step over all ranks (0 = the recipe's train_batch_size)")
    epochs: int = field(100, "epochs to train (ignored when max_steps > 0)")
    max_steps: int = field(0, "optimizer steps to train (0 = use epochs)")
    log_every: int = field(10, "steps between metrics.jsonl rows")
    image_every: int = field(0, "steps between pictures of the predictions on a training batch in "
                                "<output_dir>/images/step_XXXXXXXX.png and wandb, and one at the end "
                                "(tokenizer and pretrain stages; 0 = none)")
    ckpt_every: int = field(1000, "steps between checkpoints (and one at the end)")
    keep_last: int = field(2, "complete checkpoints kept")
    resume: str = field("", "'auto' = newest complete checkpoint in output_dir, or a checkpoint folder")
    seed: int = field(0, "seed of data order, augmentation and init")
    precision: str = field("auto", "auto (the recipe's bf16 on GPU, fp32 on CPU), bf16 or fp32")
    zero_stage: int = field(-1, "override the recipe's ZeRO stage (-1 = keep)")
    deepspeed_config: str = field("", "the recipe: DeepSpeed JSON (+ its peco_scale block)")
    kernels: str = field("auto", "custom kernels (VQ nearest-code search, MIM head + loss): auto (Triton on CUDA), "
                                 "triton or torch; a choice of this run, not saved with the weights")
    wandb: bool = field(False, "log to Weights & Biases on rank 0 (offline without WANDB_API_KEY)")
    wandb_project: str = field("peco-scale", "wandb project")


@dataclass
class TransferModelConfig:
    """A pre-trained backbone inside a task model; each transfer stage's section names its recipe
    values by backbone size in its own docstring."""

    name: str = field("vit_base_patch16", "backbone preset (vit_pico_patch16 ... vit_huge_patch14), optional "
                                          "_224/_448 suffix")
    init: str = field("", "pretrained weights: a stage-2 run/checkpoint folder, an exported backbone.safetensors, "
                          "or a timm checkpoint file ('' = random init)")
    drop_path: float = field(-1.0, "stochastic depth (-1 = the recipe's for the backbone size)")
    layer_decay: float = field(-1.0, "layer-wise lr decay (-1 = the recipe's for the backbone size; 1 = off)")
    stream_scale: float = field(1.0, "multiply the pre-trained ViT's residual stream by this before fine-tuning: the "
                                     "same function, smaller weights (docs/dense.md; 1 = as loaded; random init "
                                     "ignores it)")


@dataclass
class EvalTrainConfig(TrainConfig):
    """Run control of a stage that evaluates on held-out data."""

    eval_only: str = field("", "evaluate this checkpoint and exit, training nothing: a step_XXXXXXXX folder, or a run "
                               "folder (its best checkpoint, else its newest); the row goes to "
                               "<output_dir>/eval_<checkpoint>.json")


@dataclass
class PerceptualConfig:
    """Frozen perceptual network."""

    arch: str = field("vit_base_patch16", "frozen feature network: vit_base_patch16, resnet50, vgg16, vit_tiny_patch16, resnet_tiny")
    layers: list[int] = field([], "layers to compare (empty = the arch's default, e.g. ViT blocks 3,6,9,12)")
    weights: str = field("", "local checkpoint file (MoCo v3 or timm format), or 'random' (demo/tests only)")


@dataclass
class DiscConfig:
    """Optional patch discriminator."""

    enabled: bool = field(False, "add the patch discriminator (hinge loss), paper Table 10")
    weight: float = field(0.4, "adversarial loss weight")
    start_step: int = field(10000, "step from which the adversarial terms are used")
    channels: int = field(64, "discriminator base channels")
    n_layers: int = field(3, "discriminator depth")
    lr: float = field(5e-5, "discriminator Adam learning rate")


def check_perceptual(p: PerceptualConfig, weight: float) -> None:
    """perceptual.weights names a local file (or 'random'), unless the loss is off (``weight`` 0)."""
    if weight == 0:
        return
    if not p.weights:
        raise ConfigError(f"perceptual.weights is empty; pass perceptual.weights=PATH to a local MoCo v3 / timm "
                          f"checkpoint of {p.arch} (nothing is downloaded), or perceptual.weights=random for the demo")
    if p.weights != "random" and not Path(p.weights).is_file():
        raise ConfigError(f"perceptual weights file '{p.weights}' not found; pass perceptual.weights=PATH to a local "
                          f"MoCo v3 / timm checkpoint of {p.arch}, or perceptual.weights=random (demo only)")



class StageConfig:
    """Base of a stage's config tree. A stage names its sections as class keywords, in order::

        class FinetuneConfig(StageConfig, model=FinetuneModelConfig, data=FinetuneDataConfig, ...):
            ALIASES = {...}

    Each keyword becomes a field holding that section built with its own defaults (documented by
    the section class's docstring), and the class becomes a dataclass. Class attributes: the
    command-line shorthands, presets and the ZeRO stages the stage supports."""

    ALIASES: ClassVar[dict[str, str]] = {}
    PRESET_KEY: ClassVar[str] = ""  # dotted key naming a preset ('' = the stage has none)
    PRESETS: ClassVar[Mapping[str, Mapping[str, Any]]] = {}
    PRESET_WHAT: ClassVar[str] = "preset"
    ZERO_STAGES: ClassVar[tuple[int, ...]] = (0, 1, 2, 3)

    def __init_subclass__(cls, **sections: type) -> None:
        super().__init_subclass__()
        annotations = dict(cls.__dict__.get("__annotations__", {}))
        for name, section_cls in sections.items():
            annotations[name] = section_cls
            setattr(cls, name, section(section_cls, (section_cls.__doc__ or "").strip()))
        cls.__annotations__ = annotations
        dataclass(cls)


# shorthands every stage accepts
COMMON_ALIASES = {
    "data": "data.path", "output_dir": "train.output_dir", "epochs": "train.epochs", "max_steps": "train.max_steps",
    "resume": "train.resume", "deepspeed_config": "train.deepspeed_config", "batch_size": "train.batch_size",
    "global_batch": "train.global_batch", "grad_accum": "train.grad_accum", "seed": "train.seed", "lr": "optim.lr",
    "workers": "data.workers", "kernels": "train.kernels", "eval_only": "train.eval_only",
}


def _migrate(layer: Mapping[str, Any], source: str) -> dict[str, Any]:
    out = {}
    for key, value in layer.items():
        if key in REMOVED:
            raise ConfigError(f"config key '{key}' (from {source}) was removed; {REMOVED[key]}")
        if key in RENAMED:
            log.warning("config key '%s' (from %s) is now '%s'; please rename it", key, source, RENAMED[key])
            key = RENAMED[key]
        out[key] = value
    return out


def resolve_layers(cls: type, file_overrides: Mapping[str, Any] | None,
                   cli_overrides: Mapping[str, Any]) -> tuple[Any, dict[str, Any]]:
    """(config tree of type ``cls``, the recipe's DeepSpeed dict without our blocks), in the
    module's precedence order."""
    file_layer = _migrate(file_overrides or {}, "config file")
    cli_layer = _migrate(cli_overrides, "command line")
    path = cli_layer.get("train.deepspeed_config", file_layer.get("train.deepspeed_config",
                                                                  cls().train.deepspeed_config))
    ds_dict, recipe = read_recipe(path)
    layers = [(f"recipe '{path}'", _migrate(recipe, f"recipe '{path}'")), ("config file", file_layer),
              ("command line", cli_layer)]
    cfg = cls()
    if cls.PRESET_KEY:
        name = "default"
        for _, layer in layers:
            name = str(layer.get(cls.PRESET_KEY, name))
        if name not in cls.PRESETS:
            raise ConfigError(f"unknown {cls.PRESET_WHAT} '{name}'; choose one of {', '.join(cls.PRESETS)}")
        apply_overrides(cfg, {cls.PRESET_KEY: name, **cls.PRESETS[name]}, f"preset '{name}'")
    for source, layer in layers:
        apply_overrides(cfg, layer, source)
    return cfg, ds_dict


def config_from_argv(argv: list[str], cls: type) -> tuple[Any, dict[str, Any]]:
    """``--config FILE`` and ``--section.key VALUE`` flags -> :func:`resolve_layers`."""
    cli, options = parse_cli(argv, {**COMMON_ALIASES, **cls.ALIASES})
    file_overrides = load_file(options.pop("config")) if "config" in options else None
    options.pop("local_rank", None)  # passed by the deepspeed launcher; LOCAL_RANK is read from env
    if options:
        raise ConfigError(f"unknown option(s) {', '.join('--' + k for k in options)}; options are --config FILE "
                          f"and --section.key VALUE (see --help)")
    return resolve_layers(cls, file_overrides, cli)


@dataclass(kw_only=True)
class Batching:
    """The batch a stage resolved: per-rank micro-batch, accumulation and ranks (a stage's
    resolved values extend it)."""
    batch_size: int
    grad_accum: int
    world_size: int

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.grad_accum * self.world_size


def check_common(cfg: Any, world: int | None = None) -> int:
    """The checks every stage shares, one line each; returns the gradient accumulation that makes
    ``batch_size x grad_accum x world`` the global batch (``world``: default $WORLD_SIZE or 1)."""
    t, o, d = cfg.train, cfg.optim, cfg.data
    world = world or world_from_env()
    if not d.path:
        raise ConfigError("no data given; pass --data DIR (an ImageFolder tree, or `python -m peco_scale.data demo "
                          "--out DIR` for the demo set)")
    if d.backend not in DATA_BACKENDS:
        raise ConfigError(f"data.backend='{d.backend}' must be {', '.join(DATA_BACKENDS[:-1])} or {DATA_BACKENDS[-1]}")
    if t.kernels not in KERNEL_BACKENDS:
        raise ConfigError(f"train.kernels='{t.kernels}' must be one of {', '.join(KERNEL_BACKENDS)}")
    if t.precision not in PRECISIONS:
        raise ConfigError(f"train.precision='{t.precision}' must be auto, bf16 or fp32")
    stages = type(cfg).ZERO_STAGES
    if t.zero_stage != -1 and t.zero_stage not in stages:
        raise ConfigError(f"train.zero_stage={t.zero_stage} must be {stages[0]}-{stages[-1]} for this stage "
                          f"(or -1 to keep the recipe's)")
    if t.max_steps <= 0 and t.epochs <= 0:
        raise ConfigError(f"train.epochs={t.epochs} and train.max_steps={t.max_steps}: set one of them positive")
    if not (math.isfinite(o.lr) and o.lr > 0) or o.base_batch < 0:
        raise ConfigError(f"optim.lr={o.lr} must be positive and optim.base_batch={o.base_batch} >= 0")
    if o.schedule not in SCHEDULES:
        raise ConfigError(f"optim.schedule='{o.schedule}' must be one of {', '.join(SCHEDULES)}")
    if t.image_every < 0:
        raise ConfigError(f"train.image_every={t.image_every} must be >= 0 (0 = no pictures)")
    if t.resume not in ("", "auto") and not Path(t.resume).is_dir():
        raise ConfigError(f"train.resume='{t.resume}' is neither 'auto' nor a checkpoint folder")
    return resolve_accum(t.batch_size, t.grad_accum, t.global_batch, world, t.deepspeed_config)


@dataclass(kw_only=True)
class TransferResolved(Batching):
    """What a transfer stage's checks resolve: the backbone preset and its recipe values."""

    model_name: str
    num_classes: int
    drop_path: float
    layer_decay: float


def world_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def scaled_lr(optim: OptimConfig, global_batch: int) -> float:
    """``optim.lr`` scaled linearly from ``optim.base_batch`` to ``global_batch`` (unscaled when 0)."""
    return optim.lr * global_batch / optim.base_batch if optim.base_batch else optim.lr


def model_size(name: str, img_size: int, what: str = "") -> tuple[str, Any, int]:
    """(canonical name, preset, resolution) of a backbone; a resolution that is not a multiple of
    the patch size is one line."""
    name, preset, size = parse_model_name(name, img_size or None)
    p = preset.patch_size
    if size <= 0 or size % p:
        lo = max(p, size // p * p)
        raise ConfigError(f"model.img_size={size} is not divisible by the patch size {p} of {name}{what}; "
                          f"use {lo} or {lo + p}")
    return name, preset, size


def transfer_backbone(m: Any, img_size: int, what: str, decay: Callable[[str], float],
                      drop: Callable[[str], float]) -> tuple[str, Any, int, float, float]:
    """(name, preset, resolution, drop_path, layer_decay) of a transfer stage's backbone from its
    model section (name, init, drop_path, layer_decay; negative = the preset's value from
    ``drop`` / ``decay``), checked one line each."""
    name, preset, size = model_size(m.name, img_size, what)
    if m.init and not Path(m.init).exists():
        raise ConfigError(f"model.init='{m.init}' does not exist; pass a stage-2 run folder, an exported "
                          f"backbone.safetensors or a timm checkpoint file (or '' for random init)")
    layer_decay = decay(name) if m.layer_decay < 0 else m.layer_decay
    if not 0 < layer_decay <= 1:
        raise ConfigError(f"model.layer_decay={m.layer_decay} must be in (0, 1] (1 = no decay)")
    if not 0 < m.stream_scale < float("inf"):
        raise ConfigError(f"model.stream_scale={m.stream_scale} must be positive and finite (1 = the weights as loaded; "
                          f"about 0.75 / the backbone's residual-stream rms brings it to a fresh init's size)")
    return name, preset, size, drop(name) if m.drop_path < 0 else m.drop_path, layer_decay
