"""Offline demo data of the dense transfer tasks: scenes of circles, squares and triangles with
their exact segmentation maps (ADE20K layout) and instances (COCO JSON).

``make_dense_demo(root)`` writes, from one RNG per scene seeded by ``(seed, split, i)``::

    root/images/{training,validation}/scene_<i>.jpg
    root/annotations/{training,validation}/scene_<i>.png   uint8 ids: 0 unlabelled (the shapes'
        anti-aliased rims), 1 background, 2 circle, 3 square, 4 triangle (ADE20K's convention:
        with reduce-zero-label, 0 is ignored and the 4 classes become 0..3)
    root/annotations/instances_{training,validation}.json  COCO: one instance per shape, its box and
        mask from the pixels the shape covers at least half; squares and triangles inside the
        image as polygons (their exact vertices), the rest as uncompressed RLE
    root/unlabelled/scenes/scene_<i>.jpg  with ``unlabelled_images`` > 0: more scenes of the same
        distribution (their own RNG stream, so none repeats a training scene) and no annotations, as
        an ImageFolder tree (one class, "scenes") for stage 2 (``--data.path root/unlabelled``)
    root/manifest.json  written last

Shapes are drawn by the same code as the classification demo's shape classes and never overlap,
so every mask and box is exact.

``style="cluttered"`` draws harder scenes of the same classes: a textured two-colour background,
1-3 unlabelled irregular blobs as large as the shapes and 2-4 unlabelled strokes (thick line
segments), both part of the background class, and every blob, stroke and shape filled from one
distribution (a flat colour or two-colour stripes). Colour, texture and size then no longer tell a
shape from the background; its outline does. Shapes are drawn after the blobs and strokes and
cover them, so masks and boxes stay exact.
"""

from __future__ import annotations

import json
import os
import shutil
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .demo import (SHAPES, _background, _colour, _contrasting, _edge_alpha, _encode_jpeg, _grid, _paint, _ramp,
                   _remove_stale, _value_noise)
from .spec import DataError

SEG_CLASSES = ("background", "circle", "square", "triangle")  # ids 1..4 in the PNGs (0: unlabelled)
CATEGORIES = [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(SHAPES)]
DENSE_VERSION = 1
STYLES = ("plain", "cluttered")


def _scene_rng(seed: int, split: str, i: int) -> np.random.Generator:
    return np.random.default_rng([seed % 2**64, zlib.crc32(f"dense/{split}".encode()), i])


def rle_encode(mask: np.ndarray) -> dict[str, Any]:
    """COCO's uncompressed RLE of a binary ``(H, W)`` mask: run lengths over the column-major
    (Fortran-order) pixels, starting with a run of zeros."""
    flat = np.asarray(mask, dtype=bool).flatten(order="F")
    change = np.flatnonzero(np.diff(flat.astype(np.int8))) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts = [0, *counts]
    return {"counts": counts, "size": [int(mask.shape[0]), int(mask.shape[1])]}


def _cluttered_background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Two-colour value noise at a scale near the shapes'."""
    c0 = _colour(rng)
    t = _value_noise(rng, h, w, base=int(rng.integers(3, 9)), octaves=2, persistence=0.5)
    return _ramp(t, np.stack([c0, _contrasting(rng, c0, 0.4)]))


def _fill(rng: np.random.Generator, h: int, w: int, bg: np.ndarray) -> np.ndarray:
    """The colour (3,) or colour field (H, W, 3) of one blob, stroke or shape: flat, or stripes of two
    colours at a random period (4-10 px) and angle."""
    ca = _contrasting(rng, bg)
    if rng.random() < 0.5:
        return ca
    y, x = _grid(h, w)
    th, period = rng.uniform(0, np.pi), rng.uniform(4, 10)
    t = _edge_alpha(np.sin(2 * np.pi * (x * np.cos(th) + y * np.sin(th)) / period), period)
    return _ramp(np.broadcast_to(t, (h, w)), np.stack([ca, _contrasting(rng, ca, 0.4)]))


def _stroke(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Anti-aliased coverage (H, W) of a thick line segment (a capsule) across part of the scene."""
    y, x = _grid(h, w)
    y0, x0 = rng.uniform(0, h), rng.uniform(0, w)
    th, length, half = rng.uniform(0, 2 * np.pi), rng.uniform(0.3, 0.8) * min(h, w), rng.uniform(1.5, 4.0)
    dy, dx = np.sin(th), np.cos(th)
    along = np.clip((y - y0) * dy + (x - x0) * dx, 0, length)
    dist = np.hypot(y - (y0 + along * dy), x - (x0 + along * dx))
    return np.clip(half - dist + 0.5, 0, 1)


def _blob(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Anti-aliased coverage (H, W) of an irregular blob as large as a shape: a radius that varies
    with the angle by a few random low harmonics (2-4 lobes), so its outline is none of the classes'."""
    y, x = _grid(h, w)
    r = rng.uniform(0.1, 0.3) * min(h, w)
    cy, cx = rng.uniform(0, h), rng.uniform(0, w)
    ang = np.arctan2(y - cy, x - cx)
    k = np.arange(2, 5)[:, None, None]
    amp, phase = rng.uniform(0.1, 0.25, 3)[:, None, None], rng.uniform(0, 2 * np.pi, 3)[:, None, None]
    radius = r * (1 + (amp * np.sin(k * ang + phase)).sum(0))
    return np.clip(radius - np.hypot(y - cy, x - cx) + 0.5, 0, 1)


def render_scene(seed: int, split: str, i: int, min_size: int, max_size: int, style: str = "plain"):
    """(image uint8 (H, W, 3), label map uint8 (H, W), instances) of scene ``i``; an instance is
    ``{"kind", "mask" (H, W) bool, "polygon" ((K, 2) x, y) or None}``."""
    rng = _scene_rng(seed, split, i)
    h, w = (int(v) for v in rng.integers(min_size, max_size + 1, size=2))
    cluttered = style == "cluttered"
    img = _cluttered_background(rng, h, w) if cluttered else _background(rng, h, w)
    y, x = _grid(h, w)
    bg = img.mean(axis=(0, 1))
    label = np.ones((h, w), np.uint8)
    if cluttered:
        for draw in [_blob] * int(rng.integers(1, 4)) + [_stroke] * int(rng.integers(2, 5)):
            img = _paint(img, draw(rng, h, w), _fill(rng, h, w, bg))
    kinds = list(SHAPES)
    placed, instances = [], []
    for _ in range(int(rng.integers(1, 5))):
        for _attempt in range(20):  # shapes never overlap (their bounding circles, 2 px apart)
            shape = SHAPES[kinds[int(rng.integers(len(kinds)))]](rng, h, w)
            if all(np.hypot(shape.cy - p.cy, shape.cx - p.cx) > shape.radius + p.radius + 2 for p in placed):
                break
        else:
            continue
        cov = shape.coverage(y, x)
        mask = cov >= 0.5
        if not mask.any():
            continue
        placed.append(shape)
        img = _paint(img, cov, _fill(rng, h, w, bg) if cluttered else _contrasting(rng, bg))
        label[mask] = 2 + kinds.index(shape.kind)
        label[(cov > 0.02) & (cov < 0.98)] = 0  # the anti-aliased rim: unlabelled
        instances.append({"kind": shape.kind, "mask": mask, "polygon": shape.polygon})
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8), label, instances


def _coco_annotation(inst: dict[str, Any], ann_id: int, image_id: int) -> dict[str, Any]:
    mask = inst["mask"]
    ys, xs = np.nonzero(mask)
    x0, y0 = int(xs.min()), int(ys.min())
    poly = inst["polygon"]
    h, w = mask.shape
    if poly is not None and poly[:, 0].min() >= 0 and poly[:, 1].min() >= 0 and poly[:, 0].max() <= w \
            and poly[:, 1].max() <= h:
        segmentation: Any = [[round(float(v), 2) for v in poly.reshape(-1)]]
    else:
        segmentation = rle_encode(mask)
    return {"id": ann_id, "image_id": image_id, "category_id": 1 + list(SHAPES).index(inst["kind"]),
            "bbox": [x0, y0, int(xs.max()) + 1 - x0, int(ys.max()) + 1 - y0], "area": int(mask.sum()),
            "iscrowd": 0, "segmentation": segmentation}


def _params(seed: int, train_images: int, val_images: int, min_size: int, max_size: int,
            unlabelled_images: int, style: str) -> dict[str, Any]:
    params = {"generator": "peco_scale.data.dense_demo", "version": DENSE_VERSION, "seed": seed,
              "train_images": train_images, "val_images": val_images, "min_size": min_size, "max_size": max_size,
              "unlabelled_images": unlabelled_images}
    return params if style == "plain" else {**params, "style": style}


def make_dense_demo(root: str | os.PathLike[str], *, train_images: int = 200, val_images: int = 50, seed: int = 0,
                    min_size: int = 96, max_size: int = 192, unlabelled_images: int = 0,
                    style: str = "plain") -> dict[str, Any]:
    """Write (or reuse, when ``root/manifest.json`` has the same parameters) the dense demo tree;
    built in ``root/.tmp-<pid>`` and moved into place, the manifest last."""
    if train_images < 1 or val_images < 1:
        raise DataError(f"train_images={train_images}, val_images={val_images}: both must be >= 1")
    if unlabelled_images < 0:
        raise DataError(f"unlabelled_images={unlabelled_images}: must be >= 0")
    if style not in STYLES:
        raise DataError(f"style={style!r} is not a dense demo style; use one of {', '.join(STYLES)}")
    if not 32 <= min_size <= max_size:
        raise DataError(f"scene size range [{min_size}, {max_size}] is invalid; use 32 <= min_size <= max_size")
    root = Path(root)
    params = _params(seed, train_images, val_images, min_size, max_size, unlabelled_images, style)
    try:
        manifest = json.loads((root / "manifest.json").read_text())
        if manifest.get("params") == params:
            return manifest
    except (OSError, ValueError):
        pass
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale(root)
    tmp = root / f".tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    counts = {}
    try:
        for split, n in (("training", train_images), ("validation", val_images)):
            (tmp / "images" / split).mkdir(parents=True)
            (tmp / "annotations" / split).mkdir(parents=True)
            images, annotations = [], []
            for i in range(n):
                img, label, instances = render_scene(seed, split, i, min_size, max_size, style)
                name = f"scene_{i:05d}"
                (tmp / "images" / split / f"{name}.jpg").write_bytes(_encode_jpeg(img))
                Image.fromarray(label).save(tmp / "annotations" / split / f"{name}.png")
                images.append({"id": i + 1, "file_name": f"{name}.jpg", "height": img.shape[0], "width": img.shape[1]})
                for inst in instances:
                    annotations.append(_coco_annotation(inst, len(annotations) + 1, i + 1))
            coco = {"images": images, "annotations": annotations, "categories": CATEGORIES}
            (tmp / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco))
            counts[split] = {"images": n, "instances": len(annotations)}
        if unlabelled_images:
            (tmp / "unlabelled" / "scenes").mkdir(parents=True)
            for i in range(unlabelled_images):
                img = render_scene(seed, "unlabelled", i, min_size, max_size, style)[0]
                (tmp / "unlabelled" / "scenes" / f"scene_{i:05d}.jpg").write_bytes(_encode_jpeg(img))
            counts["unlabelled"] = {"images": unlabelled_images}
        manifest = {"params": params, "counts": counts, "seg_classes": list(SEG_CLASSES),
                    "categories": [c["name"] for c in CATEGORIES]}
        (root / "manifest.json").unlink(missing_ok=True)
        for sub in ("images", "annotations", "unlabelled"):
            shutil.rmtree(root / sub, ignore_errors=True)
            if (tmp / sub).exists():
                (tmp / sub).rename(root / sub)
        (root / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest
