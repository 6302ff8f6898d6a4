"""Map a folder of images to token grids with a trained tokenizer artifact.

    python -m peco_scale.tools.tokenize --tokenizer runs/demo/tokenizer/tokenizer.safetensors \\
        --data runs/demo/data --out runs/demo/tokens.npz [--img_size 64]

Writes an .npz with ``tokens`` [N, h, w] (uint16 when K <= 65536), ``labels`` [N], ``paths``
[N] and ``classes``; unreadable images are skipped and counted, never substituted.

Exit status 0 on success; bad input prints one ``error:`` line to stderr and exits 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..data import DataError, ImageListDataset, collate_readable, scan_image_folder, tokenizer_transform
from ..models.artifact import load_tokenizer


def tokenize_folder(tokenizer: str | Path, data: str | Path, out: str | Path, *, img_size: int | None = None,
                    batch_size: int = 64, workers: int = 2, device: str | None = None) -> dict:
    """Tokenize every readable image under ``data``; returns a summary dict."""
    samples, classes, _ = scan_image_folder(data)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_tokenizer(tokenizer, device)
    f = model.downsample
    size = img_size or 224
    if size % f:
        raise DataError(f"--img_size {size} is not divisible by the tokenizer's downsample factor {f}; "
                        f"use {max(f, size // f * f)}")
    loader = DataLoader(ImageListDataset(samples, tokenizer_transform(size, train=False)), batch_size=batch_size,
                        num_workers=workers, collate_fn=collate_readable)
    tokens, labels, kept = [], [], []
    with torch.no_grad():
        for x, y, idx, _ in loader:
            if x is None:
                continue
            tokens.append(model.tokenize(x.to(device)).cpu())
            labels.append(y)
            kept.append(idx)
    if not tokens:
        raise DataError(f"no readable image under '{data}'")
    grid = torch.cat(tokens).numpy()
    dtype = np.uint16 if model.quant_cfg.codebook_size <= 65536 else np.int32
    kept_idx = torch.cat(kept).numpy()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.tmp{os.getpid()}.npz")
    np.savez(tmp, tokens=grid.astype(dtype), labels=torch.cat(labels).numpy(),
             paths=np.array([samples[i][0] for i in kept_idx]), classes=np.array(classes))
    os.replace(tmp, out)
    return {"out": str(out), "images": int(grid.shape[0]), "skipped": len(samples) - int(grid.shape[0]),
            "grid": tuple(grid.shape[1:])}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m peco_scale.tools.tokenize", description=__doc__.split("\n")[0])
    p.add_argument("--tokenizer", required=True, help="tokenizer.safetensors written by train_tokenizer")
    p.add_argument("--data", required=True, help="ImageFolder root")
    p.add_argument("--out", required=True, help="output .npz")
    p.add_argument("--img_size", type=int, default=None, help="input size (default 224); a multiple of the downsample")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args(argv)
    try:
        s = tokenize_folder(args.tokenizer, args.data, args.out, img_size=args.img_size,
                            batch_size=args.batch_size, workers=args.workers)
    except (DataError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {s['images']} token grids of {s['grid'][0]}x{s['grid'][1]} to {s['out']} "
          f"({s['skipped']} unreadable images skipped)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
