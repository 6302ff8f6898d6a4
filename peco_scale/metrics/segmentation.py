"""Semantic segmentation scores from one confusion matrix.

The matrix is accumulated over images (and summed over ranks) as ``[C, C]`` int64 counts, rows the
true class and columns the predicted one; pixels labelled ``ignore_index`` do not count. From it,
as mmsegmentation computes them: per-class IoU = TP / (TP + FP + FN), mIoU = the mean over classes
whose union is not empty (a class absent from both labels and predictions is NaN and left out),
aAcc = correctly labelled pixels / counted pixels, per-class accuracy TP / (TP + FN) and mAcc.
"""

from __future__ import annotations

import math

import torch

IGNORE_INDEX = 255


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """``[num_classes, num_classes]`` int64 counts of (true, predicted) pixel pairs; ``pred`` and
    ``target`` are integer maps of one shape. A target id outside ``[0, num_classes)`` that is not
    ``ignore_index`` is a ``ValueError`` naming it (a label map of another dataset)."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} differs from the label shape {tuple(target.shape)}")
    keep = target != ignore_index
    t, p = target[keep].long(), pred[keep].long()
    if t.numel():
        low, high = int(t.min()), int(t.max())
        if low < 0 or high >= num_classes:
            bad = high if high >= num_classes else low
            raise ValueError(f"label id {bad} is outside 0..{num_classes - 1} (and not the ignore id {ignore_index}); "
                             f"set the class count to the dataset's")
    if p.numel() and (int(p.min()) < 0 or int(p.max()) >= num_classes):
        raise ValueError(f"predicted ids must lie in 0..{num_classes - 1}")
    counts = torch.bincount((t * num_classes + p).flatten(), minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).cpu()


def segmentation_scores(conf: torch.Tensor, class_names: list[str] | None = None) -> dict:
    """mIoU, aAcc, mAcc (fractions in [0, 1]) and the per-class IoU and accuracy (NaN where a class
    has no pixels to score) from a confusion matrix."""
    conf = conf.double()
    tp = conf.diag()
    gt, predicted = conf.sum(1), conf.sum(0)
    union = gt + predicted - tp
    nan = torch.full_like(tp, math.nan)
    iou = torch.where(union > 0, tp / union.clamp(min=1), nan)
    acc = torch.where(gt > 0, tp / gt.clamp(min=1), nan)
    total = conf.sum()
    names = class_names or [str(i) for i in range(conf.shape[0])]
    return {
        "mIoU": float(iou.nanmean()) if bool((union > 0).any()) else math.nan,
        "aAcc": float(tp.sum() / total) if total > 0 else math.nan,
        "mAcc": float(acc.nanmean()) if bool((gt > 0).any()) else math.nan,
        "IoU": dict(zip(names, iou.tolist())),
        "Acc": dict(zip(names, acc.tolist())),
    }
