"""Pictures of what a model predicts: rows of tiles laid out as one PNG grid.

The row functions take built models and a batch as the data loaders give it and do no file I/O;
they run under ``torch.no_grad()`` in eval mode and restore each model's training mode, so the
trainer calls them during training (every ``train.image_every`` steps) and
``python -m peco_scale.visualize`` on a finished run:

- :func:`tokenizer_rows`: ``input | reconstruction`` of a tokenizer, with each image's PSNR;
- :func:`peco_rows`: ``input | masked input | prediction | tokenizer reconstruction`` of a peco
  model (the prediction is PeCo's Figure 5: the head's argmax ids at the masked patches, the
  tokenizer's own ids at the visible ones, decoded by the tokenizer);
- :func:`mae_rows`: ``input | masked input | prediction`` of an MAE-family model (the predicted
  pixels at the masked patches, the input's own at the visible ones), with the masked patches'
  loss and PSNR.

:func:`make_grid` lays rows out, :func:`write_grid` saves atomically.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import nn
from torchvision.transforms import functional as TF

from .config import ConfigError
from .data import DataError, denormalize, load_rgb, scan_image_folder
from .data.masking import mask_generator
from .data.mim import denormalize_patch
from .models.mae import mae_loss, paste_prediction, patchify

GAP = 4  # px between tiles and around the grid
LINE = 14  # px of the column-label band (when labels are given) and of each row's caption band (texts)
BACKGROUND, INK = (255, 255, 255), (0, 0, 0)
MASK_GREY = 0.5  # value of the masked patches in the "masked input" column

# ----------------------------------------------------------------------------- grids


@dataclass
class GridRows:
    """What a row function returns: ``rows`` (one list of [3, H, W] tensors in [0, 1] per image),
    column ``labels``, one caption per row (``texts``, or None) and what was computed on the way
    (``info``: e.g. ``psnr``, token ids)."""

    rows: list[list[torch.Tensor]]
    labels: list[str]
    texts: list[str] | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def image(self) -> Image.Image:
        return make_grid(self.rows, self.labels, self.texts)


def tile_uint8(tile: torch.Tensor) -> np.ndarray:
    """[3, H, W] in [0, 1] -> uint8 [H, W, 3] (clamped, rounded)."""
    if tile.ndim != 3 or tile.shape[0] != 3:
        raise ValueError(f"a tile must be [3, H, W], got {tuple(tile.shape)}")
    arr = (tile.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
    return arr.permute(1, 2, 0).numpy()


def _fit(draw: ImageDraw.ImageDraw, text: str, width: int, font: Any) -> str:
    """``text`` cut (with '..') to fit ``width`` px."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "..", font=font) > width:
        text = text[:-1]
    return text + ".." if text else ""


def make_grid(rows: list[list[torch.Tensor]], labels: list[str] | None = None,
              texts: list[str] | None = None) -> Image.Image:
    """Lay ``rows`` (each a list of [3, H, W] tensors in [0, 1]) out as an RGB image.

    Every cell is as large as the largest tile (a smaller tile sits at its cell's top left). Layout,
    in px: ``GAP`` around and between cells; a ``LINE`` band on top with the column ``labels`` (when
    given; each cut to its cell's width); under each row a ``LINE`` band with its caption ``texts[i]``
    (when given). So with C columns of W x H tiles: width ``GAP + C * (W + GAP)``, height
    ``GAP + [LINE] + R * (H + [LINE] + GAP)``. Tile (r, c)'s top-left corner: ``tile_origin``."""
    if not rows or not all(rows):
        raise ValueError("make_grid needs at least one row, each with at least one tile")
    if texts is not None and len(texts) != len(rows):
        raise ValueError(f"{len(texts)} texts for {len(rows)} rows")
    cols = max(len(r) for r in rows)
    cell_h = max(t.shape[-2] for r in rows for t in r)
    cell_w = max(t.shape[-1] for r in rows for t in r)
    top, cap = (LINE if labels else 0), (LINE if texts is not None else 0)
    img = Image.new("RGB", (GAP + cols * (cell_w + GAP), GAP + top + len(rows) * (cell_h + cap + GAP)), BACKGROUND)
    draw, font = ImageDraw.Draw(img), ImageFont.load_default()
    for c, label in enumerate(labels or []):
        draw.text((GAP + c * (cell_w + GAP), GAP // 2), _fit(draw, label, cell_w, font), fill=INK, font=font)
    for r, row in enumerate(rows):
        for c, tile in enumerate(row):
            img.paste(Image.fromarray(tile_uint8(tile)), tile_origin(r, c, (cell_h, cell_w), bool(labels),
                                                                    texts is not None))
        if texts is not None:
            x, y = tile_origin(r, 0, (cell_h, cell_w), bool(labels), True)
            draw.text((x, y + cell_h + 1), texts[r], fill=INK, font=font)
    return img


def tile_origin(r: int, c: int, cell: tuple[int, int], labels: bool, texts: bool) -> tuple[int, int]:
    """(x, y) of the top-left pixel of tile (row r, column c) in :func:`make_grid`'s layout, for
    cells of ``cell`` = (H, W) px, with or without the label band and caption bands."""
    h, w = cell
    return GAP + c * (w + GAP), GAP + (LINE if labels else 0) + r * (h + (LINE if texts else 0) + GAP)


def write_grid(image: Image.Image, path: str | os.PathLike[str]) -> Path:
    """Save ``image`` as PNG at ``path`` atomically (a temporary name in the same folder, then
    ``os.replace``); missing parent folders are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        image.save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


# ----------------------------------------------------------------------------- rows


@contextlib.contextmanager
def evaluating(*modules: nn.Module) -> Iterator[None]:
    """``torch.no_grad()`` with every module (and sub-module) in eval mode; each module's own
    training flags are restored afterwards."""
    saved = [(m, m.training) for mod in modules for m in mod.modules()]
    try:
        for mod in modules:
            mod.eval()
        with torch.no_grad():
            yield
    finally:
        for m, mode in saved:
            m.training = mode


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of images in [0, 1]: [B, ...] x [B, ...] -> float64 [B] (inf where equal)."""
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse)


def _tokenizer_dtype(tokenizer: nn.Module) -> torch.dtype:
    return next(tokenizer.encoder.parameters()).dtype


def tokenizer_rows(tokenizer: nn.Module, images: torch.Tensor) -> GridRows:
    """Rows ``input | reconstruction`` of ``images`` ([B, 3, S, S] in [-1, 1], the tokenizer's
    normalisation; S a multiple of its downsample). The reconstruction decodes the image's own token
    ids (``decode_indices(tokenize(x))``). ``info``: ``psnr`` (list of B floats, dB, on the [0, 1]
    images of the two columns), ``ids`` [B, h, w]."""
    dev = next(tokenizer.parameters()).device
    with evaluating(tokenizer):
        ids = tokenizer.tokenize(images.to(dev, _tokenizer_dtype(tokenizer)))
        rec = tokenizer.decode_indices(ids)
    inp, out = denormalize(images.float().cpu()), denormalize(rec.float().cpu())
    values = psnr(inp, out).tolist()
    return GridRows([[inp[i], out[i]] for i in range(len(inp))], ["input", "reconstruction"],
                    [f"PSNR {v:.2f} dB" for v in values], {"psnr": values, "ids": ids.cpu()})


def grey_masked(images: torch.Tensor, mask: torch.Tensor, value: float = MASK_GREY) -> torch.Tensor:
    """[B, 3, H, W] images with the patches where ``mask`` ([B, h, w] bool, True = masked) is set
    replaced by ``value``; the patch size is H / h."""
    b, _, height, width = images.shape
    mask = mask.reshape(b, *mask.shape[-2:]) if mask.ndim == 3 else mask
    big = F.interpolate(mask[:, None].float(), size=(height, width), mode="nearest").bool()
    return torch.where(big, torch.full_like(images, value), images)


def peco_predict(backbone: nn.Module, head: nn.Module, tokenizer: nn.Module, patch_view: torch.Tensor,
                 tokenizer_view: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Token ids of PeCo's prediction (call under :func:`evaluating`): ``tokenizer`` [B, N] (the
    tokenizer's ids of ``tokenizer_view``), ``head`` [B, N] (argmax of the MIM head on the backbone's
    masked forward), ``mask`` bool [B, N], ``prediction`` [B, N] (head ids where masked, tokenizer ids
    elsewhere) and ``grid`` (h, w)."""
    p = next(backbone.parameters())
    b = patch_view.shape[0]
    mask = mask.reshape(b, -1).to(p.device).bool()
    tok = tokenizer.tokenize(tokenizer_view.to(next(tokenizer.parameters()).device, _tokenizer_dtype(tokenizer)))
    grid = tuple(tok.shape[-2:])
    tok = tok.reshape(b, -1).to(p.device)
    if tok.shape != mask.shape:
        raise ValueError(f"token grid {grid[0]}x{grid[1]} ({tok.shape[1]} ids) != the mask's {mask.shape[1]} "
                         f"patches; the tokenizer view must give one token per patch")
    hidden = backbone(patch_view.to(p.device, p.dtype), mask)
    logits = F.linear(hidden.float(), head.weight.float(), head.bias.float())
    ids = logits.argmax(-1)
    return {"tokenizer": tok, "head": ids, "mask": mask, "prediction": torch.where(mask, ids, tok), "grid": grid}


def peco_rows(backbone: nn.Module, head: nn.Module, tokenizer: nn.Module, patch_view: torch.Tensor,
              tokenizer_view: torch.Tensor, mask: torch.Tensor) -> GridRows:
    """Rows ``input | masked input | prediction | tokenizer reconstruction`` of a peco (stage-2)
    model. ``patch_view`` [B, 3, S, S] ImageNet-normalised, ``tokenizer_view`` [B, 3, T, T] in
    [-1, 1], ``mask`` bool [B, h, w] or [B, N] (True = masked): a stage-2 batch as the loaders give
    it. ``backbone`` is a ``MaskedViT`` (``backbone(x, mask)`` -> [B, N, D]), ``head`` a ``MIMHead``
    (``weight`` [K, D], ``bias`` [K]). ``info``: the ids of :func:`peco_predict` (on CPU) and
    ``correct`` (per row: masked patches whose predicted id is the tokenizer's)."""
    with evaluating(backbone, head, tokenizer):
        ids = peco_predict(backbone, head, tokenizer, patch_view, tokenizer_view, mask)
        h, w = ids["grid"]
        shape = (patch_view.shape[0], h, w)
        pred = tokenizer.decode_indices(ids["prediction"].view(shape).to(next(tokenizer.parameters()).device))
        rec = tokenizer.decode_indices(ids["tokenizer"].view(shape).to(next(tokenizer.parameters()).device))
    ids = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in ids.items()}
    inp = denormalize_patch(patch_view.float().cpu())
    masked = grey_masked(inp, ids["mask"].view(shape))
    pred, rec = denormalize(pred.float().cpu()), denormalize(rec.float().cpu())
    hits = ((ids["head"] == ids["tokenizer"]) & ids["mask"]).sum(1).tolist()
    counts = ids["mask"].sum(1).tolist()
    texts = [f"{k}/{n} masked tokens right" for k, n in zip(hits, counts)]
    rows = [[inp[i], masked[i], pred[i], rec[i]] for i in range(len(inp))]
    return GridRows(rows, ["input", "masked input", "prediction", "tokenizer reconstruction"], texts,
                    {**ids, "correct": hits, "masked": counts})



def mae_rows(task: nn.Module, images: torch.Tensor, mask: torch.Tensor) -> GridRows:
    """Rows ``input | masked input | prediction`` of an MAE-family model (``task`` a
    :class:`~peco_scale.models.mae.MAETask`). ``images`` [B, 3, S, S] ImageNet-normalised (the
    patch view), ``mask`` bool [B, h, w] or [B, N] (True = masked, the same count in every image).
    The prediction pastes the input's own patches back at the visible positions. ``info``:
    ``loss`` (per image, MAE's loss on its masked patches) and ``psnr`` (dB, over the masked
    patches' pixels of the [0, 1] images)."""
    p = next(task.parameters())
    b = images.shape[0]
    mask = mask.reshape(b, -1).bool()
    with evaluating(task):
        x, m = images.to(p.device, p.dtype), mask.to(p.device)
        pred = task(x, m)["pred"].float()
        target = patchify(x.float(), task.patch)
        loss = [float(mae_loss(pred[i:i + 1], target[i:i + 1], m[i:i + 1], norm_pix=task.norm_pix)) for i in range(b)]
        out = paste_prediction(x, m, pred, task.patch, task.backbone.grid_size, task.norm_pix)
    grid = task.backbone.grid_size
    inp, out = denormalize_patch(images.float().cpu()), denormalize_patch(out.cpu()).clamp(0, 1)
    masked = grey_masked(inp, mask.view(b, *grid))
    big = F.interpolate(mask.view(b, 1, *grid).float(), size=inp.shape[-2:], mode="nearest").expand_as(inp)
    mse = ((out.double() - inp.clamp(0, 1).double()).pow(2) * big).flatten(1).sum(1) / big.flatten(1).sum(1)
    values = (10 * torch.log10(1.0 / mse)).tolist()
    texts = [f"loss {l:.3f}, PSNR {v:.2f} dB (masked)" for l, v in zip(loss, values)]
    rows = [[inp[i].clamp(0, 1), masked[i].clamp(0, 1), out[i]] for i in range(b)]
    return GridRows(rows, ["input", "masked input", "prediction"], texts, {"loss": loss, "psnr": values})


# ----------------------------------------------------------------------------- images from a folder


def pick_images(data: str | os.PathLike[str], num: int) -> list[str]:
    """Paths of the first ``num`` images of the ImageFolder tree ``data`` (its sorted listing)."""
    if num < 1:
        raise ConfigError(f"--num {num} must be at least 1")
    samples, _, _ = scan_image_folder(data)
    return [path for path, _ in samples[:num]]


def load_views(paths: Sequence[str], sizes: Sequence[int]) -> list[torch.Tensor]:
    """For each size s: [B, 3, s, s] in [0, 1], the central square of each image resized (bicubic,
    antialiased) to s. Every size comes from the same crop."""
    views: list[list[torch.Tensor]] = [[] for _ in sizes]
    for path in paths:
        try:
            img = load_rgb(path)
        except Exception as exc:  # noqa: BLE001 - any decode failure is the same user error
            raise DataError(f"image '{path}' does not decode ({type(exc).__name__}: {exc}); remove it or point "
                            f"--data elsewhere") from None
        side = min(img.size)
        left, top = (img.width - side) // 2, (img.height - side) // 2
        crop = img.crop((left, top, left + side, top + side))
        for out, s in zip(views, sizes):
            out.append(TF.to_tensor(TF.resize(crop, [s, s], TF.InterpolationMode.BICUBIC, antialias=True)))
    return [torch.stack(v) for v in views]


def draw_masks(mask: dict[str, Any], num: int, seed: int) -> torch.Tensor:
    """bool [num, h, w]: mask i from ``mask_generator(**mask)`` (a block mask unless ``mask`` names
    another ``kind``) with ``np.random.default_rng(seed + i)``."""
    gen = mask_generator(**mask)
    return torch.from_numpy(np.stack([gen(np.random.default_rng(seed + i)) for i in range(num)]))
