"""Pictures of what a model predicts: one PNG grid, one row per image.

    python -m peco_scale.visualize runs/tokenizer/tokenizer.safetensors --data DIR --out grid.png \\
        [--num 8] [--img_size 224]
    python -m peco_scale.visualize runs/pretrain --data DIR --out grid.png [--num 8] [--seed 0] \\
        [--tokenizer PATH]

A tokenizer artifact (``tokenizer.safetensors``, or a stage-1 run folder holding one) gives rows of
``input | reconstruction`` (decode of the image's own token ids); each row's PSNR (dB, on [0, 1]
images) is printed and written under the row. ``--img_size`` defaults to the size it was trained at.

A stage-2 ``peco`` run folder or ``step_XXXXXXXX`` folder gives rows of ``input | masked input
(masked patches grey) | prediction | tokenizer reconstruction``. The prediction is PeCo's Figure 5:
the backbone + MIM head's argmax ids at the masked patches, the tokenizer's own ids at the visible
ones, decoded by the tokenizer; the reconstruction decodes the tokenizer's ids everywhere. The
tokenizer is the one the checkpoint names (``--tokenizer`` overrides it). A stage-2 ``mae`` or
``perceptual_mae`` run gives ``input | masked input | prediction``: the predicted pixels at the
masked patches, the input's own at the visible ones, with the masked patches' loss and PSNR.

Images: the first ``--num`` images of the ImageFolder tree (sorted as the data loaders list it),
centre-cropped square and resized (bicubic) to the model's resolution; the mask of row ``i`` is the
run's mask generator (block masks for peco, random ones for the MAE tasks) drawn from
``np.random.default_rng(seed + i)``. The PNG is written atomically (temporary name in the same
folder, then rename). The rows themselves are ``peco_scale.pictures``'s, which the trainer also
writes during training.

Exit status 0 on success; bad input prints one ``error:`` line to stderr and exits 2 (before any
weights are loaded).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision.transforms import functional as TF

from ..config import ConfigError
from ..data import DataError
from ..data.masking import BlockMaskGenerator, default_min_block, default_num_masked
from ..data.mim import IMAGENET_MEAN, IMAGENET_STD
from ..engine.weights import checkpoint_folder, checkpoint_state, consolidate
from ..pictures import (GAP, LINE, MASK_GREY, GridRows, draw_masks, evaluating, grey_masked, load_views,  # noqa: F401
                        mae_rows, make_grid, peco_predict, peco_rows, pick_images, psnr, tile_origin, tile_uint8,
                        tokenizer_rows, write_grid)

# ----------------------------------------------------------------------------- the command


@dataclass
class Source:
    """What RUN_OR_CHECKPOINT is: ``kind`` 'tokenizer' (``tokenizer`` = the artifact), 'peco'
    (``folder`` = the step folder, ``state`` its state.json, ``tokenizer`` the artifact to use) or
    'mae' (an MAE-family run: no tokenizer)."""

    kind: str
    tokenizer: Path | None
    meta: dict[str, Any]
    folder: Path | None = None
    state: dict[str, Any] = field(default_factory=dict)


NEITHER = ("pass a tokenizer.safetensors (or the stage-1 run folder holding it), or a stage-2 (pretrain) run folder "
           "or its step_XXXXXXXX folder")


def _tokenizer_meta(path: Path, fix: str) -> dict[str, Any]:
    """The artifact's metadata (no weights); a ConfigError saying why it is not one, then ``fix``."""
    from ..models.artifact import read_tokenizer_metadata

    try:
        return read_tokenizer_metadata(path)
    except (FileNotFoundError, ValueError) as exc:  # the artifact's own reasons, without their advice
        why = str(exc).split("; ")[0]
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
        why = f"'{path}' is not a safetensors file ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    raise ConfigError(f"{why}; {fix}")


def find_source(path: str | os.PathLike[str], tokenizer: str | None = None) -> Source:
    """Classify RUN_OR_CHECKPOINT reading only metadata (no weights); ConfigError, one line, when it
    is neither a tokenizer artifact nor a stage-2 peco run/checkpoint, or names a missing tokenizer."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"'{p}' does not exist; {NEITHER}")
    if p.is_file() or (p / "tokenizer.safetensors").is_file():
        art = p if p.is_file() else p / "tokenizer.safetensors"
        return Source("tokenizer", art, _tokenizer_meta(art, NEITHER))
    try:
        folder = checkpoint_folder(p)
    except ConfigError:
        raise ConfigError(f"'{p}' is neither a tokenizer artifact nor a stage-2 run/checkpoint (no "
                          f"tokenizer.safetensors, no complete checkpoint); {NEITHER}") from None
    state = checkpoint_state(folder)
    kind, task = state.get("kind"), state.get("model", {}).get("task", "peco")
    if kind == "tokenizer":
        raise ConfigError(f"'{p}' is a stage-1 checkpoint; pass the run's tokenizer.safetensors (written when the "
                          f"run finishes)")
    if kind != "pretrain" or "model" not in state:
        raise ConfigError(f"checkpoint {folder} is a {kind} checkpoint, not a stage-2 one; {NEITHER}")
    if task != "peco":
        if tokenizer:
            raise ConfigError(f"--tokenizer applies to peco runs; checkpoint {folder} is a model.task={task} run")
        return Source("mae", None, {}, folder, state)
    recorded = state.get("tokenizer", {}).get("path", "")
    tok = Path(tokenizer or recorded)
    if not tokenizer and not tok.is_file():
        raise ConfigError(f"checkpoint {folder} names tokenizer '{recorded}', which does not exist here; pass "
                          f"--tokenizer PATH/tokenizer.safetensors (the artifact the run was trained with)")
    fix = (f"pass --tokenizer PATH/tokenizer.safetensors, the artifact checkpoint {folder} was trained with"
           if not tokenizer else "pass the tokenizer.safetensors the run was trained with")
    return Source("peco", tok, _tokenizer_meta(tok, fix), folder, state)


def check_out(out: str | os.PathLike[str]) -> Path:
    """``--out`` must name a .png file in a folder this process can write (or create)."""
    path = Path(out)
    if path.suffix.lower() != ".png":
        raise ConfigError(f"--out '{out}' must end in .png (the grid is written as PNG)")
    if path.is_dir():
        raise ConfigError(f"--out '{out}' is a folder; pass a file name such as '{path / 'grid.png'}'")
    parent = path.parent.resolve()
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"--out '{out}' cannot be written ('{parent}' is not a writable folder); choose another "
                          f"--out")
    return path


def _downsample(meta: dict[str, Any]) -> int:
    return 2 ** (len(meta["model"]["ch_mult"]) - 1)


def tokenizer_size(source: Source, img_size: int | None) -> int:
    """The tokenizer's input side: ``--img_size``, else the size it was trained at, else 224."""
    down = _downsample(source.meta)
    trained = source.meta.get("extra", {}).get("config", {}).get("data", {}).get("img_size")
    size = img_size or int(trained or 224)
    if size <= 0 or size % down:
        raise ConfigError(f"--img_size {size} is not a multiple of the tokenizer's downsample factor {down}; use "
                          f"{max(down, size // down * down)}")
    return size


@dataclass
class PecoPlan:
    """Sizes and mask settings of a peco checkpoint (from its state.json, as resolve_pretrain derives them)."""

    name: str
    img_size: int
    tokenizer_img_size: int
    mask: dict[str, Any]


def _checkpoint_model(source: Source) -> tuple[str, int, int, dict[str, Any]]:
    """(preset name, img_size, patch grid side, config) a stage-2 checkpoint records."""
    from ..models.vit import VIT_PRESETS

    model, cfg = source.state["model"], source.state.get("config", {})
    name, img_size = model["name"], int(model["img_size"])
    if name not in VIT_PRESETS:
        raise ConfigError(f"checkpoint {source.folder} names model '{name}', which this version does not know")
    return name, img_size, img_size // VIT_PRESETS[name].patch_size, cfg


def peco_plan(source: Source) -> PecoPlan:
    name, img_size, side, cfg = _checkpoint_model(source)
    grid = (side, side)
    down, n = _downsample(source.meta), grid[0] * grid[1]
    tok_size = int(cfg.get("data", {}).get("tokenizer_img_size") or grid[0] * down)
    if tok_size % down or tok_size // down != grid[0]:
        raise ConfigError(f"tokenizer '{source.tokenizer}' (downsample {down}) gives a {tok_size // down}-token side "
                          f"at {tok_size} px, the model's patch grid is {grid[0]}; pass the run's tokenizer")
    m = cfg.get("mask", {})
    mask = dict(grid=grid, num_masked=int(m.get("num_patches") or default_num_masked(n)),
                min_block=int(m.get("min_block") or default_min_block(n)), min_aspect=float(m.get("min_aspect", 0.3)))
    try:
        BlockMaskGenerator(**mask)
    except ValueError as exc:
        raise ConfigError(f"checkpoint {source.folder}: mask: {exc}") from None
    return PecoPlan(name, img_size, tok_size, mask)


@dataclass
class MAEPlan:
    """Model and mask of an MAE-family checkpoint (from its state.json, as resolve_pretrain derives them)."""

    name: str
    img_size: int
    mask: dict[str, Any]
    decoder: dict[str, Any]


def mae_plan(source: Source) -> MAEPlan:
    name, img_size, side, cfg = _checkpoint_model(source)
    a, d = cfg.get("mae", {}), cfg.get("disc", {})
    n = side * side
    num_masked = int(cfg.get("mask", {}).get("num_patches") or round(float(a.get("mask_ratio", 0.75)) * n))
    multiscale = source.state["model"].get("task") == "perceptual_mae" and d.get("enabled") and d.get("multiscale")
    decoder = dict(decoder_dim=int(a.get("decoder_dim", 512)), decoder_depth=int(a.get("decoder_depth", 8)),
                   decoder_heads=int(a.get("decoder_heads", 16)), norm_pix=bool(a.get("norm_pix_loss", True)),
                   scales=tuple(2**i for i in range(1, int(d.get("n_layers", 3)) + 1)) if multiscale else ())
    return MAEPlan(name, img_size, dict(kind="random", grid=(side, side), num_masked=num_masked), decoder)


def load_mae(source: Source, plan: MAEPlan, device: torch.device) -> nn.Module:
    """The MAETask of an MAE-family checkpoint, weights loaded strictly, in eval mode."""
    from ..models.mae import MAETask
    from ..models.vit import VIT_PRESETS, MaskedViT

    with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed's zero_to_fp32 reports on stdout
        full = consolidate(source.folder)
    ls = float(source.state.get("config", {}).get("model", {}).get("layer_scale", -1.0))
    backbone = MaskedViT(VIT_PRESETS[plan.name], plan.img_size, drop_path=0.0, layer_scale=None if ls < 0 else ls)
    task = MAETask(backbone, num_masked=plan.mask["num_masked"], **plan.decoder)
    task.load_state_dict(full)
    return task.to(device).eval()


def load_peco(source: Source, plan: PecoPlan, device: torch.device) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(backbone, head, tokenizer) of a peco checkpoint, weights loaded strictly, in eval mode."""
    from ..models.artifact import load_tokenizer, tokenizer_identity
    from ..models.mim import MIMHead
    from ..models.vit import VIT_PRESETS, MaskedViT

    saved = source.state.get("tokenizer", {}).get("sha256")
    if saved and saved != tokenizer_identity(source.tokenizer):
        print(f"warning: tokenizer '{source.tokenizer}' is not the one checkpoint {source.folder} was trained with "
              f"(sha256 differs); its predictions will not match", file=sys.stderr)
    with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed's zero_to_fp32 reports on stdout
        full = consolidate(source.folder)
    ls = float(source.state.get("config", {}).get("model", {}).get("layer_scale", -1.0))
    backbone = MaskedViT(VIT_PRESETS[plan.name], plan.img_size, drop_path=0.0, layer_scale=None if ls < 0 else ls)
    backbone.load_state_dict({k[len("backbone."):]: v for k, v in full.items() if k.startswith("backbone.")})
    tokenizer = load_tokenizer(source.tokenizer, device)
    vocab = tokenizer.quant_cfg.codebook_size
    if full["head.weight"].shape[0] != vocab:
        raise ConfigError(f"the checkpoint's head predicts {full['head.weight'].shape[0]} ids but tokenizer "
                          f"'{source.tokenizer}' has {vocab} codes; pass the run's tokenizer")
    head = MIMHead(backbone.embed_dim, vocab, kernels="torch")
    head.load_state_dict({k[len("head."):]: v for k, v in full.items() if k.startswith("head.")})
    return backbone.to(device).eval(), head.to(device).eval(), tokenizer


def visualize(path: str | os.PathLike[str], data: str | os.PathLike[str], out: str | os.PathLike[str], *,
              num: int = 8, seed: int = 0, tokenizer: str | None = None, img_size: int | None = None,
              device: str | None = None) -> dict[str, Any]:
    """The command: check every input (ConfigError/DataError, one line), then load, picture, write.
    Returns ``kind``, ``out``, ``paths``, ``size`` (w, h) and the grid's ``info``."""
    out = check_out(out)
    paths = pick_images(data, num)
    source = find_source(path, tokenizer)
    if source.kind != "tokenizer" and img_size:
        raise ConfigError("--img_size applies to tokenizer artifacts; a stage-2 checkpoint is pictured at its own "
                          "resolution")
    if source.kind == "tokenizer" and tokenizer:
        raise ConfigError("--tokenizer applies to stage-2 checkpoints; the tokenizer artifact is pictured itself")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if source.kind == "tokenizer":
        (view,) = load_views(paths, [tokenizer_size(source, img_size)])
        from ..models.artifact import load_tokenizer

        grid = tokenizer_rows(load_tokenizer(source.tokenizer, dev), view * 2 - 1)
    elif source.kind == "mae":
        plan = mae_plan(source)
        (patch,) = load_views(paths, [plan.img_size])
        mask = draw_masks(plan.mask, len(paths), seed)
        grid = mae_rows(load_mae(source, plan, dev), TF.normalize(patch, IMAGENET_MEAN, IMAGENET_STD), mask)
    else:
        plan = peco_plan(source)
        patch, tok_view = load_views(paths, [plan.img_size, plan.tokenizer_img_size])
        mask = draw_masks(plan.mask, len(paths), seed)
        backbone, head, tok = load_peco(source, plan, dev)
        patch = TF.normalize(patch, IMAGENET_MEAN, IMAGENET_STD)
        grid = peco_rows(backbone, head, tok, patch, tok_view * 2 - 1, mask)
    image = grid.image()
    write_grid(image, out)
    return {"kind": source.kind, "out": str(out), "paths": paths, "size": image.size, "info": grid.info,
            "texts": grid.texts}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m peco_scale.visualize", description=__doc__.split("\n\n")[0])
    ap.add_argument("source", metavar="RUN_OR_CHECKPOINT",
                    help="tokenizer.safetensors (or its stage-1 run folder), or a stage-2 run / step folder (any task)")
    ap.add_argument("--data", required=True, help="ImageFolder root (root/<class>/<image>)")
    ap.add_argument("--out", required=True, help="output .png")
    ap.add_argument("--num", type=int, default=8, help="rows: the first NUM images in sorted order")
    ap.add_argument("--seed", type=int, default=0, help="the mask of row i is drawn from default_rng(seed + i)")
    ap.add_argument("--tokenizer", default=None, help="stage 2: use this tokenizer artifact instead of the recorded one")
    ap.add_argument("--img_size", type=int, default=None,
                    help="tokenizer artifacts: input size (default: the size it was trained at, else 224)")
    args = ap.parse_args(argv)
    try:
        res = visualize(args.source, args.data, args.out, num=args.num, seed=args.seed, tokenizer=args.tokenizer,
                        img_size=args.img_size)
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for i, (path, text) in enumerate(zip(res["paths"], res["texts"] or [""] * len(res["paths"]))):
        print(f"row {i}: {path}: {text}")
    if res["kind"] == "tokenizer":
        finite = [v for v in res["info"]["psnr"] if math.isfinite(v)]
        print(f"mean PSNR {sum(finite) / max(1, len(finite)):.2f} dB over {len(finite)} images")
    print(f"wrote {res['out']} ({res['size'][0]}x{res['size'][1]} px, {len(res['paths'])} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
