"""Residual-stream rms of a ViT backbone on dense demo scenes: after the embeddings and after
each block (patch tokens only), as `ViTBackbone` feeds the feature pyramid.

    python stream_rms.py DATA_ROOT [RUN_DIR_OR_WEIGHTS ...]     ('' = random initialisation)

The first 64 training scenes, each resized to 64 x 64 and normalised with ImageNet's mean and std.
"""

import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from peco_scale.data.mim import IMAGENET_MEAN, IMAGENET_STD
from peco_scale.engine.weights import load_pretrained
from peco_scale.models.dense import ViTBackbone
from peco_scale.models.transfer import adapt_state_dict, has_layer_scale

def scenes(root: Path, n: int = 64, size: int = 64) -> torch.Tensor:
    files = sorted((root / "images" / "training").glob("*.jpg"))[:n]
    x = torch.tensor(np.stack([np.asarray(Image.open(f).convert("RGB").resize((size, size), Image.BILINEAR))
                               for f in files])).permute(0, 3, 1, 2).float() / 255
    return (x - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)


@torch.no_grad()
def stream_rms(source: str, x: torch.Tensor) -> list[float]:
    sd = load_pretrained(source)[0] if source else {}
    bb = ViTBackbone("vit_pico_patch16", x.shape[-1], (0, 1, 2, 3),
                     layer_scale=0.1 if not sd or has_layer_scale(sd) else None)
    if sd:
        bb.vit.load_state_dict(adapt_state_dict(sd, bb.vit), strict=False)
    vit = bb.eval().vit
    embed = vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))[:, vit.num_prefix_tokens:]
    return [t.pow(2).mean().sqrt().item() for t in [embed, *bb(x)]]


if __name__ == "__main__":
    x = scenes(Path(sys.argv[1]))
    for src in sys.argv[2:]:
        print(f"{src or 'random init'}: " + " ".join(f"{v:.2f}" for v in stream_rms(src, x)))
