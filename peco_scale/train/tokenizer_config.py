"""Config tree of a tokenizer run (stage 1), its presets and its checks; shared sections and the
resolution order are in ``config.py``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from ..config import ConfigError, field, section
from ..models.quantizer import QuantizerConfig
from ..models.tokenizer import TOKENIZER_PRESETS, TokenizerModelConfig
from .config import (DataConfig, OptimConfig, StageConfig, TrainConfig, check_common, config_from_argv,
                     resolve_layers)


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
class TokenizerDataConfig(DataConfig):
    img_size: int = field(224, "training resolution; a multiple of the downsample factor")
    workers: int = field(4, "DataLoader workers (folder, ffcv) or threads (dali) per rank")
    jitter: float = field(0.0, "colour jitter strength (brightness, contrast, saturation; the paper uses none)")


@dataclass
class TokenizerOptimConfig(OptimConfig):
    lr: float = field(5e-5, "Adam learning rate (paper: 5e-5 at batch 128), not scaled unless optim.base_batch > 0")
    base_batch: int = field(0, "global batch at which optim.lr is given (0 = lr is not scaled)")
    betas: tuple[float, float] = field((0.5, 0.95), "Adam betas")
    weight_decay: float = field(0.0, "Adam weight decay")
    schedule: str = field("constant", "after warm-up: constant or cosine (down to optim.min_lr)")
    warmup_epochs: float = field(0.0, "linear warm-up in epochs (when optim.warmup_steps is -1)")
    warmup_steps: int = field(5000, "linear warm-up in steps (-1 = from warmup_epochs)")
    min_lr: float = field(5e-6, "the cosine schedule ends here")


@dataclass
class TokenizerTrainConfig(TrainConfig):
    output_dir: str = field("runs/tokenizer", "run folder: config, metrics.jsonl, checkpoints, artifact")
    batch_size: int = field(64, "images per rank per micro-step (paper: 128 in total)")
    grad_accum: int = field(1, "micro-steps per optimizer step (0 = from train.global_batch)")
    deepspeed_config: str = field("ds_configs/tokenizer_zero2.json", "the recipe: DeepSpeed JSON (batch fields and a "
                                                                    "peco_scale block are read into this config)")
    zero_stage: int = field(-1, "override the recipe's ZeRO stage (0-2; -1 = keep)")


@dataclass
class TokenizerConfig(StageConfig):
    model: TokenizerModelConfig = section(TokenizerModelConfig, "tokenizer architecture")
    quantizer: QuantizerConfig = section(QuantizerConfig, "EMA vector quantizer")
    perceptual: PerceptualConfig = section(PerceptualConfig, "frozen perceptual network")
    loss: LossConfig = section(LossConfig, "loss weights")
    disc: DiscConfig = section(DiscConfig, "optional patch discriminator")
    data: TokenizerDataConfig = section(TokenizerDataConfig, "input data")
    optim: TokenizerOptimConfig = section(TokenizerOptimConfig, "Adam and schedule")
    train: TokenizerTrainConfig = section(TokenizerTrainConfig, "run control")

    ALIASES: ClassVar[dict[str, str]] = {"preset": "model.preset", "img_size": "data.img_size"}
    PRESET_KEY: ClassVar[str] = "model.preset"
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = TOKENIZER_PRESETS
    PRESET_WHAT: ClassVar[str] = "tokenizer preset"
    ZERO_STAGES: ClassVar[tuple[int, ...]] = (0, 1, 2)


def tokenizer_config_from_argv(argv: list[str]) -> tuple[TokenizerConfig, dict[str, Any]]:
    """Flags -> (resolved config, the recipe's DeepSpeed dict without our blocks)."""
    return config_from_argv(argv, TokenizerConfig)


def resolve_tokenizer(cfg: TokenizerConfig, world: int | None = None) -> int:
    """Every cheap check, one line each, before any training; returns the gradient accumulation."""
    m, q, d = cfg.model, cfg.quantizer, cfg.data
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
    if cfg.loss.pixel not in ("l1", "l2"):
        raise ConfigError(f"loss.pixel='{cfg.loss.pixel}' must be l1 or l2")
    accum = check_common(cfg, world)
    _check_perceptual(cfg.perceptual, cfg.loss.perceptual_weight)
    return accum


def _check_perceptual(p: PerceptualConfig, weight: float) -> None:
    if weight == 0:
        return
    if not p.weights:
        raise ConfigError(f"perceptual.weights is empty; pass perceptual.weights=PATH to a local MoCo v3 / timm "
                          f"checkpoint of {p.arch} (nothing is downloaded), or perceptual.weights=random for the demo")
    if p.weights != "random" and not Path(p.weights).is_file():
        raise ConfigError(f"perceptual weights file '{p.weights}' not found; pass perceptual.weights=PATH to a local "
                          f"MoCo v3 / timm checkpoint of {p.arch}, or perceptual.weights=random (demo only)")


def tokenizer_config(file_overrides: dict[str, Any] | None = None,
                     cli_overrides: dict[str, Any] | None = None) -> TokenizerConfig:
    """The resolved config tree alone (Python callers): ``resolve_layers`` for this stage."""
    return resolve_layers(TokenizerConfig, file_overrides, cli_overrides or {})[0]
