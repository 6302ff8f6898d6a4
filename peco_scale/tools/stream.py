"""Residual-stream size of a pre-trained ViT, and the ``model.stream_scale`` that brings it to a
fresh initialisation's.

    python -m peco_scale.tools.stream --init runs/pretrain --model vit_base_patch16 --img_size 224 \\
        --data /path/to/train/images [--images 64] [--out stream.json]

Both backbones (``--init``, and a fresh one of the same preset with its layer scale) read the
first ``--images`` readable images of ``--data`` (an image folder, files sorted; unreadable ones
skipped and counted; the evaluation transform: resize, centre crop, ImageNet mean and std). Printed per backbone: the rms of the patch tokens
after the embeddings and after every block. The factor is the fresh backbone's last-block rms
over the pre-trained one's: pass it as ``--model.stream_scale`` to segment, detect or finetune
(docs/dense.md says what the scaling does and does not change).

Exit status 0 on success; bad input prints one ``error:`` line to stderr and exits 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ..config import ConfigError
from ..data.eval import eval_transform
from ..data.folder import load_rgb, scan_image_folder
from ..data.spec import DataError
from ..engine.weights import load_pretrained
from ..models.transfer import adapt_state_dict, build_classifier, init_layer_scale
from ..models.vit import parse_model_name


@torch.no_grad()
def stream_tokens(vit: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The patch tokens ``(B, N, D)`` of a timm ViT after the embeddings and after each block."""
    h = vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))
    out = [h[:, vit.num_prefix_tokens:]]
    for block in vit.blocks:
        h = block(h)
        out.append(h[:, vit.num_prefix_tokens:])
    return out


def stream_rms(vit: torch.nn.Module, x: torch.Tensor) -> list[float]:
    """rms of the patch tokens after the embeddings and after each block of a timm ViT."""
    return [t.double().pow(2).mean().sqrt().item() for t in stream_tokens(vit, x)]


def backbone(name: str, img_size: int, sd: dict[str, torch.Tensor], source: str) -> torch.nn.Module:
    """The timm ViT of preset ``name`` with ``sd`` loaded ({} = a fresh one, seed 0)."""
    torch.manual_seed(0)
    vit = build_classifier(name, img_size, 0, drop_path=0.0, layer_scale=init_layer_scale(name, sd)).eval()
    if sd:
        vit.load_state_dict(adapt_state_dict(sd, vit, source=f"--init '{source}'"), strict=False)
    return vit


def measure(init: str, name: str, img_size: int, data: str, images: int) -> dict:
    name, _, img_size = parse_model_name(name, img_size)
    samples, _, _ = scan_image_folder(data)
    transform, xs, skipped = eval_transform(img_size), [], 0
    for path, _ in samples:
        if len(xs) == images:
            break
        try:
            xs.append(transform(load_rgb(path)))
        except (OSError, ValueError):  # unreadable: skipped and counted
            skipped += 1
    if not xs:
        raise DataError(f"none of the {len(samples)} images under {data} could be read; pass a folder of images")
    x = torch.stack(xs)
    sd, _ = load_pretrained(init)
    pre, fresh = stream_rms(backbone(name, img_size, sd, init), x), stream_rms(backbone(name, img_size, {}, ""), x)
    return {"init": init, "model": name, "img_size": img_size, "images": len(x), "skipped_images": skipped, "rms": pre, "fresh_rms": fresh,
            "stream_scale": fresh[-1] / pre[-1]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m peco_scale.tools.stream", description=__doc__.split("\n\n")[0])
    ap.add_argument("--init", required=True, help="a stage-2 run folder, an exported backbone or a timm checkpoint")
    ap.add_argument("--model", required=True, help="its preset (vit_pico_patch16 ... vit_huge_patch14)")
    ap.add_argument("--img_size", type=int, required=True, help="the resolution to measure at (the transfer task's)")
    ap.add_argument("--data", required=True, help="an image folder (<root>/<sub-folder>/*.jpg), e.g. the task's images")
    ap.add_argument("--images", type=int, default=64, help="how many of its images (sorted) to read")
    ap.add_argument("--out", default="", help="also write the numbers to this JSON file")
    args = ap.parse_args(argv)
    if args.images < 1:
        print(f"error: --images={args.images} must be at least 1", file=sys.stderr)
        return 2
    try:
        row = measure(args.init, args.model, args.img_size, args.data, args.images)
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for what, values in (("pre-trained", row["rms"]), ("fresh init", row["fresh_rms"])):
        print(f"{what}: stream rms after the embeddings, then each block: " + " ".join(f"{v:.3g}" for v in values))
    print(f"--model.stream_scale {row['stream_scale']:.3g}   (fresh / pre-trained rms at the last block, "
          f"{row['images']} images at {row['img_size']} px, {row['skipped_images']} unreadable skipped)")
    if args.out:
        Path(args.out).write_text(json.dumps(row, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
