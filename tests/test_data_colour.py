"""Flip + colour jitter + normalisation (peco_scale/data/colour.py) against torchvision's functional ops,
and decoding to 8-bit RGB (colour.to_rgb) of every image mode against numpy references."""

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


# ----------------------------------------------------------------------------- decoding: every PIL mode
# Each case: encoded bytes, the file extension, the mode PIL opens it in, and the expected 8-bit RGB
# as floats computed with numpy from the source arrays (16-bit: v * 255 / 65535; float: v * 255).
# Decoders may round or truncate differently: any backend must be within one level of it.

SIDE = 32


def png16(arr: np.ndarray) -> bytes:
    """uint16 [H, W] or [H, W, C] (C = 2 grey+alpha, 3 RGB, 4 RGBA) -> a 16-bit PNG, written with zlib."""
    import struct
    import zlib

    a = np.asarray(arr, dtype=np.uint16)
    a = a[..., None] if a.ndim == 2 else a
    h, w, c = a.shape
    raw = b"".join(b"\x00" + a[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 16, {1: 0, 2: 4, 3: 2, 4: 6}[c], 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def _grey3(x: np.ndarray) -> np.ndarray:
    return np.repeat(np.asarray(x, dtype=np.float64)[..., None], 3, axis=2)


def _pil_bytes(img, fmt: str) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def _tiff_bytes(arr: np.ndarray, **kw) -> bytes:
    import io

    import tifffile  # installed with scikit-image (a dependency)

    buf = io.BytesIO()
    tifffile.imwrite(buf, arr, **kw)
    return buf.getvalue()


def mode_cases() -> dict[str, tuple[bytes, str, str, np.ndarray]]:
    """name -> (encoded bytes, extension, mode PIL opens it in, expected RGB float [SIDE, SIDE, 3])."""
    from PIL import Image

    rng = np.random.default_rng(7)
    s = (SIDE, SIDE)

    def u16(*c: int) -> np.ndarray:
        return rng.integers(0, 65536, s + c, dtype=np.uint16)

    def u8(*c: int) -> np.ndarray:
        return rng.integers(0, 256, s + c, dtype=np.uint8)

    def wide(a: np.ndarray) -> np.ndarray:  # 16-bit -> 8-bit scale, in float64 (uint16 * 255 overflows)
        return np.asarray(a, dtype=np.float64) * 255 / 65535

    cases = {}
    g = u16()
    g[0, :4] = (0, 65535, 257, 128)  # extremes and exact levels
    cases["png16_grey"] = (png16(g), "png", "I;16", _grey3(wide(g)))
    la = u16(2)
    cases["png16_grey_alpha"] = (png16(la), "png", "RGBA", _grey3(wide(la[..., 0])))
    rgb = u16(3)
    cases["png16_rgb"] = (png16(rgb), "png", "RGB", wide(rgb))
    rgba = u16(4)
    cases["png16_rgba"] = (png16(rgba), "png", "RGBA", wide(rgba[..., :3]))
    t = u16()
    cases["tiff16_grey"] = (_tiff_bytes(t), "tif", "I;16", _grey3(wide(t)))
    tb = u16()
    cases["tiff16_grey_bigendian"] = (_tiff_bytes(tb, byteorder=">"), "tif", "I;16B", _grey3(wide(tb)))
    trgb = u16(3)
    cases["tiff16_rgb"] = (_tiff_bytes(trgb, photometric="rgb"), "tif", "RGB", wide(trgb))
    ti = rng.integers(0, 65536, s).astype(np.int32)
    cases["tiff_int32"] = (_tiff_bytes(ti), "tif", "I", _grey3(wide(ti)))
    tf = rng.random(s, dtype=np.float32)
    tf[0, :2] = (0.0, 1.0)
    cases["tiff_float32"] = (_tiff_bytes(tf), "tif", "F", _grey3(tf.astype(np.float64) * 255))
    # 8-bit modes (already right before 16-bit support; kept right)
    lum = u8()
    cases["png_L"] = (_pil_bytes(Image.fromarray(lum), "PNG"), "png", "L", _grey3(lum))
    lum2, alpha = u8(), u8()
    la8 = Image.merge("LA", [Image.fromarray(lum2), Image.fromarray(alpha)])
    cases["png_LA"] = (_pil_bytes(la8, "PNG"), "png", "LA", _grey3(lum2))
    cases["tiff_LA"] = (_pil_bytes(la8, "TIFF"), "tif", "LA", _grey3(lum2))
    idx = rng.integers(0, 16, s, dtype=np.uint8)
    pal = rng.integers(0, 256, (256, 3), dtype=np.uint8)
    p = Image.frombytes("P", s[::-1], idx.tobytes())
    p.putpalette(pal.reshape(-1).tolist())
    cases["png_P"] = (_pil_bytes(p, "PNG"), "png", "P", pal[idx].astype(np.float64))
    cases["bmp_P"] = (_pil_bytes(p, "BMP"), "bmp", "P", pal[idx].astype(np.float64))
    rgba8 = u8(4)
    cases["png_RGBA"] = (_pil_bytes(Image.fromarray(rgba8), "PNG"), "png", "RGBA", rgba8[..., :3].astype(np.float64))
    cmyk = u8(4)
    ref = (255 - cmyk[..., :3].astype(np.float64)) * (255 - cmyk[..., 3:].astype(np.float64)) / 255
    cases["tiff_CMYK"] = (_pil_bytes(Image.frombytes("CMYK", s[::-1], cmyk.tobytes()), "TIFF"), "tif", "CMYK", ref)
    bits = rng.random(s) < 0.5
    one = Image.fromarray(bits.astype(np.uint8) * 255).convert("1")
    cases["tiff_1bit"] = (_pil_bytes(one, "TIFF"), "tif", "1", _grey3(bits * 255.0))
    return cases


@pytest.mark.parametrize("name", sorted(mode_cases()))
def test_to_rgb_scales_every_mode_like_numpy(name):
    import io

    from PIL import Image

    from peco_scale.data.colour import to_rgb

    data, _, mode, ref = mode_cases()[name]
    with Image.open(io.BytesIO(data)) as img:
        assert img.mode == mode  # what PIL gives for this file
        got = to_rgb(img)
    assert got.mode == "RGB" and got.size == (SIDE, SIDE)
    diff = np.abs(np.asarray(got, dtype=np.float64) - ref)
    assert diff.max() <= 1.0, (name, float(diff.max()))


def test_tool_image_list_decodes_wide_modes_and_counts_unreadable(tmp_path):
    """The image list that tokenize and probe read: a 16-bit PNG arrives scaled (not white), a
    truncated file is dropped and counted by the collate."""
    from peco_scale.data.folder import ImageListDataset, collate_readable

    data, _, _, ref = mode_cases()["png16_grey"]
    good = tmp_path / "a.png"
    good.write_bytes(data)
    bad = tmp_path / "b.png"
    bad.write_bytes(data[: len(data) // 3])
    ds = ImageListDataset([(str(good), 4), (str(bad), 5)], lambda img: torch.from_numpy(np.asarray(img).copy()))
    x, y, idx, skipped = collate_readable([ds[0], ds[1]])
    assert skipped == 1 and y.tolist() == [4] and idx.tolist() == [0]
    assert np.abs(x[0].double().numpy() - ref).max() <= 1.0
    assert collate_readable([ds[1]])[0] is None and collate_readable([ds[1]])[3] == 1
