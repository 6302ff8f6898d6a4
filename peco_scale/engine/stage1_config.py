"""Config tree of a stage-1 (tokenizer) run, its presets, and the checks run before training."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from ..config import ConfigError, apply_overrides, field, load_file, parse_cli, section
from ..models.quantizer import QuantizerConfig
from ..models.tokenizer import TOKENIZER_PRESETS, TokenizerModelConfig
from .checkpoint import check_writable


@dataclass
class PerceptualConfig:
    arch: str = field("vit_base_patch16", "frozen feature network: vit_base_patch16, resnet50, vgg16, vit_tiny_patch16, resnet_tiny")
    layers: list[int] = field([], "layers to compare (empty = the arch's default, e.g. ViT blocks 3,6,9,12)")
    weights: str = field("", "local checkpoint file (MoCo v3 or timm format), or 'random' (demo/tests only)")


@dataclass
class LossConfig:
    pixel: str = field("l2", "pixel loss: l2 (MSE) or l1")
    perceptual_weight: float = field(1.0, "lambda, the perceptual loss weight (paper: 1; 0 = plain VQ-VAE)")


@dataclass
class DiscConfig:
    enabled: bool = field(False, "add the patch discriminator (hinge loss), paper Table 10")
    weight: float = field(0.4, "adversarial loss weight")
    start_step: int = field(10000, "step from which the adversarial terms are used")
    channels: int = field(64, "discriminator base channels")
    n_layers: int = field(3, "discriminator depth")
    lr: float = field(5e-5, "discriminator Adam learning rate")


@dataclass
class DataConfig:
    path: str = field("", "ImageFolder root (root/<class>/<img> or root/train/<class>/<img>), or a .beton for ffcv")
    backend: str = field("folder", "folder (PIL in DataLoader workers), ffcv (a .beton) or dali (the folder)")
    img_size: int = field(224, "training resolution; a multiple of the downsample factor")
    min_crop_scale: float = field(0.08, "RandomResizedCrop minimum area fraction")
    workers: int = field(4, "DataLoader workers per rank")


@dataclass
class OptimConfig:
    lr: float = field(5e-5, "Adam learning rate (paper: 5e-5 at batch 128)")
    betas: tuple[float, float] = field((0.5, 0.95), "Adam betas")
    weight_decay: float = field(0.0, "Adam weight decay")
    warmup_steps: int = field(5000, "linear warm-up steps")
    schedule: str = field("constant", "after warm-up: constant or cosine")
    min_lr_ratio: float = field(0.1, "cosine schedule ends at lr * this")


@dataclass
class TrainConfig:
    output_dir: str = field("runs/tokenizer", "run folder: config, metrics.jsonl, checkpoints, artifact")
    batch_size: int = field(64, "images per rank per micro-step (paper: 128 in total)")
    grad_accum: int = field(1, "micro-steps per optimizer step")
    epochs: int = field(100, "epochs to train (ignored when max_steps > 0)")
    max_steps: int = field(0, "optimizer steps to train (0 = use epochs)")
    grad_clip: float = field(0.0, "gradient-norm clipping (0 = off)")
    log_every: int = field(10, "steps between metrics.jsonl rows")
    ckpt_every: int = field(1000, "steps between checkpoints (and one at the end)")
    keep_last: int = field(2, "complete checkpoints kept")
    resume: str = field("", "'auto' = newest complete checkpoint in output_dir, or a checkpoint folder")
    seed: int = field(0, "seed of data order, augmentation and init")
    precision: str = field("auto", "auto (bf16 autocast on GPU, fp32 on CPU), bf16 or fp32")
    zero_stage: int = field(-1, "override the DeepSpeed config's ZeRO stage (0-2; -1 = keep)")
    deepspeed_config: str = field("ds_configs/tokenizer_zero2.json", "DeepSpeed JSON (batch fields are filled from this config)")
    wandb: bool = field(False, "log to Weights & Biases on rank 0 (offline without WANDB_API_KEY)")
    wandb_project: str = field("peco-scale", "wandb project")


@dataclass
class Stage1Config:
    model: TokenizerModelConfig = section(TokenizerModelConfig, "tokenizer architecture")
    quantizer: QuantizerConfig = section(QuantizerConfig, "EMA vector quantizer")
    perceptual: PerceptualConfig = section(PerceptualConfig, "frozen perceptual network")
    loss: LossConfig = section(LossConfig, "loss weights")
    disc: DiscConfig = section(DiscConfig, "optional patch discriminator")
    data: DataConfig = section(DataConfig, "input data")
    optim: OptimConfig = section(OptimConfig, "optimizer and schedule")
    train: TrainConfig = section(TrainConfig, "run control")


# command-line shorthands for the keys users type most
STAGE1_ALIASES = {
    "data": "data.path", "output_dir": "train.output_dir", "preset": "model.preset",
    "img_size": "data.img_size", "max_steps": "train.max_steps", "epochs": "train.epochs",
    "resume": "train.resume", "deepspeed_config": "train.deepspeed_config", "batch_size": "train.batch_size",
    "seed": "train.seed",
}


def resolve_stage1_config(file_overrides: Mapping[str, Any] | None, cli_overrides: Mapping[str, Any]) -> Stage1Config:
    """defaults -> preset (named in the file or CLI) -> file -> CLI."""
    layers = [("config file", dict(file_overrides or {})), ("command line", dict(cli_overrides))]
    preset = "default"
    for _, layer in layers:
        preset = str(layer.get("model.preset", preset))
    if preset not in TOKENIZER_PRESETS:
        raise ConfigError(f"unknown tokenizer preset '{preset}'; choose one of {', '.join(TOKENIZER_PRESETS)}")
    cfg = Stage1Config()
    apply_overrides(cfg, {"model.preset": preset, **TOKENIZER_PRESETS[preset]}, f"preset '{preset}'")
    for source, layer in layers:
        apply_overrides(cfg, layer, source)
    return cfg


def config_from_argv(argv: list[str]) -> Stage1Config:
    """Parse ``--config FILE`` and ``--section.key value`` flags into a resolved config."""
    cli, options = parse_cli(argv, STAGE1_ALIASES)
    file_overrides = load_file(options.pop("config")) if "config" in options else None
    options.pop("local_rank", None)  # passed by the deepspeed launcher; LOCAL_RANK is read from env
    if options:
        raise ConfigError(f"unknown option(s) {', '.join('--' + k for k in options)}; options are --config FILE "
                          f"and --section.key VALUE (see --help)")
    return resolve_stage1_config(file_overrides, cli)


def validate_stage1(cfg: Stage1Config) -> None:
    """Cheap checks of everything a user can get wrong; one line each, before any training."""
    m, q, d, t = cfg.model, cfg.quantizer, cfg.data, cfg.train
    if q.codebook_size < 2:
        raise ConfigError(f"quantizer.codebook_size={q.codebook_size} must be at least 2 (the paper uses 8192)")
    if q.dim < 1:
        raise ConfigError(f"quantizer.dim={q.dim} must be positive")
    if q.metric not in ("euclidean", "cosine"):
        raise ConfigError(f"quantizer.metric='{q.metric}' must be euclidean or cosine")
    if not 0.0 < q.decay < 1.0:
        raise ConfigError(f"quantizer.decay={q.decay} must lie in (0, 1); 0.99 is usual")
    if len(m.ch_mult) < 2:
        raise ConfigError(f"model.ch_mult={list(m.ch_mult)} needs at least 2 entries (one downsample)")
    f = m.downsample
    if d.img_size <= 0 or d.img_size % f:
        lo = max(f, d.img_size // f * f)
        raise ConfigError(f"data.img_size={d.img_size} is not divisible by the tokenizer's downsample factor {f}; "
                          f"use {lo} or {lo + f}")
    if d.backend not in ("folder", "ffcv", "dali"):
        raise ConfigError(f"data.backend='{d.backend}' must be folder, ffcv or dali")
    if cfg.loss.pixel not in ("l1", "l2"):
        raise ConfigError(f"loss.pixel='{cfg.loss.pixel}' must be l1 or l2")
    if cfg.optim.schedule not in ("constant", "cosine"):
        raise ConfigError(f"optim.schedule='{cfg.optim.schedule}' must be constant or cosine")
    if t.precision not in ("auto", "bf16", "fp32"):
        raise ConfigError(f"train.precision='{t.precision}' must be auto, bf16 or fp32")
    if t.batch_size < 1 or t.grad_accum < 1:
        raise ConfigError(f"train.batch_size={t.batch_size} and train.grad_accum={t.grad_accum} must be >= 1")
    if t.zero_stage not in (-1, 0, 1, 2):
        raise ConfigError(f"train.zero_stage={t.zero_stage}: stage 1 trains under ZeRO 0-2 (or -1 to keep the DeepSpeed config's)")
    if t.resume not in ("", "auto") and not Path(t.resume).is_dir():
        raise ConfigError(f"train.resume='{t.resume}' is neither 'auto' nor a checkpoint folder")
    if not d.path:
        raise ConfigError("no data folder given; pass --data DIR (an ImageFolder tree), e.g. the demo data from "
                          "`python -m peco_scale.data demo --out DIR`")
    check_writable(Path(t.output_dir))
    _check_perceptual(cfg.perceptual, cfg.loss.perceptual_weight)


def _check_perceptual(p: PerceptualConfig, weight: float) -> None:
    if weight == 0:
        return
    if not p.weights:
        raise ConfigError(f"perceptual.weights is empty; pass perceptual.weights=PATH to a local MoCo v3 / timm "
                          f"checkpoint of {p.arch} (nothing is downloaded), or perceptual.weights=random for the demo")
    if p.weights != "random" and not Path(p.weights).is_file():
        raise ConfigError(f"perceptual weights file '{p.weights}' not found; pass perceptual.weights=PATH to a local "
                          f"MoCo v3 / timm checkpoint of {p.arch}, or perceptual.weights=random (demo only)")
