"""Config tree of a stage-2 (masked image modeling) run and the checks run before training.

Precedence: defaults -> the DeepSpeed recipe (its batch/optimizer fields and its "peco_scale"
block) -> --config FILE -> --section.key flags.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import ConfigError, field, section
from ..data.masking import BlockMaskGenerator, default_min_block, default_num_masked
from ..models.mim import KERNEL_BACKENDS
from ..models.vit import parse_model_name
from .ds import config_from_recipe_argv, resolve_accum


@dataclass
class ModelConfig:
    name: str = field("vit_base_patch16", "backbone preset (vit_pico_patch16 ... vit_huge_patch14), optional _224/_448 suffix")
    img_size: int = field(0, "resolution (0 = the name's suffix, else 224); a multiple of the patch size")
    drop_path: float = field(0.1, "stochastic depth rate")
    layer_scale: float = field(-1.0, "layer-scale init (-1 = preset: 0.1 for B and smaller, 1e-5 for L/H; 0 = off)")
    grad_checkpointing: bool = field(False, "activation checkpointing of every block (timm set_grad_checkpointing)")
    vocab: int = field(0, "head size; must equal the tokenizer's codebook size (0 = take it from the tokenizer)")
    kernels: str = field("auto", "MIM head + loss and the target lookup: auto (Triton on CUDA), triton, torch")


@dataclass
class MaskConfig:
    num_patches: int = field(0, "masked patches per image (0 = BEiT's 75 of 196, scaled to the grid)")
    min_block: int = field(0, "smallest block in patches (0 = BEiT's 16 at 14x14, scaled by area)")
    min_aspect: float = field(0.3, "block aspect ratio is log-uniform in [min_aspect, 1/min_aspect]")


@dataclass
class TokenizerRef:
    path: str = field("", "tokenizer.safetensors written by launch/train_tokenizer.py")


@dataclass
class DataConfig:
    path: str = field("", "ImageFolder root (root/<class>/<img> or root/train/<class>/<img>), or a .beton for ffcv")
    backend: str = field("folder", "folder (PIL in DataLoader workers), ffcv (a .beton) or dali (the folder)")
    workers: int = field(8, "loader workers (folder, ffcv) or threads (dali) per rank")
    min_crop_scale: float = field(0.08, "RandomResizedCrop minimum area fraction")
    jitter: float = field(0.4, "colour jitter strength (brightness, contrast, saturation)")
    hflip: float = field(0.5, "horizontal flip probability")
    tokenizer_img_size: int = field(0, "tokenizer view size (0 = patch grid x tokenizer downsample)")


@dataclass
class OptimConfig:
    lr: float = field(1.5e-3, "AdamW lr at optim.base_batch images (scaled linearly with the global batch)")
    base_batch: int = field(2048, "global batch at which optim.lr is given")
    betas: tuple[float, float] = field((0.9, 0.999), "AdamW betas (0.9, 0.98 for L/H)")
    eps: float = field(1e-8, "AdamW eps")
    weight_decay: float = field(0.05, "weight decay (not on norms, biases, layer scales, tokens, position embeddings)")
    warmup_epochs: float = field(10.0, "linear warm-up in epochs")
    warmup_steps: int = field(-1, "linear warm-up in steps (-1 = from warmup_epochs)")
    min_lr: float = field(1e-5, "cosine schedule ends here")
    grad_clip: float = field(3.0, "gradient-norm clipping (0 = off)")


@dataclass
class TrainConfig:
    output_dir: str = field("runs/pretrain", "run folder: config, metrics.jsonl, checkpoints")
    batch_size: int = field(0, "micro-batch per rank (0 = the recipe's train_micro_batch_size_per_gpu)")
    grad_accum: int = field(0, "micro-steps per optimizer step (0 = global_batch / (batch_size x world size))")
    global_batch: int = field(0, "images per optimizer step over all ranks (0 = the recipe's train_batch_size)")
    epochs: int = field(300, "epochs to train (ignored when max_steps > 0)")
    max_steps: int = field(0, "optimizer steps to train (0 = use epochs)")
    log_every: int = field(10, "steps between metrics.jsonl rows")
    ckpt_every: int = field(1000, "steps between checkpoints (and one at the end)")
    keep_last: int = field(2, "complete checkpoints kept")
    resume: str = field("", "'auto' = newest complete checkpoint in output_dir, or a checkpoint folder")
    seed: int = field(0, "seed of data order, augmentation, masks and init")
    precision: str = field("auto", "auto (the recipe's bf16 on GPU, fp32 on CPU), bf16 or fp32")
    zero_stage: int = field(-1, "override the recipe's ZeRO stage (0-3; -1 = keep)")
    deepspeed_config: str = field("ds_configs/zero2_vitb.json", "the recipe: DeepSpeed JSON (+ its peco_scale block)")
    wandb: bool = field(False, "log to Weights & Biases on rank 0 (offline without WANDB_API_KEY)")
    wandb_project: str = field("peco-scale", "wandb project")


@dataclass
class Stage2Config:
    model: ModelConfig = section(ModelConfig, "ViT backbone")
    mask: MaskConfig = section(MaskConfig, "block-wise masking")
    tokenizer: TokenizerRef = section(TokenizerRef, "frozen stage-1 tokenizer")
    data: DataConfig = section(DataConfig, "input data and augmentation")
    optim: OptimConfig = section(OptimConfig, "AdamW and schedule")
    train: TrainConfig = section(TrainConfig, "run control")


STAGE2_ALIASES = {
    "data": "data.path", "tokenizer": "tokenizer.path", "model": "model.name", "img_size": "model.img_size",
    "output_dir": "train.output_dir", "epochs": "train.epochs", "max_steps": "train.max_steps",
    "resume": "train.resume", "deepspeed_config": "train.deepspeed_config", "batch_size": "train.batch_size",
    "global_batch": "train.global_batch", "grad_accum": "train.grad_accum", "seed": "train.seed",
    "lr": "optim.lr", "workers": "data.workers",
}


def config_from_argv(argv: list[str]) -> tuple[Stage2Config, dict[str, Any]]:
    """Flags -> (resolved config, the DeepSpeed dict of the recipe without our blocks)."""
    return config_from_recipe_argv(argv, Stage2Config, STAGE2_ALIASES)


@dataclass
class Resolved:
    """Values derived from the config, the environment and the tokenizer's metadata."""
    model_name: str
    img_size: int
    grid: tuple[int, int]
    tokenizer_img_size: int
    vocab: int
    num_masked: int
    min_block: int
    batch_size: int
    grad_accum: int
    world_size: int

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.grad_accum * self.world_size


def resolve_stage2(cfg: Stage2Config, world_size: int | None = None) -> Resolved:
    """Cheap checks of everything a user can get wrong, one line each, before any launch cost.

    Reads only the tokenizer's metadata (not its weights) and the environment's WORLD_SIZE.
    """
    from ..models.artifact import read_tokenizer_metadata

    m, t, o = cfg.model, cfg.train, cfg.optim
    world = world_size or int(os.environ.get("WORLD_SIZE", "1"))
    name, preset, img_size = parse_model_name(m.name, m.img_size or None)
    p = preset.patch_size
    if img_size <= 0 or img_size % p:
        lo = max(p, img_size // p * p)
        raise ConfigError(f"model.img_size={img_size} is not divisible by the patch size {p} of {name}; "
                          f"use {lo} or {lo + p}")
    grid = (img_size // p, img_size // p)
    if m.kernels not in KERNEL_BACKENDS:
        raise ConfigError(f"model.kernels='{m.kernels}' must be one of {', '.join(KERNEL_BACKENDS)}")
    # tokenizer
    if not cfg.tokenizer.path:
        raise ConfigError("no tokenizer given; pass --tokenizer PATH/tokenizer.safetensors (train one with "
                          "launch/train_tokenizer.py)")
    try:
        meta = read_tokenizer_metadata(cfg.tokenizer.path)
    except FileNotFoundError as exc:
        raise ConfigError(str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
        raise ConfigError(f"tokenizer '{cfg.tokenizer.path}' is unreadable ({type(exc).__name__}: {exc}); pass the "
                          f"tokenizer.safetensors written by launch/train_tokenizer.py") from None
    down = 2 ** (len(meta["model"]["ch_mult"]) - 1)
    vocab = int(meta["quantizer"]["codebook_size"])
    if m.vocab and m.vocab != vocab:
        raise ConfigError(f"model.vocab={m.vocab} but tokenizer '{cfg.tokenizer.path}' has {vocab} codes; pass the "
                          f"tokenizer the head was sized for, or set model.vocab={vocab} (or 0)")
    tok_size = cfg.data.tokenizer_img_size or grid[0] * down
    if tok_size % down or tok_size // down != grid[0]:
        raise ConfigError(f"token grid {tok_size // down}x{tok_size // down} (data.tokenizer_img_size={tok_size} / "
                          f"downsample {down}) != patch grid {grid[0]}x{grid[1]} ({img_size} / patch {p}); "
                          f"set data.tokenizer_img_size={grid[0] * down} or 0")
    # masking (the generator validates its own arguments)
    n = grid[0] * grid[1]
    num_masked = cfg.mask.num_patches or default_num_masked(n)
    min_block = cfg.mask.min_block or default_min_block(n)
    try:
        BlockMaskGenerator(grid, num_masked, min_block=min_block, min_aspect=cfg.mask.min_aspect)
    except ValueError as exc:
        raise ConfigError(f"mask: {exc}") from None
    accum = resolve_accum(t.batch_size, t.grad_accum, t.global_batch, world, t.deepspeed_config)
    micro = t.batch_size
    # everything else
    if t.precision not in ("auto", "bf16", "fp32"):
        raise ConfigError(f"train.precision='{t.precision}' must be auto, bf16 or fp32")
    if t.zero_stage not in (-1, 0, 1, 2, 3):
        raise ConfigError(f"train.zero_stage={t.zero_stage} must be 0-3 (or -1 to keep the recipe's)")
    if t.max_steps <= 0 and t.epochs <= 0:
        raise ConfigError(f"train.epochs={t.epochs} and train.max_steps={t.max_steps}: set one of them positive")
    if not (math.isfinite(o.lr) and o.lr > 0) or o.base_batch <= 0:
        raise ConfigError(f"optim.lr={o.lr} and optim.base_batch={o.base_batch} must be positive")
    if t.resume not in ("", "auto") and not Path(t.resume).is_dir():
        raise ConfigError(f"train.resume='{t.resume}' is neither 'auto' nor a checkpoint folder")
    if cfg.data.backend not in ("folder", "ffcv", "dali"):
        raise ConfigError(f"data.backend='{cfg.data.backend}' must be folder, ffcv or dali")
    if not cfg.data.path:
        raise ConfigError("no data given; pass --data DIR (an ImageFolder tree, or `python -m peco_scale.data demo "
                          "--out DIR` for the demo set)")
    return Resolved(name, img_size, grid, tok_size, vocab, num_masked, min_block, micro, accum, world)
