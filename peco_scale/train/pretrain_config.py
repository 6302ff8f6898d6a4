"""Config tree of a masked-image-modeling run (stage 2) and its checks; shared sections and the
resolution order are in ``config.py``. ``model.task`` (``--task``) picks the target: ``peco``
(the tokenizer's ids at block-masked patches, the default) or ``mae`` (pixels of randomly masked
patches, encoder on the visible patches only) or ``perceptual_mae`` (mae + a perceptual loss through
stage 1's frozen network [+ a discriminator, optionally multi-scale])."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from ..config import ConfigError, field, with_defaults
from ..data.masking import BlockMaskGenerator, RandomMaskGenerator, default_min_block, default_num_masked
from .config import (Batching, DataConfig, DiscConfig, OptimConfig, PerceptualConfig, StageConfig, TrainConfig,
                     check_common, check_perceptual, model_size, world_from_env)


@dataclass
class ModelConfig:
    """ViT backbone."""

    name: str = field("vit_base_patch16", "backbone preset (vit_pico_patch16 ... vit_huge_patch14), optional _224/_448 suffix")
    img_size: int = field(0, "resolution (0 = the name's suffix, else 224); a multiple of the patch size")
    drop_path: float = field(0.1, "stochastic depth rate")
    layer_scale: float = field(-1.0, "layer-scale init (-1 = preset: 0.1 for B and smaller, 1e-5 for L/H; 0 = off)")
    grad_checkpointing: bool = field(False, "activation checkpointing of every block (timm set_grad_checkpointing)")
    vocab: int = field(0, "head size; must equal the tokenizer's codebook size (0 = take it from the tokenizer)")
    task: str = field("peco", "pre-training target: peco (tokenizer ids at block-masked patches), mae (pixels at "
                              "randomly masked patches, encoder on the visible ones) or perceptual_mae (mae + "
                              "perceptual loss [+ discriminator])")


TASKS = ("peco", "mae", "perceptual_mae")


@dataclass
class MAEConfig:
    """The MAE task (model.task mae): random masking, decoder, pixel loss (MAE's defaults)."""

    mask_ratio: float = field(0.75, "fraction of the patches masked, uniformly at random")
    decoder_dim: int = field(512, "decoder width")
    decoder_depth: int = field(8, "decoder blocks")
    decoder_heads: int = field(16, "decoder attention heads")
    norm_pix_loss: bool = field(True, "normalise each target patch by its own mean and variance")
    perceptual_weight: float = field(1.0, "perceptual_mae: lambda, the weight of the perceptual loss between the "
                                          "reconstruction and the input (stage 1's loss and network; 0 = none, "
                                          "MAE with the discriminator alone)")


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


PretrainPerceptualConfig = with_defaults(
    PerceptualConfig, "PretrainPerceptualConfig",
    docs={"weights": "perceptual_mae: local checkpoint file (MoCo v3 or timm format), or 'random' (demo/tests only)"})
PretrainDiscConfig = with_defaults(
    DiscConfig, "PretrainDiscConfig",
    docs={"enabled": "perceptual_mae: train a patch discriminator alongside (hinge loss) and add its adversarial term"},
    new={"multiscale": (bool, False, "perceptual_mae: the decoder also emits images at 1/2 ... 1/2**n_layers size, "
                                     "which the discriminator reads at each of its resolutions (MSG-GAN)")})
PretrainDataConfig = with_defaults(DataConfig, "PretrainDataConfig", new={
    "tokenizer_img_size": (int, 0, "tokenizer view size (0 = patch grid x tokenizer downsample)")})
PretrainOptimConfig = with_defaults(OptimConfig, "PretrainOptimConfig", grad_clip=3.0)
PretrainTrainConfig = with_defaults(TrainConfig, "PretrainTrainConfig", output_dir="runs/pretrain", epochs=300,
                                    deepspeed_config="ds_configs/zero2_vitb.json", image_every=1000)


class PretrainConfig(StageConfig, model=ModelConfig, mask=MaskConfig, mae=MAEConfig, tokenizer=TokenizerRef,
                     perceptual=PretrainPerceptualConfig, disc=PretrainDiscConfig, data=PretrainDataConfig, optim=PretrainOptimConfig, train=PretrainTrainConfig):
    ALIASES: ClassVar[dict[str, str]] = {"tokenizer": "tokenizer.path", "model": "model.name",
                                         "img_size": "model.img_size", "task": "model.task"}


@dataclass(kw_only=True)
class Resolved(Batching):
    """Values derived from the config, the environment and the tokenizer's metadata (``vocab``
    and ``tokenizer_img_size`` are 0 for the MAE task, which has no tokenizer)."""
    task: str
    model_name: str
    img_size: int
    grid: tuple[int, int]
    tokenizer_img_size: int
    vocab: int
    num_masked: int
    min_block: int
    mask: dict[str, Any]  # the data pipeline's mask generator (masking.mask_generator kwargs)
    scales: tuple[int, ...] = ()  # perceptual_mae with disc.multiscale: the decoder's extra image scales


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


def _peco_target(cfg: PretrainConfig, grid: tuple[int, int], p: int, img_size: int) -> tuple[int, int, dict]:
    """(vocab, tokenizer view size, mask generator kwargs) of the peco task."""
    m = cfg.model
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
    mask = dict(kind="block", grid=grid, num_masked=cfg.mask.num_patches or default_num_masked(n),
                min_block=cfg.mask.min_block or default_min_block(n), min_aspect=cfg.mask.min_aspect)
    try:  # the generator validates its own arguments
        BlockMaskGenerator(**{k: v for k, v in mask.items() if k != "kind"})
    except ValueError as exc:
        raise ConfigError(f"mask: {exc}") from None
    return vocab, tok_size, mask


def _mae_target(cfg: PretrainConfig, grid: tuple[int, int]) -> dict[str, Any]:
    """Mask generator kwargs of the mae task, after checking the mae section."""
    a, n = cfg.mae, grid[0] * grid[1]
    if not 0 < a.mask_ratio < 1:
        raise ConfigError(f"mae.mask_ratio={a.mask_ratio} must be in (0, 1); MAE uses 0.75")
    num_masked = cfg.mask.num_patches or round(a.mask_ratio * n)
    if not 1 <= num_masked <= n - 1:
        raise ConfigError(f"mae.mask_ratio={a.mask_ratio} masks {num_masked} of {n} patches; choose a ratio that "
                          f"masks between 1 and {n - 1}")
    if a.decoder_depth < 1 or a.decoder_dim < 4 or a.decoder_heads < 1:
        raise ConfigError(f"mae decoder depth {a.decoder_depth}, width {a.decoder_dim}, heads {a.decoder_heads}: "
                          f"each must be positive (width at least 4)")
    if a.decoder_dim % a.decoder_heads or a.decoder_dim % 4:
        raise ConfigError(f"mae.decoder_dim={a.decoder_dim} must be a multiple of 4 and of mae.decoder_heads="
                          f"{a.decoder_heads}; MAE uses 512 and 16")
    mask = dict(kind="random", grid=grid, num_masked=num_masked)
    RandomMaskGenerator(grid, num_masked)
    return mask


def _perceptual_mae(cfg: PretrainConfig, patch: int, img_size: int) -> tuple[int, ...]:
    """Checks of the perceptual_mae task (perceptual network, discriminator); the decoder's extra
    image scales (empty unless disc.multiscale)."""
    from ..models.perceptual import PERCEPTUAL_ARCHS

    p, d, a = cfg.perceptual, cfg.disc, cfg.mae
    if cfg.model.task != "perceptual_mae":
        if d.enabled:
            raise ConfigError(f"disc.enabled applies to --task perceptual_mae, this run is --task {cfg.model.task}; "
                              f"drop disc.enabled or use --task perceptual_mae")
        return ()
    if a.perceptual_weight < 0:
        raise ConfigError(f"mae.perceptual_weight={a.perceptual_weight} must be >= 0 (stage 1 uses 1)")
    if a.perceptual_weight and p.arch not in PERCEPTUAL_ARCHS:
        raise ConfigError(f"perceptual.arch='{p.arch}' is unknown; use one of {', '.join(PERCEPTUAL_ARCHS)}")
    check_perceptual(p, a.perceptual_weight)  # nothing to check at weight 0: no perceptual network
    unit = PERCEPTUAL_ARCHS[p.arch].patch_size if a.perceptual_weight else 1
    if img_size % unit:
        raise ConfigError(f"perceptual.arch={p.arch} reads images in multiples of {unit} px, the model's are {img_size}; "
                          f"use a resolution divisible by {unit} or another perceptual.arch")
    if not d.enabled:
        if d.multiscale:
            raise ConfigError("disc.multiscale needs disc.enabled (the multi-scale images only feed the discriminator)")
        return ()
    if d.weight < 0 or d.lr <= 0 or d.n_layers < 1 or d.channels < 1 or d.start_step < 0:
        raise ConfigError(f"disc weight {d.weight}, lr {d.lr}, n_layers {d.n_layers}, channels {d.channels}, "
                          f"start_step {d.start_step}: the weight and start step must be >= 0, the rest positive")
    if not d.multiscale:
        return ()
    scales = tuple(2**i for i in range(1, d.n_layers + 1))
    if patch % scales[-1]:
        raise ConfigError(f"disc.multiscale with disc.n_layers={d.n_layers} needs images at 1/{scales[-1]}, so a patch "
                          f"size divisible by {scales[-1]}; the model's is {patch}: lower disc.n_layers or drop "
                          f"disc.multiscale")
    if a.decoder_depth <= len(scales):
        raise ConfigError(f"disc.multiscale reads {len(scales)} images from decoder blocks before the last, so "
                          f"mae.decoder_depth={a.decoder_depth} must be at least {len(scales) + 1}")
    return scales


def resolve_pretrain(cfg: PretrainConfig, world: int | None = None) -> Resolved:
    """Every cheap check, one line each, before any launch cost; reads only the tokenizer's
    metadata (not its weights), and only for the peco task."""
    m = cfg.model
    if m.task not in TASKS:
        raise ConfigError(f"model.task='{m.task}' is not a pre-training task; use one of {', '.join(TASKS)}")
    name, preset, img_size = model_size(m.name, m.img_size)
    p = preset.patch_size
    grid = (img_size // p, img_size // p)
    if m.task == "peco":
        vocab, tok_size, mask = _peco_target(cfg, grid, p, img_size)
    else:
        vocab, tok_size, mask = 0, 0, _mae_target(cfg, grid)
    scales = _perceptual_mae(cfg, p, img_size)
    world = world or world_from_env()
    accum = check_common(cfg, world)
    return Resolved(task=m.task, model_name=name, img_size=img_size, grid=grid, tokenizer_img_size=tok_size,
                    vocab=vocab, num_masked=int(mask["num_masked"]), min_block=int(mask.get("min_block", 0)),
                    mask=mask, scales=scales, batch_size=cfg.train.batch_size, grad_accum=accum, world_size=world)
