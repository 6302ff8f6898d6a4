"""Per-token linear probe of a pico ViT's features on the dense demo (an experiment script).

Scenes and their label maps are resized to SIZE x SIZE (labels: nearest); each 16 x 16 patch gets
the majority id of its labelled pixels (1 background, 2-4 shapes; patches with no labelled pixel
are dropped). A logistic regression on the standardised patch tokens after the embeddings and
after every block, fitted on the training scenes, is scored on the validation scenes: accuracy
over all patches, and over the patches whose majority is a shape (3-way shape class).

    python token_probe.py DATA INIT [INIT ...]     (INIT '' = a fresh initialisation)
"""
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from peco_scale.engine.weights import load_pretrained
from peco_scale.tools.stream import backbone, stream_tokens

SIZE, P = 64, 16
MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


def split(data, name):
    xs, ys = [], []
    for img_path in sorted((Path(data) / "images" / name).glob("*.jpg")):
        img = Image.open(img_path).convert("RGB").resize((SIZE, SIZE), Image.BILINEAR)
        lab = np.array(Image.open(Path(data) / "annotations" / name / (img_path.stem + ".png")).resize((SIZE, SIZE), Image.NEAREST))
        xs.append((np.asarray(img, np.float32) / 255 - MEAN) / STD)
        g = SIZE // P
        t = lab.reshape(g, P, g, P).transpose(0, 2, 1, 3).reshape(g * g, P * P)
        ys.append([np.bincount(r[r > 0], minlength=5).argmax() if (r > 0).any() else 0 for r in t])
    return torch.tensor(np.stack(xs), dtype=torch.float32).permute(0, 3, 1, 2), np.array(ys)


def tokens(vit, x):
    return [o.reshape(-1, o.shape[-1]).numpy() for o in stream_tokens(vit, x)]


def main(data, inits):
    (xt, yt), (xv, yv) = split(data, "training"), split(data, "validation")
    yt, yv = yt.reshape(-1), yv.reshape(-1)
    kt, kv = yt > 0, yv > 0
    st, sv = yt > 1, yv > 1
    for init in inits:
        sd = load_pretrained(init)[0] if init else {}
        vit = backbone("vit_pico_patch16", SIZE, sd, init)
        rows = []
        for ft, fv in zip(tokens(vit, xt), tokens(vit, xv)):
            sc = StandardScaler().fit(ft[kt])
            a = LogisticRegression(max_iter=3000).fit(sc.transform(ft[kt]), yt[kt]).score(sc.transform(fv[kv]), yv[kv])
            b = LogisticRegression(max_iter=3000).fit(sc.transform(ft[st]), yt[st]).score(sc.transform(fv[sv]), yv[sv])
            rows.append(f"{100 * a:.1f}/{100 * b:.1f}")
        print(f"{init or 'random'}: all-patch / shape-patch accuracy after embed, blocks 0..: " + "  ".join(rows))
    print(f"patches: train {kt.sum()} ({st.sum()} shape), val {kv.sum()} ({sv.sum()} shape); "
          f"majority baseline val {100 * np.bincount(yv[kv]).max() / kv.sum():.1f}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
