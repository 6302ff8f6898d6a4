"""Sub-patch probe (an experiment script): how much of *where inside its patch* the shapes are can
a linear map read from a pico ViT's patch tokens after the embeddings and after each block?

Scenes and label maps are resized to SIZE x SIZE; each 16 x 16 patch is cut into 4 x 4 cells and
each cell's target is the fraction of its pixels that belong to a shape (label > 1). A ridge
regression from the standardised tokens to the 16 cell fractions is fitted on the training scenes
and scored (R^2 over all cell outputs pooled) on the validation scenes. Also the R^2 of the
patch's own normalised pixels (48 values: 4 x 4 cells x RGB means).

    python sub_probe.py DATA SIZE INIT [INIT ...]     (INIT '' = a fresh initialisation)
"""
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.linear_model import Ridge
from sklearn.preprocessing import StandardScaler

from peco_scale.engine.weights import load_pretrained
from peco_scale.tools.stream import backbone, stream_tokens

P, C = 16, 4
MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


def split(data, name, size):
    xs, occ, pix = [], [], []
    g = size // P
    for img_path in sorted((Path(data) / "images" / name).glob("*.jpg")):
        img = Image.open(img_path).convert("RGB").resize((size, size), Image.BILINEAR)
        lab = np.array(Image.open(Path(data) / "annotations" / name / (img_path.stem + ".png")).resize((size, size), Image.NEAREST))
        x = (np.asarray(img, np.float32) / 255 - MEAN) / STD
        xs.append(x)
        fg = (lab > 1).astype(np.float32)
        # (g, P, g, P) -> per patch, per cell fraction
        o = fg.reshape(g, C, P // C, g, C, P // C).mean(axis=(2, 5)).transpose(0, 2, 1, 3).reshape(g * g, C * C)
        occ.append(o)
        p = x.reshape(g, C, P // C, g, C, P // C, 3).mean(axis=(2, 5)).transpose(0, 2, 1, 3, 4).reshape(g * g, C * C * 3)
        pix.append(p)
    return (torch.tensor(np.stack(xs), dtype=torch.float32).permute(0, 3, 1, 2),
            np.concatenate(occ), np.concatenate(pix))


def r2(ft, yt, fv, yv):
    sc = StandardScaler().fit(ft)
    pred = Ridge(alpha=1.0).fit(sc.transform(ft), yt).predict(sc.transform(fv))
    return 1 - ((pred - yv) ** 2).sum() / ((yv - yt.mean(0)) ** 2).sum()


def main(data, size, inits):
    size = int(size)
    (xt, ot, pt), (xv, ov, pv) = split(data, "training", size), split(data, "validation", size)
    for init in inits:
        sd = load_pretrained(init)[0] if init else {}
        vit = backbone("vit_pico_patch16", size, sd, init)
        rows = []
        for ft, fv in zip(stream_tokens(vit, xt), stream_tokens(vit, xv)):
            ft, fv = ft.reshape(-1, ft.shape[-1]).numpy(), fv.reshape(-1, fv.shape[-1]).numpy()
            rows.append(f"{r2(ft, ot, fv, ov):.3f}/{r2(ft, pt, fv, pv):.3f}")
        print(f"{init or 'random'} @ {size}: occupancy/pixel R^2 after embed, blocks 0..: " + "  ".join(rows), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
