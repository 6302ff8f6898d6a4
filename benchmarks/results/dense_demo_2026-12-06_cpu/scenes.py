"""The dense demo's scenes for the probe scripts here: one split resized to SIZE x SIZE, and a
pico ViT's patch tokens after the embeddings and after each block."""
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from peco_scale.data.mim import IMAGENET_MEAN, IMAGENET_STD
from peco_scale.engine.weights import load_pretrained
from peco_scale.tools.stream import backbone, stream_tokens


def load_split(data, name, size):
    """Normalised images [B, 3, size, size] (bilinear) and label maps [B, size, size] (nearest)."""
    xs, labs = [], []
    for img_path in sorted((Path(data) / "images" / name).glob("*.jpg")):
        img = Image.open(img_path).convert("RGB").resize((size, size), Image.BILINEAR)
        lab = Image.open(Path(data) / "annotations" / name / (img_path.stem + ".png")).resize((size, size), Image.NEAREST)
        xs.append((np.asarray(img, np.float32) / 255 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD))
        labs.append(np.array(lab))
    return torch.tensor(np.stack(xs), dtype=torch.float32).permute(0, 3, 1, 2), np.stack(labs)


def pico(init, size):
    """vit_pico_patch16 at ``size`` px from ``init`` ('' = a fresh initialisation)."""
    return backbone("vit_pico_patch16", int(size), load_pretrained(init)[0] if init else {}, init)


def tokens(vit, x):
    """Each layer's patch tokens as a numpy array [B * N, D]."""
    return [o.reshape(-1, o.shape[-1]).numpy() for o in stream_tokens(vit, x)]
