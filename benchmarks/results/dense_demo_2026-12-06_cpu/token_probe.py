"""Per-token linear probe of a pico ViT's features on the dense demo (an experiment script).

Scenes and their label maps are resized to SIZE x SIZE (labels: nearest); each 16 x 16 patch gets
the majority id of its labelled pixels (1 background, 2-4 shapes; patches with no labelled pixel
are dropped). A logistic regression on the standardised patch tokens after the embeddings and
after every block, fitted on the training scenes, is scored on the validation scenes: accuracy
over all patches, and over the patches whose majority is a shape (3-way shape class).

    python token_probe.py DATA INIT [INIT ...]     (INIT '' = a fresh initialisation)
"""
import sys

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from scenes import load_split, pico, tokens

SIZE, P = 64, 16


def split(data, name):
    x, labs = load_split(data, name, SIZE)
    g = SIZE // P
    ys = []
    for lab in labs:
        t = lab.reshape(g, P, g, P).transpose(0, 2, 1, 3).reshape(g * g, P * P)
        ys.append([np.bincount(r[r > 0], minlength=5).argmax() if (r > 0).any() else 0 for r in t])
    return x, np.array(ys)


def main(data, inits):
    (xt, yt), (xv, yv) = split(data, "training"), split(data, "validation")
    yt, yv = yt.reshape(-1), yv.reshape(-1)
    kt, kv = yt > 0, yv > 0
    st, sv = yt > 1, yv > 1
    for init in inits:
        vit = pico(init, SIZE)
        rows = []
        for ft, fv in zip(tokens(vit, xt), tokens(vit, xv)):
            sc = StandardScaler().fit(ft[kt])
            a = LogisticRegression(max_iter=3000).fit(sc.transform(ft[kt]), yt[kt]).score(sc.transform(fv[kv]), yv[kv])
            b = LogisticRegression(max_iter=3000).fit(sc.transform(ft[st]), yt[st]).score(sc.transform(fv[sv]), yv[sv])
            rows.append(f"{100 * a:.1f}/{100 * b:.1f}")
        print(f"{init or 'random'}: all-patch / shape-patch accuracy after the embeddings, then each block: " + "  ".join(rows))
    print(f"patches: train {kt.sum()} ({st.sum()} shape), val {kv.sum()} ({sv.sum()} shape); "
          f"majority baseline val {100 * np.bincount(yv[kv]).max() / kv.sum():.1f}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
