"""Per-channel scale for the detection pyramid's input (an experiment, with channel_scale.patch).

Measures the rms of each channel of a pico ViT's last-block patch tokens on the training scenes,
after the residual-stream factor the run uses, and saves 0.73 / rms (0.73: a fresh
initialisation's rms) as a tensor. channel_scale.patch makes SimpleFeaturePyramid multiply the
last block's map by it when the environment variable PECO_EXP_CHAN names the file.

    python channel_scale.py DATA INIT SIZE STREAM_SCALE OUT.pt
"""
import sys

import torch

from peco_scale.engine.weights import load_pretrained
from peco_scale.tools.stream import backbone, stream_tokens
from sub_probe import split


def main(data, init, size, scale, out):
    x, _, _ = split(data, "training", int(size))
    vit = backbone("vit_pico_patch16", int(size), load_pretrained(init)[0], init)
    t = stream_tokens(vit, x)[-1].reshape(-1, vit.embed_dim) * float(scale)
    rms = t.pow(2).mean(0).sqrt()
    print(f"per-channel rms min / median / max: {rms.min():.3f} / {rms.median():.3f} / {rms.max():.3f}")
    torch.save(0.73 / rms, out)


if __name__ == "__main__":
    main(*sys.argv[1:])
