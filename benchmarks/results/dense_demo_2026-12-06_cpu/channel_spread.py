"""How a pico ViT's last-block patch tokens spread over the channels (an experiment script): the
share of the sum of squares held by the strongest 1, 4 and 16 channels, on the validation scenes.

    python channel_spread.py DATA SIZE INIT [INIT ...]     (INIT '' = a fresh initialisation)
"""
import sys

from peco_scale.engine.weights import load_pretrained
from peco_scale.tools.stream import backbone, stream_tokens
from sub_probe import split


def main(data, size, inits):
    x, _, _ = split(data, "validation", int(size))
    for init in inits:
        vit = backbone("vit_pico_patch16", int(size), load_pretrained(init)[0] if init else {}, init)
        energy = stream_tokens(vit, x)[-1].reshape(-1, vit.embed_dim).pow(2).mean(0).sort(descending=True).values
        shares = [f"{(energy[:k].sum() / energy.sum()).item():.3f}" for k in (1, 4, 16)]
        print(f"{init or 'random'} @ {size}: share of the sum of squares in the strongest 1 / 4 / 16 channels: {' / '.join(shares)}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
