"""Decoding to 8-bit RGB (every backend), and flip + colour jitter + normalisation of uint8 crops,
shared by the ffcv and dali backends.

:func:`to_rgb` scales wide single-channel modes (``I;16*``, ``I`` on the 16-bit scale, ``F`` on
[0, 1]) where PIL's ``convert("RGB")`` would clip them, giving the values DALI's decoder gives.
The jitter is torchvision's ``ColorJitter`` without hue: :func:`color_jitter` (torch, any device)
is the reference, and a fused numba kernel does the same maths on CPU when numba is installed.

Design notes: docs/design.md
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from PIL import Image

__all__ = ["WIDE_MODES", "color_jitter", "draw_flip_jitter", "flip_jitter_normalize", "flip_jitter_normalize_views",
           "to_rgb"]

WIDE_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N", "F")  # single channel, more than 8 bits
_INT_FULL_SCALE = 65535.0


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL image -> mode RGB, 8 bits per channel (decodes it fully; see the module doc)."""
    if img.mode not in WIDE_MODES:
        return img.convert("RGB")
    arr = np.asarray(img).astype(np.float64)
    scale = 255.0 if img.mode == "F" else 255.0 / _INT_FULL_SCALE
    grey = np.clip(np.rint(np.nan_to_num(arr * scale, nan=0.0)), 0, 255).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(np.repeat(grey[..., None], 3, axis=2)))


def draw_flip_jitter(rng: np.random.Generator, hflip: float, jitter: float) -> tuple[bool, np.ndarray, np.ndarray]:
    """(flip, factors [3] float32, order [3] int64) for one sample, drawn in this order from ``rng``."""
    flip = bool(rng.random() < hflip)
    if jitter > 0:
        factors = rng.uniform(max(0.0, 1.0 - jitter), 1.0 + jitter, size=3).astype(np.float32)
        order = rng.permutation(3).astype(np.int64)
    else:
        factors, order = np.ones(3, np.float32), np.arange(3, dtype=np.int64)
    return flip, factors, order


def _gray(x: torch.Tensor) -> torch.Tensor:
    """[N, 3, H, W] -> [N, 1, H, W]: torchvision's grey weights (0.2989, 0.587, 0.114)."""
    return 0.2989 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]


def color_jitter(x: torch.Tensor, factors: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Per-sample brightness/contrast/saturation on [N, 3, H, W] in [0, 1].

    factors: [N, 3] (brightness, contrast, saturation); order: [N, 3] int, a permutation of
    (0, 1, 2) per sample giving the order in which the three ops are applied.
    """
    for step in range(3):
        for op in range(3):
            sel = (order[:, step] == op).nonzero().flatten()
            if sel.numel() == 0:
                continue
            xs = x.index_select(0, sel)
            f = factors.index_select(0, sel)[:, op].view(-1, 1, 1, 1).to(xs.dtype)
            if op == 0:
                xs = xs * f
            elif op == 1:
                xs = f * xs + (1 - f) * _gray(xs).mean(dim=(1, 2, 3), keepdim=True)
            else:
                xs = f * xs + (1 - f) * _gray(xs)
            x = x.index_copy(0, sel, xs.clamp_(0.0, 1.0))
    return x


def _kernel_py(img, flip, factors, order, means, inv_stds, outs):
    """uint8 [B, H, W, 3] -> float32 outs [V, B, 3, H, W]: per-sample horizontal flip, brightness /
    contrast / saturation (factors [B, 3]) in the per-sample ``order`` [B, 3] (torchvision tensor
    formulas, clamped to [0, 1] after each op) in a per-sample scratch buffer (cache-resident), then
    ``(x - means[v, c]) * inv_stds[v, c]`` into each of the V outputs. Serial per sample (numba,
    nogil): the result does not depend on the thread count."""
    n, h, w = img.shape[0], img.shape[1], img.shape[2]
    inv = np.float32(1.0 / 255.0)
    r_w, g_w, b_w = np.float32(0.2989), np.float32(0.587), np.float32(0.114)
    zero, one = np.float32(0.0), np.float32(1.0)
    t = np.empty((3, h, w), dtype=np.float32)
    for b in range(n):
        for y in range(h):
            for x in range(w):
                sx = w - 1 - x if flip[b] else x
                for c in range(3):
                    t[c, y, x] = np.float32(img[b, y, sx, c]) * inv
        for step in range(3):
            op = order[b, step]
            f = np.float32(factors[b, op])
            if f == one:
                continue
            if op == 0:
                for c in range(3):
                    for y in range(h):
                        for x in range(w):
                            t[c, y, x] = min(max(t[c, y, x] * f, zero), one)
            elif op == 1:
                acc = 0.0
                for y in range(h):
                    for x in range(w):
                        acc += r_w * t[0, y, x] + g_w * t[1, y, x] + b_w * t[2, y, x]
                m = np.float32((one - f) * np.float32(acc / (h * w)))
                for c in range(3):
                    for y in range(h):
                        for x in range(w):
                            t[c, y, x] = min(max(f * t[c, y, x] + m, zero), one)
            else:
                g1 = one - f
                for y in range(h):
                    for x in range(w):
                        gr = g1 * (r_w * t[0, y, x] + g_w * t[1, y, x] + b_w * t[2, y, x])
                        for c in range(3):
                            t[c, y, x] = min(max(f * t[c, y, x] + gr, zero), one)
        for v in range(outs.shape[0]):
            for c in range(3):
                mc, sc = means[v, c], inv_stds[v, c]
                for y in range(h):
                    for x in range(w):
                        outs[v, b, c, y, x] = (t[c, y, x] - mc) * sc
    return outs


_KERNEL = None


def _numba_kernel():
    """The jitted kernel, or None when numba is not installed."""
    global _KERNEL
    if _KERNEL is None:
        try:
            from numba import njit
        except ImportError:
            _KERNEL = False
        else:
            _KERNEL = njit(nogil=True, cache=True)(_kernel_py)
    return _KERNEL or None


Norm = tuple[Sequence[float], Sequence[float]]


def flip_jitter_normalize_views(img: np.ndarray | torch.Tensor, flip, factors, order, norms: Sequence[Norm],
                                *, device: torch.device | str | None = None) -> list[torch.Tensor]:
    """uint8 [B, H, W, 3] crops -> one float32 [B, 3, H, W] per ``(mean, std)`` in ``norms``: flip,
    jitter (see the module doc) once, then ``(x / 255 - mean) / std`` for each.

    ``flip`` [B] bool, ``factors`` [B, 3], ``order`` [B, 3] (a permutation per sample). A CPU
    array goes through the fused numba kernel (one pass, when numba is installed); a CUDA tensor
    (or CPU without numba) through :func:`color_jitter` on its device. The results are moved to
    ``device`` (default: where ``img`` is).
    """
    means = np.asarray([m for m, _ in norms], dtype=np.float32).reshape(-1, 3)
    stds = np.asarray([s for _, s in norms], dtype=np.float64).reshape(-1, 3)
    kernel = _numba_kernel()
    on_cpu = isinstance(img, np.ndarray) or img.device.type == "cpu"
    if on_cpu and kernel is not None:
        arr = np.ascontiguousarray(img.numpy() if isinstance(img, torch.Tensor) else img)
        outs = np.empty((len(means), arr.shape[0], 3, arr.shape[1], arr.shape[2]), dtype=np.float32)
        kernel(arr, np.asarray(flip, dtype=np.bool_), np.asarray(factors, dtype=np.float32),
               np.asarray(order, dtype=np.int64), means, (1.0 / stds).astype(np.float32), outs)
        xs = list(torch.from_numpy(outs).unbind(0))
    else:
        t = torch.as_tensor(img)
        dev = t.device
        x = t.permute(0, 3, 1, 2).float().div_(255.0)
        fl = torch.as_tensor(np.asarray(flip, dtype=bool), device=dev)
        if bool(fl.any()):
            x = torch.where(fl.view(-1, 1, 1, 1), x.flip(-1), x)
        x = color_jitter(x, torch.as_tensor(np.asarray(factors, dtype=np.float32), device=dev),
                         torch.as_tensor(np.asarray(order, dtype=np.int64), device=dev))
        xs = [(x - torch.from_numpy(m).to(dev).view(1, 3, 1, 1)) / torch.from_numpy(s).float().to(dev).view(1, 3, 1, 1)
              for m, s in zip(means, stds)]
    return xs if device is None else [x.to(device, non_blocking=True) for x in xs]


def flip_jitter_normalize(img: np.ndarray | torch.Tensor, flip, factors, order,
                          mean: Sequence[float] = (0.0, 0.0, 0.0), std: Sequence[float] = (1.0, 1.0, 1.0),
                          *, device: torch.device | str | None = None) -> torch.Tensor:
    """:func:`flip_jitter_normalize_views` with one ``(mean, std)``."""
    return flip_jitter_normalize_views(img, flip, factors, order, [(mean, std)], device=device)[0]
