"""Flip + colour jitter + normalisation (peco_scale/data/colour.py) against torchvision's functional ops."""

import itertools

import numpy as np
import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from peco_scale.data import colour
from peco_scale.data.colour import color_jitter, draw_flip_jitter, flip_jitter_normalize

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _reference(img_u8, flip, factors, order, mean, std):
    """torchvision: uint8 -> float, hflip, adjust_* in the given order, normalize (one sample at a time)."""
    out = []
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation)
    for k in range(img_u8.shape[0]):
        x = torch.from_numpy(img_u8[k]).permute(2, 0, 1).double() / 255.0
        if flip[k]:
            x = TF.horizontal_flip(x)
        for op in order[k]:
            x = ops[op](x, float(factors[k, op]))
        out.append(TF.normalize(x, list(mean), list(std)))
    return torch.stack(out)


def _inputs(n=12, h=9, w=13, seed=0):
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)
    img[0] = 255  # saturated: clamping after brightness > 1 matters
    img[1] = 0
    draws = [draw_flip_jitter(rng, 0.5, 0.8) for _ in range(n)]
    flip = np.array([d[0] for d in draws])
    factors = np.stack([d[1] for d in draws])
    order = np.stack([d[2] for d in draws])
    factors[2] = 1.0  # identity factors are skipped by the kernel: must equal the reference too
    return img, flip, factors, order


@pytest.mark.parametrize("mean,std", [((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)), (MEAN, STD), ((0.5,) * 3, (0.5,) * 3)])
def test_numba_kernel_matches_torchvision(mean, std):
    pytest.importorskip("numba")
    img, flip, factors, order = _inputs()
    got = flip_jitter_normalize(img, flip, factors, order, mean, std)
    ref = _reference(img, flip, factors, order, mean, std)
    assert got.dtype == torch.float32 and got.shape == (12, 3, 9, 13)
    torch.testing.assert_close(got.double(), ref, atol=2e-5 / min(std), rtol=0)


def test_torch_path_matches_torchvision(monkeypatch):
    monkeypatch.setattr(colour, "_numba_kernel", lambda: None)  # the path a CUDA tensor takes
    img, flip, factors, order = _inputs(seed=1)
    got = flip_jitter_normalize(torch.from_numpy(img), flip, factors, order, MEAN, STD)
    ref = _reference(img, flip, factors, order, MEAN, STD)
    torch.testing.assert_close(got.double(), ref, atol=2e-5 / min(STD), rtol=0)


def test_color_jitter_applies_ops_in_the_given_order():
    x = torch.rand(6, 3, 5, 7)
    factors = torch.tensor([[0.3, 1.7, 0.2]] * 6)
    orders = torch.tensor(list(itertools.permutations(range(3))))
    y = color_jitter(x, factors, orders)
    outs = {tuple(o.tolist()): y[i] for i, o in enumerate(orders)}
    assert len({tuple(v.flatten()[:20].tolist()) for v in outs.values()}) == 6  # order matters here


def test_draws_are_seeded_and_distributed():
    a = [draw_flip_jitter(np.random.default_rng(s), 0.5, 0.4) for s in range(2000)]
    b = [draw_flip_jitter(np.random.default_rng(s), 0.5, 0.4) for s in range(5)]
    for x, y in zip(a, b):
        assert x[0] == y[0] and np.array_equal(x[1], y[1]) and np.array_equal(x[2], y[2])
    flips = np.array([d[0] for d in a])
    factors = np.stack([d[1] for d in a])
    orders = {tuple(d[2].tolist()) for d in a}
    assert abs(flips.mean() - 0.5) < 0.05
    assert factors.min() >= 0.6 and factors.max() <= 1.4 and abs(factors.mean() - 1.0) < 0.02
    assert orders == set(itertools.permutations(range(3)))
    flip, factors, order = draw_flip_jitter(np.random.default_rng(0), 0.0, 0.0)
    assert not flip and np.all(factors == 1) and list(order) == [0, 1, 2]
