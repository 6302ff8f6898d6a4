"""The same augmentation parameters mean the same distributions in every backend.

A synthetic image encodes its coordinates (red = x, green = y), so each augmented view reveals
its crop box and flip: the crop's area fraction and aspect ratio and the flip rate are
measured per backend and compared with the RandomResizedCrop distribution sampled directly,
and with each other. A uniform grey image measures the brightness-jitter factor.
"""

import importlib
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

from peco_scale.data import AugmentSpec, make_loader
from peco_scale.data.mim import denormalize_patch

W, H = 240, 160
N_IMAGES = 96


_MODULES = {"folder": None, "ffcv": "ffcv", "dali": "nvidia.dali"}


def _require(backend):
    """Skip a backend whose package does not import, with the reason; under CI (PECO_CI set), where
    every backend is installed, fail instead, so a broken install cannot pass as a skip."""
    mod = _MODULES[backend]
    if mod is None:
        return
    try:
        importlib.import_module(mod)
    except Exception as exc:  # noqa: BLE001 - ImportError, or a native library failing to load
        why = f"the {backend} backend does not import ({mod}: {type(exc).__name__}: {exc})"
        if os.environ.get("PECO_CI"):
            pytest.fail(f"{why}; PECO_CI is set, so every backend must be installed", pytrace=False)
        pytest.skip(why)


@pytest.fixture(scope="module")
def coord_tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("coords")
    x = np.linspace(0, 255, W)[None, :].repeat(H, 0)
    y = np.linspace(0, 255, H)[:, None].repeat(W, 1)
    img = Image.fromarray(np.stack([x, y, np.full_like(x, 128)], -1).round().astype(np.uint8))
    grey = Image.fromarray(np.full((H, W, 3), 128, np.uint8))
    for cls, im in (("coords", img), ("grey", grey)):
        (root / cls).mkdir()
        for i in range(N_IMAGES // 2):
            im.save(root / cls / f"{i:03d}.png")
    return root


def _source(backend, root, tmp_path):
    if backend != "ffcv":
        return root
    from peco_scale.data.ffcv_backend import write_beton

    out = tmp_path / "coords.beton"
    write_beton(root, out, max_resolution=256, mode="raw")
    return out


def _measure(backend, root, tmp_path, jitter):
    spec = AugmentSpec(48, "pretrain", tokenizer_size=48, jitter=jitter, mask=dict(grid=(3, 3), num_masked=3))
    loader = make_loader(backend, _source(backend, root, tmp_path), spec, batch_size=16, rank=0, world_size=1, seed=0,
                         workers=1)
    crops, bright = [], []
    for epoch in range(6):
        loader.set_epoch(epoch)
        for b in loader:
            img = denormalize_patch(b["patch"].float().cpu())  # [B, 3, S, S] in [0, 1]
            for im, label in zip(img, b["label"].tolist()):
                if label == 0:  # coords: red = x / W, green = y / H (classes are sorted: coords, grey)
                    r, g = im[0].mean(0), im[1].mean(1)  # red along x, green along y
                    wfrac, hfrac = abs(float(r[-1] - r[0])), float(g[-1] - g[0])
                    # the ends are pixel centres: rescale by S / (S - 1)
                    s = im.shape[-1]
                    wfrac, hfrac = wfrac * s / (s - 1), hfrac * s / (s - 1)
                    crops.append((wfrac * hfrac, math.log((wfrac * W) / (hfrac * H)), float(r[-1] < r[0])))
                else:
                    bright.append(float(im.mean()) / (128 / 255))
    return np.array(crops), np.array(bright)


def _rrc_reference(n, seed=0):
    """Area fractions and log aspect ratios of torchvision's RandomResizedCrop.get_params on W x H."""
    from torchvision import transforms as T

    torch.manual_seed(seed)
    img = Image.new("RGB", (W, H))
    out = []
    for _ in range(n):
        top, left, h, w = T.RandomResizedCrop.get_params(img, [0.08, 1.0], [3 / 4, 4 / 3])
        out.append((w * h / (W * H), math.log(w / h)))
    return np.array(out)


@pytest.mark.parametrize("backend", list(_MODULES))
def test_crop_flip_and_jitter_distributions(backend, coord_tree, tmp_path):
    _require(backend)
    crops, _ = _measure(backend, coord_tree, tmp_path, jitter=0.0)  # colour jitter would distort the coordinates
    _, bright = _measure(backend, coord_tree, tmp_path, jitter=0.4)
    ref = _rrc_reference(4000)
    n = len(crops)
    assert n >= 200
    # area fraction: mean and quartiles of the reference, within sampling error (+ pixel rounding)
    se = ref[:, 0].std() / math.sqrt(n)
    assert abs(crops[:, 0].mean() - ref[:, 0].mean()) < 4 * se + 0.02, (backend, crops[:, 0].mean(), ref[:, 0].mean())
    for q in (0.25, 0.5, 0.75):
        assert abs(np.quantile(crops[:, 0], q) - np.quantile(ref[:, 0], q)) < 0.08, (backend, q)
    assert crops[:, 0].min() > 0.05 and crops[:, 0].max() <= 1.02
    # aspect ratio: within [3/4, 4/3] (log: +-0.288) up to pixel rounding, centred like the reference
    assert np.abs(crops[:, 1]).max() < 0.35
    assert abs(crops[:, 1].mean() - ref[:, 1].mean()) < 0.05
    # flips: rate 0.5
    assert abs(crops[:, 2].mean() - 0.5) < 4 * 0.5 / math.sqrt(n) + 0.01
    # brightness factor on a grey image: uniform in [0.6, 1.4] (mean 1, sd 0.8 / sqrt(12) = 0.23)
    assert bright.min() > 0.55 and bright.max() < 1.45
    assert abs(bright.mean() - 1.0) < 0.06 and abs(bright.std() - 0.8 / math.sqrt(12)) < 0.06, (bright.mean(), bright.std())
