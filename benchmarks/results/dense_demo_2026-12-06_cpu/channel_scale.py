"""Per-channel scale for the detection pyramid's input (an experiment, with channel_scale.patch).

Measures the rms of each channel of a pico ViT's last-block patch tokens on the training scenes,
after the residual-stream factor the run uses, and saves 0.73 / rms (0.73: a fresh
initialisation's rms) as a tensor. channel_scale.patch makes SimpleFeaturePyramid multiply the
last block's map by it when the environment variable PECO_EXP_CHAN names the file.

    python channel_scale.py DATA INIT SIZE STREAM_SCALE OUT.pt
"""
import sys

import torch

from scenes import load_split, pico, tokens


def main(data, init, size, scale, out):
    x, _ = load_split(data, "training", int(size))
    rms = torch.from_numpy(tokens(pico(init, size), x)[-1] * float(scale)).pow(2).mean(0).sqrt()
    print(f"per-channel rms min / median / max: {rms.min():.3f} / {rms.median():.3f} / {rms.max():.3f}")
    torch.save(0.73 / rms, out)


if __name__ == "__main__":
    main(*sys.argv[1:])
