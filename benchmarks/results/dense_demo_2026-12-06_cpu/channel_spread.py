"""How a pico ViT's last-block patch tokens spread over the channels (an experiment script): the
share of the sum of squares held by the strongest 1, 4 and 16 channels, on the validation scenes.

    python channel_spread.py DATA SIZE INIT [INIT ...]     (INIT '' = a fresh initialisation)
"""
import sys

import torch

from scenes import load_split, pico, tokens


def main(data, size, inits):
    x, _ = load_split(data, "validation", int(size))
    for init in inits:
        energy = torch.from_numpy(tokens(pico(init, size), x)[-1]).pow(2).mean(0).sort(descending=True).values
        shares = [f"{(energy[:k].sum() / energy.sum()).item():.3f}" for k in (1, 4, 16)]
        print(f"{init or 'random'} @ {size}: share of the sum of squares in the strongest 1 / 4 / 16 channels: {' / '.join(shares)}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
