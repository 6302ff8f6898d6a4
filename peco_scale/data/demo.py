"""Offline, deterministic demo dataset: a small ImageFolder tree for smoke tests and demos.

``make_demo_dataset(root)`` writes ``root/train/<class>/<class>_<i>.jpg`` for ten classes with
real visual structure (procedural shapes and textures, plus random crops of the real photographs
that scikit-learn and scikit-image ship), then ``root/manifest.json`` last. Nothing touches the
network. Every image is drawn from its own RNG seeded by ``(seed, class, i)``, so the same seed
gives byte-identical files whatever the generation order (and classes can be added later
without changing the others).

All renderers work on float32 arrays of shape (H, W, 3) in [0, 1] and are fully vectorised:
shapes use an anti-aliased coverage ``clip(0.5 - signed_distance, 0, 1)`` instead of
per-pixel loops or supersampling.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .spec import DataError

MANIFEST = "manifest.json"
GENERATOR_VERSION = 1  # bump when the pixels a seed produces change, so old trees are rebuilt
JPEG_QUALITY = 90

Array = np.ndarray
Rng = np.random.Generator


# ----------------------------------------------------------------------------- helpers


def _grid(h: int, w: int) -> tuple[Array, Array]:
    """Pixel-centre coordinates as broadcastable (H, 1) and (1, W) float32 arrays."""
    y = np.arange(h, dtype=np.float32)[:, None] + 0.5
    x = np.arange(w, dtype=np.float32)[None, :] + 0.5
    return y, x


def _colour(rng: Rng) -> Array:
    """A random RGB colour, shape (3,), in [0, 1]."""
    return rng.random(3).astype(np.float32)


def _contrasting(rng: Rng, ref: Array, min_dist: float = 0.6) -> Array:
    """A random colour at least ``min_dist`` (L1 over RGB) from ``ref`` so shapes stay visible."""
    best, best_d = _colour(rng), -1.0
    for _ in range(32):  # rejection sampling over colours, not pixels: cheap
        c = _colour(rng)
        d = float(np.abs(c - ref).sum())
        if d >= min_dist:
            return c
        if d > best_d:
            best, best_d = c, d
    return best


def _paint(img: Array, alpha: Array, colour: Array) -> Array:
    """Alpha-composite a flat colour: img (H, W, 3), alpha (H, W) in [0, 1], colour (3,)."""
    a = alpha[..., None]
    return img * (1.0 - a) + colour * a


def _ramp(t: Array, stops: Array) -> Array:
    """Map t (H, W) in [0, 1] through colour stops (K, 3) evenly spaced -> (H, W, 3)."""
    xp = np.linspace(0.0, 1.0, len(stops))
    flat = t.ravel()
    out = np.stack([np.interp(flat, xp, stops[:, c]) for c in range(3)], axis=-1)
    return out.reshape(*t.shape, 3).astype(np.float32)


def _value_noise(rng: Rng, h: int, w: int, base: int, octaves: int, persistence: float) -> Array:
    """Multi-scale value noise (H, W) in [0, 1]: random lattices upsampled bicubically in C."""
    total = np.zeros((h, w), dtype=np.float32)
    amp = 1.0
    for o in range(octaves):
        g = base * 2**o + 1
        lattice = rng.random((g, g), dtype=np.float32)
        up = np.asarray(Image.fromarray(lattice, mode="F").resize((w, h), Image.Resampling.BICUBIC))
        total += amp * up
        amp *= persistence
    lo, hi = float(total.min()), float(total.max())
    return (total - lo) / max(hi - lo, 1e-6)


def _background(rng: Rng, h: int, w: int) -> Array:
    """A varied but low-contrast backdrop (H, W, 3): flat, soft gradient or faint clouds."""
    kind = rng.integers(3)
    c0 = _colour(rng)
    if kind == 0:
        return np.broadcast_to(c0, (h, w, 3)).astype(np.float32)
    c1 = np.clip(c0 + rng.uniform(-0.25, 0.25, 3).astype(np.float32), 0, 1)
    if kind == 1:
        y, x = _grid(h, w)
        th = rng.uniform(0, 2 * np.pi)
        u = x * np.cos(th) + y * np.sin(th)
        t = (u - u.min()) / max(float(u.max() - u.min()), 1e-6)
        return _ramp(np.broadcast_to(t, (h, w)), np.stack([c0, c1]))
    t = _value_noise(rng, h, w, base=int(rng.integers(2, 5)), octaves=3, persistence=0.5)
    return _ramp(t, np.stack([c0, c1]))


def _edge_alpha(t: Array, period: float, threshold: float = 0.0) -> Array:
    """Anti-aliased square wave from a sinusoid ``t`` with spatial ``period`` (pixels).

    Near a crossing, sin changes by ~2*pi/period per pixel; rescaling by period/(2*pi) gives a
    one-pixel ramp, i.e. edges that look drawn rather than aliased.
    """
    slope = period / (2 * np.pi) / np.sqrt(max(1.0 - threshold**2, 1e-3))
    return np.clip(0.5 + (t - threshold) * slope, 0.0, 1.0)


# ----------------------------------------------------------------------------- classes


@dataclass
class Shape:
    """One drawn shape: its kind, a bounding circle (centre ``cy, cx``, ``radius``), its polygon
    (``(K, 2)`` x, y vertices; None for a circle) and its anti-aliased coverage on a pixel grid."""

    kind: str
    cy: float
    cx: float
    radius: float
    polygon: Array | None
    coverage: Callable[[Array, Array], Array]


def _shapes(draw_shape: Callable[[Rng, int, int], Shape]):
    """A class of 1-3 shapes in contrasting colours on a background; ``draw_shape(rng, h, w)``
    draws one shape's parameters."""
    def draw(rng: Rng, h: int, w: int) -> Array:
        img = _background(rng, h, w)
        y, x = _grid(h, w)
        bg = img.mean(axis=(0, 1))
        for _ in range(int(rng.integers(1, 4))):
            img = _paint(img, draw_shape(rng, h, w).coverage(y, x), _contrasting(rng, bg))
        return img
    return draw


def _circle(rng: Rng, h: int, w: int) -> Shape:
    r = rng.uniform(0.1, 0.35) * min(h, w)
    cy, cx = rng.uniform(0.7 * r, h - 0.7 * r), rng.uniform(0.7 * r, w - 0.7 * r)
    return Shape("circle", cy, cx, r, None, lambda y, x: np.clip(r - np.sqrt((y - cy) ** 2 + (x - cx) ** 2) + 0.5, 0, 1))


def _square(rng: Rng, h: int, w: int) -> Shape:
    s = rng.uniform(0.1, 0.3) * min(h, w)  # half side
    cy, cx = rng.uniform(0.8 * s, h - 0.8 * s), rng.uniform(0.8 * s, w - 0.8 * s)
    th = rng.uniform(0, np.pi / 2)
    c, n = np.cos(th), np.sin(th)

    def coverage(y: Array, x: Array) -> Array:
        u = (x - cx) * c + (y - cy) * n
        v = -(x - cx) * n + (y - cy) * c
        d = np.maximum(np.abs(u), np.abs(v)) - s  # box distance (exact outside along axes)
        return np.clip(0.5 - d, 0, 1)

    corners = np.array([(-s, -s), (s, -s), (s, s), (-s, s)])
    polygon = np.stack([cx + corners[:, 0] * c - corners[:, 1] * n, cy + corners[:, 0] * n + corners[:, 1] * c], 1)
    return Shape("square", cy, cx, s * np.sqrt(2), polygon, coverage)


def _triangle(rng: Rng, h: int, w: int) -> Shape:
    rad = rng.uniform(0.15, 0.4) * min(h, w)
    cy, cx = rng.uniform(0.6 * rad, h - 0.6 * rad), rng.uniform(0.6 * rad, w - 0.6 * rad)
    ang = rng.uniform(0, 2 * np.pi) + np.array([0, 2, 4]) * np.pi / 3 + rng.uniform(-0.4, 0.4, 3)
    py, px = cy + rad * np.sin(ang), cx + rad * np.cos(ang)

    def coverage(y: Array, x: Array) -> Array:
        d = None
        for i in range(3):  # convex polygon: max of signed half-plane distances
            j = (i + 1) % 3
            ey, ex = py[j] - py[i], px[j] - px[i]
            norm = np.hypot(ey, ex) + 1e-6
            di = ((x - px[i]) * ey - (y - py[i]) * ex) / norm
            # orient each edge so the centroid is on the negative (inside) side
            if ((cx - px[i]) * ey - (cy - py[i]) * ex) > 0:
                di = -di
            d = di if d is None else np.maximum(d, di)
        return np.clip(0.5 - d, 0, 1)

    return Shape("triangle", cy, cx, rad, np.stack([px, py], 1), coverage)


SHAPES: dict[str, Callable[[Rng, int, int], Shape]] = {"circle": _circle, "square": _square, "triangle": _triangle}


def _stripes(rng: Rng, h: int, w: int) -> Array:
    y, x = _grid(h, w)
    period = rng.uniform(6, 40)
    th = rng.uniform(0, np.pi)
    u = x * np.cos(th) + y * np.sin(th) + rng.uniform(0, period)
    c0 = _colour(rng)
    alpha = _edge_alpha(np.sin(2 * np.pi * u / period), period, rng.uniform(-0.5, 0.5))
    img = np.broadcast_to(c0, (h, w, 3)).astype(np.float32)
    return _paint(img, alpha, _contrasting(rng, c0))


def _checkerboard(rng: Rng, h: int, w: int) -> Array:
    y, x = _grid(h, w)
    cell = rng.uniform(6, 48)
    th = rng.uniform(-0.3, 0.3) if rng.random() < 0.5 else 0.0
    u = x * np.cos(th) + y * np.sin(th) + rng.uniform(0, cell)
    v = -x * np.sin(th) + y * np.cos(th) + rng.uniform(0, cell)
    t = np.sin(np.pi * u / cell) * np.sin(np.pi * v / cell)
    c0 = _colour(rng)
    img = np.broadcast_to(c0, (h, w, 3)).astype(np.float32)
    return _paint(img, _edge_alpha(t, 2 * cell), _contrasting(rng, c0))


def _gradients(rng: Rng, h: int, w: int) -> Array:
    y, x = _grid(h, w)
    if rng.random() < 0.5:  # linear ramp in a random direction
        th = rng.uniform(0, 2 * np.pi)
        u = np.broadcast_to(x * np.cos(th) + y * np.sin(th), (h, w))
    else:  # radial ramp around a random (possibly off-image) centre
        cy, cx = rng.uniform(-0.25, 1.25) * h, rng.uniform(-0.25, 1.25) * w
        u = np.sqrt((y - cy) ** 2 + (x - cx) ** 2)
    t = (u - u.min()) / max(float(u.max() - u.min()), 1e-6)
    stops = np.stack([_colour(rng) for _ in range(int(rng.integers(2, 4)))])
    return _ramp(t, stops)


def _noise_texture(rng: Rng, h: int, w: int) -> Array:
    t = _value_noise(rng, h, w, base=int(rng.integers(2, 6)), octaves=int(rng.integers(3, 6)),
                     persistence=rng.uniform(0.45, 0.7))
    stops = np.stack([_colour(rng) for _ in range(int(rng.integers(2, 4)))])
    return _ramp(t, stops)


def _rings(rng: Rng, h: int, w: int) -> Array:
    y, x = _grid(h, w)
    cy, cx = rng.uniform(0.1, 0.9) * h, rng.uniform(0.1, 0.9) * w
    period = rng.uniform(6, 40)
    r = np.sqrt((y - cy) ** 2 + (x - cx) ** 2)
    c0 = _colour(rng)
    alpha = _edge_alpha(np.sin(2 * np.pi * r / period + rng.uniform(0, 2 * np.pi)), period,
                        rng.uniform(-0.4, 0.4))
    img = np.broadcast_to(c0, (h, w, 3)).astype(np.float32)
    return _paint(img, alpha, _contrasting(rng, c0))


def _dots(rng: Rng, h: int, w: int) -> Array:
    y, x = _grid(h, w)
    s = rng.uniform(12, 48)  # grid spacing
    rad = rng.uniform(0.15, 0.4) * s
    gy = (y + rng.uniform(0, s)) / s
    gx = (x + rng.uniform(0, s)) / s
    if rng.random() < 0.5:  # hexagonal packing: shift every other row by half a cell
        gx = gx + 0.5 * (np.floor(gy) % 2)
    ly = (gy - np.floor(gy) - 0.5) * s
    lx = (gx - np.floor(gx) - 0.5) * s
    dist = np.sqrt(ly**2 + lx**2)
    img = _background(rng, h, w)
    return _paint(img, np.clip(rad - dist + 0.5, 0, 1), _contrasting(rng, img.mean(axis=(0, 1))))


# Real photographs shipped inside installed packages (no download). Names are stable ids.
_SKIMAGE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field",
                   "immunohistochemistry", "coins", "camera", "page", "retina", "moon", "grass",
                   "gravel", "brick", "clock", "text", "cell", "stereo_motorcycle")


@lru_cache(maxsize=1)
def _photo_sources() -> tuple[tuple[str, Image.Image], ...]:
    """(name, RGB PIL image) for every bundled photo that loads offline; missing ones skipped."""
    out: list[tuple[str, Image.Image]] = []
    try:
        from sklearn.datasets import load_sample_images

        bunch = load_sample_images()
        for fname, arr in zip(bunch.filenames, bunch.images):
            out.append((f"sklearn:{Path(fname).stem}", Image.fromarray(np.asarray(arr, np.uint8))))
    except Exception:  # noqa: BLE001 - any failure just means fewer sources
        pass
    try:
        import skimage.data as skdata
    except Exception:  # noqa: BLE001
        skdata = None
    for name in _SKIMAGE_PHOTOS if skdata is not None else ():
        try:
            arr = getattr(skdata, name)()
            if isinstance(arr, tuple):  # stereo pairs: keep the left view
                arr = arr[0]
            arr = np.asarray(arr)
            if arr.dtype != np.uint8:
                arr = (np.clip(arr.astype(np.float64), 0, 1) * 255).round().astype(np.uint8)
            if arr.ndim == 2:
                arr = np.repeat(arr[..., None], 3, axis=-1)
            out.append((f"skimage:{name}", Image.fromarray(arr[..., :3]).convert("RGB")))
        except Exception:  # noqa: BLE001 - e.g. files needing pooch (network) are skipped
            continue
    return tuple(out)


def _photos(rng: Rng, h: int, w: int) -> Array:
    """A random crop (area 5-100 %, output aspect) of a bundled photo, resized to (h, w)."""
    sources = _photo_sources()
    if not sources:
        raise DataError("no bundled photographs could be loaded (scikit-learn / scikit-image); "
                        "reinstall scikit-learn to get sklearn.datasets.load_sample_images")
    _, src = sources[int(rng.integers(len(sources)))]
    sw, sh = src.size
    aspect = w / h
    area = rng.uniform(0.05, 1.0) * sw * sh
    ch = int(min(sh, round(np.sqrt(area / aspect))))
    cw = int(min(sw, round(ch * aspect)))
    ch = max(8, min(ch, sh))
    cw = max(8, min(cw, sw))
    top, left = int(rng.integers(sh - ch + 1)), int(rng.integers(sw - cw + 1))
    crop = src.crop((left, top, left + cw, top + ch)).resize((w, h), Image.Resampling.BICUBIC)
    if rng.random() < 0.5:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(crop, dtype=np.float32) / 255.0


RENDERERS: dict[str, Callable[[Rng, int, int], Array]] = {
    "circles": _shapes(_circle),
    "squares": _shapes(_square),
    "triangles": _shapes(_triangle),
    "stripes": _stripes,
    "checkerboard": _checkerboard,
    "gradients": _gradients,
    "noise_texture": _noise_texture,
    "rings": _rings,
    "dots": _dots,
    "photos": _photos,
}
DEMO_CLASSES: tuple[str, ...] = tuple(sorted(RENDERERS))


# ----------------------------------------------------------------------------- generation


def _image_rng(seed: int, cls: str, i: int) -> Rng:
    """Independent stream per image: keyed by class *name* (crc32) so order never matters."""
    return np.random.default_rng([seed % 2**64, zlib.crc32(cls.encode()), i])


def render_demo_image(cls: str, i: int, *, seed: int = 0, min_size: int = 64,
                      max_size: int = 256) -> Array:
    """Image ``i`` of class ``cls`` as uint8 (H, W, 3), H and W each in [min_size, max_size]."""
    rng = _image_rng(seed, cls, i)
    h, w = (int(v) for v in rng.integers(min_size, max_size + 1, size=2))
    img = RENDERERS[cls](rng, h, w)
    return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _encode_jpeg(arr: Array) -> bytes:
    buf = io.BytesIO()
    # 4:4:4 chroma keeps the sharp coloured edges of the synthetic classes crisp
    Image.fromarray(arr).save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling=0)
    return buf.getvalue()


def _params(seed: int, images_per_class: int, min_size: int, max_size: int) -> dict[str, Any]:
    return {"generator": "peco_scale.data.demo", "version": GENERATOR_VERSION, "seed": seed,
            "images_per_class": images_per_class, "min_size": min_size, "max_size": max_size,
            "classes": list(DEMO_CLASSES)}


def _read_manifest(root: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _is_current(root: Path, manifest: dict[str, Any] | None, params: dict[str, Any]) -> bool:
    """Manifest written by these parameters and every listed file still present (stat only)."""
    if manifest is None or manifest.get("params") != params:
        return False
    files = manifest.get("files", [])
    return bool(files) and all((root / f["path"]).is_file() for f in files)


def demo_is_current(root: str | os.PathLike[str], *, images_per_class: int = 300, seed: int = 0,
                    min_size: int = 64, max_size: int = 256) -> bool:
    """True when ``make_demo_dataset`` with these arguments would return without generating."""
    root = Path(root)
    params = _params(seed, images_per_class, min_size, max_size)
    return _is_current(root, _read_manifest(root), params)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _remove_stale(root: Path) -> None:
    """Delete scratch dirs left by crashed runs (their pid is gone); never touch live ones."""
    for p in list(root.glob(".tmp-*")) + list(root.glob(".old-*")):
        try:
            pid = int(p.name.split("-", 1)[1])
        except ValueError:
            continue
        if pid != os.getpid() and not _pid_alive(pid):
            shutil.rmtree(p, ignore_errors=True)


def _check_args(images_per_class: int, min_size: int, max_size: int) -> None:
    if images_per_class < 1:
        raise DataError(f"images_per_class={images_per_class} must be >= 1; "
                        "pass --images_per_class 300 (or any positive count)")
    if not 8 <= min_size <= max_size:
        raise DataError(f"image size range [{min_size}, {max_size}] is invalid; "
                        "use 8 <= min_size <= max_size (e.g. --min_size 64 --max_size 256)")


def make_demo_dataset(root: str | os.PathLike[str], *, images_per_class: int = 300, seed: int = 0,
                      min_size: int = 64, max_size: int = 256,
                      overwrite: bool = False) -> dict[str, Any]:
    """Write the demo ImageFolder tree ``root/train/<class>/*.jpg`` and return its manifest.

    Idempotent: if ``root/manifest.json`` was written with the same parameters and its files
    exist, it is returned without touching anything (unless ``overwrite``). Otherwise images
    are generated into ``root/.tmp-<pid>`` and swapped in by rename, and the manifest is
    written last, so a crash never leaves a manifest describing a half-written tree.

    Manifest keys: params, seed, images_per_class, classes, counts, total_images,
    total_bytes, photo_sources, files (list of {path, sha256, bytes, width, height}).
    """
    _check_args(images_per_class, min_size, max_size)
    root = Path(root)
    params = _params(seed, images_per_class, min_size, max_size)
    existing = _read_manifest(root)
    if not overwrite and _is_current(root, existing, params):
        return existing  # type: ignore[return-value]
    train = root / "train"
    if train.exists() and existing is None and not overwrite:
        # no manifest => not (completely) ours: refuse rather than delete someone's data
        raise DataError(f"'{train}' exists but '{root / MANIFEST}' does not, so it is not a demo "
                        f"dataset; choose another --out or pass --overwrite to replace it")
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale(root)

    tmp = root / f".tmp-{os.getpid()}"
    old = root / f".old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        files, counts = _generate(tmp, seed, images_per_class, min_size, max_size)
        manifest = {
            "params": params, "seed": seed, "images_per_class": images_per_class,
            "classes": list(DEMO_CLASSES), "counts": counts, "total_images": len(files),
            "total_bytes": sum(f["bytes"] for f in files),
            "photo_sources": [name for name, _ in _photo_sources()], "files": files,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        # invalidate the old manifest first: a crash mid-swap then forces a rebuild
        (root / MANIFEST).unlink(missing_ok=True)
        if train.exists():
            train.rename(old)
        (tmp / "train").rename(train)
        os.replace(tmp / MANIFEST, root / MANIFEST)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return manifest


def _generate(out: Path, seed: int, n: int, min_size: int,
              max_size: int) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Render and write every image under ``out/train``; returns (file records, counts)."""
    files: list[dict[str, Any]] = []
    counts: dict[str, int] = {}
    for cls in DEMO_CLASSES:
        cdir = out / "train" / cls
        cdir.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            arr = render_demo_image(cls, i, seed=seed, min_size=min_size, max_size=max_size)
            data = _encode_jpeg(arr)
            name = f"{cls}_{i:05d}.jpg"
            (cdir / name).write_bytes(data)
            files.append({"path": f"train/{cls}/{name}", "sha256": hashlib.sha256(data).hexdigest(),
                          "bytes": len(data), "width": int(arr.shape[1]),
                          "height": int(arr.shape[0])})
        counts[cls] = n
    return files, counts
