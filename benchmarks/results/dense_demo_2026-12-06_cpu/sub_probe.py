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

import numpy as np
from sklearn.linear_model import Ridge
from sklearn.preprocessing import StandardScaler

from scenes import load_split, pico, tokens

P, C = 16, 4


def split(data, name, size):
    """Images, and per patch the shape fraction of each of its C x C cells and their mean colours."""
    x, labs = load_split(data, name, size)
    g, k = size // P, P // C
    fg = (labs > 1).astype(np.float32)
    occ = fg.reshape(-1, g, C, k, g, C, k).mean(axis=(3, 6)).transpose(0, 1, 3, 2, 4).reshape(-1, C * C)
    px = x.permute(0, 2, 3, 1).numpy()
    pix = px.reshape(-1, g, C, k, g, C, k, 3).mean(axis=(3, 6)).transpose(0, 1, 3, 2, 4, 5).reshape(-1, C * C * 3)
    return x, occ, pix


def r2(ft, yt, fv, yv):
    sc = StandardScaler().fit(ft)
    pred = Ridge(alpha=1.0).fit(sc.transform(ft), yt).predict(sc.transform(fv))
    return 1 - ((pred - yv) ** 2).sum() / ((yv - yt.mean(0)) ** 2).sum()


def main(data, size, inits):
    size = int(size)
    (xt, ot, pt), (xv, ov, pv) = split(data, "training", size), split(data, "validation", size)
    for init in inits:
        vit = pico(init, size)
        rows = []
        for ft, fv in zip(tokens(vit, xt), tokens(vit, xv)):
            rows.append(f"{r2(ft, ot, fv, ov):.3f}/{r2(ft, pt, fv, pv):.3f}")
        print(f"{init or 'random'} @ {size}: occupancy/pixel R^2 after the embeddings, then each block: " + "  ".join(rows), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
