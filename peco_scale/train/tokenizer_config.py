"""Config tree of a tokenizer run (stage 1), its presets and its checks; shared sections and the
resolution order are in ``config.py``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from ..config import ConfigError, field, with_defaults
from ..models.quantizer import QuantizerConfig
from ..models.tokenizer import TOKENIZER_PRESETS, TokenizerModelConfig
from .config import (DataConfig, DiscConfig, OptimConfig, PerceptualConfig, StageConfig, TrainConfig,
                     check_common, check_perceptual, config_from_argv, resolve_layers)


@dataclass
class LossConfig:
    """Loss weights."""

    pixel: str = field("l2", "pixel loss: l2 (MSE) or l1")
    perceptual_weight: float = field(1.0, "lambda, the perceptual loss weight (paper: 1; 0 = plain VQ-VAE)")


TokenizerDataConfig = with_defaults(
    DataConfig, "TokenizerDataConfig", workers=4, jitter=0.0,
    docs={"jitter": "colour jitter strength (brightness, contrast, saturation; the paper uses none)"},
    new={"img_size": (int, 224, "training resolution; a multiple of the downsample factor")})
TokenizerOptimConfig = with_defaults(
    OptimConfig, "TokenizerOptimConfig", lr=5e-5, base_batch=0, betas=(0.5, 0.95), weight_decay=0.0,
    schedule="constant", warmup_epochs=0.0, warmup_steps=5000, min_lr=5e-6,
    docs={"lr": "Adam learning rate (paper: 5e-5 at batch 128), not scaled unless optim.base_batch > 0"})
TokenizerTrainConfig = with_defaults(TrainConfig, "TokenizerTrainConfig", output_dir="runs/tokenizer", batch_size=64,
                                     grad_accum=1, deepspeed_config="ds_configs/tokenizer_zero2.json", image_every=1000,
                                     docs={"zero_stage": "override the recipe's ZeRO stage (0-2; -1 = keep)"})


class TokenizerConfig(StageConfig, model=TokenizerModelConfig, quantizer=QuantizerConfig,
                      perceptual=PerceptualConfig, loss=LossConfig, disc=DiscConfig, data=TokenizerDataConfig,
                      optim=TokenizerOptimConfig, train=TokenizerTrainConfig):
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
    check_perceptual(cfg.perceptual, cfg.loss.perceptual_weight)
    return accum


def tokenizer_config(file_overrides: dict[str, Any] | None = None,
                     cli_overrides: dict[str, Any] | None = None) -> TokenizerConfig:
    """The resolved config tree alone (Python callers): ``resolve_layers`` for this stage."""
    return resolve_layers(TokenizerConfig, file_overrides, cli_overrides or {})[0]
