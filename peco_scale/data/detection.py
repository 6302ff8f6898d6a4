"""Detection and instance-segmentation data in the COCO format::

    root/images/<split>/<file_name>            (or root/<split>/<file_name>: COCO's train2017 layout)
    root/annotations/instances_<split>.json    boxes [x, y, w, h], polygons or RLE masks, iscrowd

Categories keep the JSON's order (sorted by id) and become labels 1..C (0 is torchvision's
background); the training and validation splits must list the same categories. Crowd regions
(``iscrowd``) are left out of training targets (torchvision's detectors have no ignore regions;
COCO's evaluation ignores them itself). Boxes are clipped to the image and polygons rasterised
inside it; an instance left with no width or height is dropped and counted. Training images
without any instance are left out (detectron2's default) and counted; an unreadable image is
skipped and counted during training.

Training samples follow ViTDet's large-scale jitter: rescale so the longer side is ``size x r``,
``r ~ U(0.1, 2.0)``, a random ``size x size`` crop of what is larger, horizontal flip, padding
to ``size x size`` with the mean colour (0 after normalisation), boxes recomputed from the moved
masks. Images stay in [0, 1]: the
detector normalises them. Evaluation images are rescaled so the longer side is ``size`` and
padded; predictions are mapped back to the original pixels. Each training sample is a pure
function of ``(index, sample_seed)`` (``ShardedSampler``), so resume is exact.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from ..signals import ignore_stop_signals
from .colour import to_rgb
from .folder import first_usable, iterate_loader
from .mim import IMAGENET_MEAN
from .sampling import ShardedSampler
from .spec import DataError, ShardedPosition

log = logging.getLogger("peco_scale")


@dataclass(frozen=True)
class DetAugment:
    size: int = 1024
    scale_range: tuple[float, float] = (0.1, 2.0)
    hflip: float = 0.5


@functools.lru_cache(maxsize=8)
def _load_coco(path: str, mtime: float):
    from pycocotools.coco import COCO

    try:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
            return COCO(path)
    except Exception as exc:  # noqa: BLE001 - any unreadable annotation file is the same user error
        raise DataError(f"COCO annotations '{path}' are unreadable ({type(exc).__name__}: {exc}); "
                        f"pass a COCO instances JSON".splitlines()[0]) from None


class CocoSplit:
    """One split of a COCO-format dataset: its image folder, its annotations (pycocotools' COCO,
    read once per process) and the category -> label map."""

    def __init__(self, root: str | os.PathLike[str], split: str) -> None:
        root = Path(root)
        self.ann_file = root / "annotations" / f"instances_{split}.json"
        candidates = (root / "images" / split, root / split)
        self.image_dir = next((p for p in candidates if p.is_dir()), candidates[0])
        for need in (self.ann_file, self.image_dir):
            if not need.exists():
                raise DataError(f"detection data: '{need}' does not exist; --data must hold "
                                f"annotations/instances_{split}.json and images/{split}/ (or {split}/)")
        self.coco = _load_coco(str(self.ann_file), self.ann_file.stat().st_mtime)
        cats = sorted(self.coco.dataset.get("categories", []), key=lambda c: c["id"])
        if not cats:
            raise DataError(f"COCO annotations '{self.ann_file}' list no categories")
        self.categories = [(int(c["id"]), str(c["name"])) for c in cats]
        self.label_of = {cid: i + 1 for i, (cid, _) in enumerate(self.categories)}
        self.image_ids = sorted(self.coco.getImgIds())
        if not self.image_ids:
            raise DataError(f"COCO annotations '{self.ann_file}' list no images")

    def image_path(self, image_id: int) -> Path:
        return self.image_dir / self.coco.imgs[image_id]["file_name"]

    def read_image(self, image_id: int) -> Image.Image:
        """The RGB image; one whose size differs from its JSON entry is an error (its masks would not fit)."""
        info = self.coco.imgs[image_id]
        with Image.open(self.image_path(image_id)) as im:
            img = to_rgb(im)
        if img.size != (info["width"], info["height"]):
            raise DataError(f"image {self.image_path(image_id)} is {img.size[0]}x{img.size[1]}, its annotation "
                            f"entry says {info['width']}x{info['height']}")
        return img

    def instances(self, image_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """(boxes float32 [N, 4] x1 y1 x2 y2 clipped to the image, labels int64 [N], masks uint8
        [N, H, W], dropped) of the image's non-crowd instances; ``dropped`` counts the instances
        with no width or height left (outside the image or empty)."""
        info = self.coco.imgs[image_id]
        h, w = int(info["height"]), int(info["width"])
        boxes, labels, masks, dropped = [], [], [], 0
        for ann in self.coco.imgToAnns.get(image_id, []):
            if ann.get("iscrowd", 0):
                continue
            x, y, bw, bh = (float(v) for v in ann["bbox"])
            box = [min(max(x, 0.0), w), min(max(y, 0.0), h), min(max(x + bw, 0.0), w), min(max(y + bh, 0.0), h)]
            if box[2] - box[0] < 1 or box[3] - box[1] < 1 or ann["category_id"] not in self.label_of:
                dropped += 1
                continue
            boxes.append(box)
            labels.append(self.label_of[ann["category_id"]])
            masks.append(self.coco.annToMask(ann) if ann.get("segmentation") else _box_mask(box, h, w))
        return (np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(labels, np.int64),
                np.asarray(masks, np.uint8).reshape(-1, h, w), dropped)

    def has_instances(self, image_id: int) -> bool:
        return any(not a.get("iscrowd", 0) for a in self.coco.imgToAnns.get(image_id, []))


def _box_mask(box: list[float], h: int, w: int) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    m[int(box[1]):int(np.ceil(box[3])), int(box[0]):int(np.ceil(box[2]))] = 1
    return m


def check_categories(train: CocoSplit, val: CocoSplit) -> None:
    if train.categories != val.categories:
        a, b = dict(train.categories), dict(val.categories)
        diff = sorted(set(a.items()) ^ set(b.items()))
        raise DataError(f"the categories of {train.ann_file.name} ({len(a)}) and {val.ann_file.name} ({len(b)}) "
                        f"differ (e.g. id {diff[0][0]} '{diff[0][1]}'); both splits need the same category list")


def _pad_value() -> torch.Tensor:
    return torch.tensor(IMAGENET_MEAN)[:, None, None]


def _to_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1) / 255.0


def mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Tight boxes ``[N, 4]`` (x1, y1, x2, y2) of non-empty masks ``[N, H, W]``."""
    if not len(masks):
        return torch.zeros(0, 4)
    cols, rows = masks.any(1), masks.any(2)
    idx_w, idx_h = torch.arange(masks.shape[2]), torch.arange(masks.shape[1])
    big = max(masks.shape[1:]) + 1
    x1 = torch.where(cols, idx_w, big).min(1).values
    x2 = torch.where(cols, idx_w, -1).max(1).values + 1
    y1 = torch.where(rows, idx_h, big).min(1).values
    y2 = torch.where(rows, idx_h, -1).max(1).values + 1
    return torch.stack([x1, y1, x2, y2], 1).float()


def train_sample(img: Image.Image, labels: np.ndarray, masks: np.ndarray, aug: DetAugment,
                 rng: np.random.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(image [3, size, size] in [0, 1], target {boxes, labels, masks}) after large-scale jitter.
    Boxes are recomputed from the moved masks (ViTDet's ``recompute_boxes``); instances cropped
    away are removed."""
    w, h = img.size
    s = aug.size * rng.uniform(*aug.scale_range) / max(w, h)
    nw, nh = max(1, int(w * s + 0.5)), max(1, int(h * s + 0.5))
    x = _to_tensor(img.resize((nw, nh), Image.Resampling.BILINEAR))
    m = torch.from_numpy(masks)
    if len(m):
        m = F.interpolate(m[:, None].float(), size=(nh, nw), mode="nearest")[:, 0].to(torch.uint8)
    top, left = int(rng.integers(max(nh - aug.size, 0) + 1)), int(rng.integers(max(nw - aug.size, 0) + 1))
    x, m = x[:, top:top + aug.size, left:left + aug.size], m[:, top:top + aug.size, left:left + aug.size]
    ch, cw = x.shape[1:]
    if rng.random() < aug.hflip:
        x, m = x.flip(-1), m.flip(-1)
    keep = m.flatten(1).amax(1) > 0 if len(m) else torch.zeros(0, dtype=torch.bool)
    m, lab = m[keep], torch.from_numpy(labels)[keep]
    image = _pad_value().expand(3, aug.size, aug.size).clone()
    image[:, :ch, :cw] = x
    full = torch.zeros(len(m), aug.size, aug.size, dtype=torch.uint8)
    full[:, :ch, :cw] = m
    return image, {"boxes": mask_boxes(full.bool()), "labels": lab, "masks": full}


class DetectionDataset(Dataset):
    """Training samples of one split (images with at least one non-crowd instance);
    ``dataset[(i, sample_seed)]`` -> ``{"image", "target", "index", "skipped"}``."""

    def __init__(self, root, split: str, aug: DetAugment) -> None:
        self.split, self.aug = CocoSplit(root, split), aug
        self.ids = [i for i in self.split.image_ids if self.split.has_instances(i)]
        self.empty = len(self.split.image_ids) - len(self.ids)
        if not self.ids:
            raise DataError(f"none of the {len(self.split.image_ids)} images of {self.split.ann_file} has a "
                            f"non-crowd instance; nothing to train on")
        if self.empty:
            log.info("detection data: %d of %d training images have no instance and are left out",
                     self.empty, len(self.split.image_ids))
        self._bad: set[int] = set()

    def __len__(self) -> int:
        return len(self.ids)

    def load(self, j: int):
        image_id = self.ids[j]
        _, labels, masks, _ = self.split.instances(image_id)
        if not len(labels):
            raise DataError(f"image {self.split.image_path(image_id)} has no instance with a width and height")
        return self.split.read_image(image_id), labels, masks

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        index, seed = int(key[0]), int(key[1])
        j, (img, labels, masks) = first_usable(
            index, len(self.ids), self._bad, self.load, lambda j: f"detection sample {self.split.image_path(self.ids[j])}",
            f"none of the {len(self.ids)} detection samples could be read; check the images and annotations")
        image, target = train_sample(img, labels, masks, self.aug, np.random.default_rng(seed))
        return {"image": image, "target": target, "index": index, "skipped": int(j != index)}


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {"image": torch.stack([it["image"] for it in items]), "target": [it["target"] for it in items],
            "index": torch.tensor([it["index"] for it in items]),
            "skipped": torch.tensor([it["skipped"] for it in items])}


class DetectionLoader(ShardedPosition):
    """This rank's training batches ``{"image" [B, 3, S, S], "target" [B dicts], "index", "skipped"}``."""

    def __init__(self, root, split: str, aug: DetAugment, *, batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, workers: int = 0, device: str = "cpu") -> None:
        self.device = torch.device(device)
        self.dataset = DetectionDataset(root, split, aug)
        self.sampler = ShardedSampler(len(self.dataset), rank=rank, world_size=world_size, batch_size=batch_size,
                                      seed=seed)
        self._loader = DataLoader(self.dataset, batch_size=batch_size, sampler=self.sampler, num_workers=workers,
                                  drop_last=True, collate_fn=collate, worker_init_fn=ignore_stop_signals,
                                  multiprocessing_context="fork" if workers else None,
                                  generator=torch.Generator().manual_seed(seed))

    def __iter__(self):
        for batch in iterate_loader(self._loader):
            targets = [{k: v.to(self.device) for k, v in t.items()} for t in batch["target"]]
            yield {"image": batch["image"].to(self.device), "target": targets, "index": batch["index"],
                   "skipped": int(batch["skipped"].sum())}


def eval_image(img: Image.Image, size: int) -> tuple[torch.Tensor, float]:
    """(image [3, size, size] in [0, 1]: longer side rescaled to ``size``, padded; the scale)."""
    w, h = img.size
    s = size / max(w, h)
    nw, nh = max(1, int(w * s + 0.5)), max(1, int(h * s + 0.5))
    x = _to_tensor(img.resize((nw, nh), Image.Resampling.BILINEAR))
    image = _pad_value().expand(3, size, size).clone()
    image[:, :nh, :nw] = x
    return image, s


def eval_samples(split: CocoSplit, size: int, *, rank: int = 0, world_size: int = 1):
    """This rank's share (every ``world_size``-th image) of the split: yields ``(image_id, image
    [3, size, size], scale)``; an unreadable image is skipped with a warning."""
    for i in range(rank, len(split.image_ids), world_size):
        image_id = split.image_ids[i]
        try:
            img = split.read_image(image_id)
        except Exception as exc:  # noqa: BLE001 - an unusable image is skipped, as in training
            log.warning("skipping evaluation image %s (%s: %s)", split.image_path(image_id), type(exc).__name__, exc)
            continue
        image, scale = eval_image(img, size)
        yield image_id, image, scale


def to_coco_results(split: CocoSplit, image_id: int, out: dict[str, torch.Tensor], scale: float,
                    mask_threshold: float = 0.5) -> list[dict[str, Any]]:
    """One image's detections (torchvision's output at the padded eval size) as COCO results in
    the original pixels: bbox ``[x, y, w, h]`` and the mask as compressed RLE."""
    from pycocotools import mask as mask_util

    info = split.coco.imgs[image_id]
    h, w = int(info["height"]), int(info["width"])
    boxes = out["boxes"].float().cpu() / scale
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
    category = {label: cid for cid, label in split.label_of.items()}
    results = []
    masks = out.get("masks")
    if masks is not None and len(masks):
        nh, nw = max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5))
        masks = F.interpolate(masks[:, :, :nh, :nw].float().cpu(), size=(h, w), mode="bilinear", align_corners=False)
        binary = np.asfortranarray((masks[:, 0] > mask_threshold).numpy().transpose(1, 2, 0).astype(np.uint8))
        rles = mask_util.encode(binary)
    else:
        rles = [None] * len(boxes)
    for box, label, score, rle in zip(boxes.tolist(), out["labels"].tolist(), out["scores"].tolist(), rles):
        res = {"image_id": image_id, "category_id": category[int(label)], "score": float(score),
               "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]]}
        if rle is not None:
            res["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
        results.append(res)
    return results
