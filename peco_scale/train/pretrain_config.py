"""Config tree of a masked-image-modeling run (stage 2) and its checks; shared sections and the
resolution order are in ``config.py``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from ..config import ConfigError, field, with_defaults
from ..data.masking import BlockMaskGenerator, default_min_block, default_num_masked
from .config import (Batching, DataConfig, OptimConfig, StageConfig, TrainConfig, check_common, model_size,
                     world_from_env)


@dataclass
class ModelConfig:
    """ViT backbone."""

    name: str = field("vit_base_patch16", "backbone preset (vit_pico_patch16 ... vit_huge_patch14), optional _224/_448 suffix")
    img_size: int = field(0, "resolution (0 = the name's suffix, else 224); a multiple of the patch size")
    drop_path: float = field(0.1, "stochastic depth rate")
    layer_scale: float = field(-1.0, "layer-scale init (-1 = preset: 0.1 for B and smaller, 1e-5 for L/H; 0 = off)")
    grad_checkpointing: bool = field(False, "activation checkpointing of every block (timm set_grad_checkpointing)")
    vocab: int = field(0, "head size; must equal the tokenizer's codebook size (0 = take it from the tokenizer)")


@dataclass
class MaskConfig:
    """Block-wise masking."""

    num_patches: int = field(0, "masked patches per image (0 = BEiT's 75 of 196, scaled to the grid)")
    min_block: int = field(0, "smallest block in patches (0 = BEiT's 16 at 14x14, scaled by area)")
    min_aspect: float = field(0.3, "block aspect ratio is log-uniform in [min_aspect, 1/min_aspect]")


@dataclass
class TokenizerRef:
    """The frozen stage-1 tokenizer."""

    path: str = field("", "tokenizer.safetensors written by launch/train_tokenizer.py")


PretrainDataConfig = with_defaults(DataConfig, "PretrainDataConfig", new={
    "tokenizer_img_size": (int, 0, "tokenizer view size (0 = patch grid x tokenizer downsample)")})
PretrainOptimConfig = with_defaults(OptimConfig, "PretrainOptimConfig", grad_clip=3.0)
PretrainTrainConfig = with_defaults(TrainConfig, "PretrainTrainConfig", output_dir="runs/pretrain", epochs=300,
                                    deepspeed_config="ds_configs/zero2_vitb.json")


class PretrainConfig(StageConfig, model=ModelConfig, mask=MaskConfig, tokenizer=TokenizerRef,
                     data=PretrainDataConfig, optim=PretrainOptimConfig, train=PretrainTrainConfig):
    ALIASES: ClassVar[dict[str, str]] = {"tokenizer": "tokenizer.path", "model": "model.name",
                                         "img_size": "model.img_size"}


@dataclass(kw_only=True)
class Resolved(Batching):
    """Values derived from the config, the environment and the tokenizer's metadata."""
    model_name: str
    img_size: int
    grid: tuple[int, int]
    tokenizer_img_size: int
    vocab: int
    num_masked: int
    min_block: int


def _tokenizer_meta(path: str) -> dict[str, Any]:
    from ..models.artifact import read_tokenizer_metadata

    if not path:
        raise ConfigError("no tokenizer given; pass --tokenizer PATH/tokenizer.safetensors (train one with "
                          "launch/train_tokenizer.py)")
    try:
        return read_tokenizer_metadata(path)
    except FileNotFoundError as exc:
        raise ConfigError(str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
        raise ConfigError(f"tokenizer '{path}' is unreadable ({type(exc).__name__}: {exc}); pass the "
                          f"tokenizer.safetensors written by launch/train_tokenizer.py") from None


def resolve_pretrain(cfg: PretrainConfig, world: int | None = None) -> Resolved:
    """Every cheap check, one line each, before any launch cost; reads only the tokenizer's
    metadata (not its weights)."""
    m = cfg.model
    name, preset, img_size = model_size(m.name, m.img_size)
    p = preset.patch_size
    grid = (img_size // p, img_size // p)
    meta = _tokenizer_meta(cfg.tokenizer.path)
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
    n = grid[0] * grid[1]
    num_masked = cfg.mask.num_patches or default_num_masked(n)
    min_block = cfg.mask.min_block or default_min_block(n)
    try:  # the generator validates its own arguments
        BlockMaskGenerator(grid, num_masked, min_block=min_block, min_aspect=cfg.mask.min_aspect)
    except ValueError as exc:
        raise ConfigError(f"mask: {exc}") from None
    world = world or world_from_env()
    accum = check_common(cfg, world)
    return Resolved(model_name=name, img_size=img_size, grid=grid, tokenizer_img_size=tok_size, vocab=vocab,
                    num_masked=num_masked, min_block=min_block, batch_size=cfg.train.batch_size, grad_accum=accum,
                    world_size=world)
