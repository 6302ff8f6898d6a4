"""Segmentation scores checked against a hand-made confusion matrix and against a separate numpy
computation (per image, then summed) on random label maps."""

import math

import numpy as np
import pytest
import torch

from peco_scale.metrics.segmentation import IGNORE_INDEX, confusion_matrix, segmentation_scores


def test_hand_made_confusion_matrix():
    # 3 classes; class 2 never appears in the labels but is predicted once
    target = torch.tensor([[0, 0, 1, 1], [1, 255, 0, 255]])
    pred = torch.tensor([[0, 1, 1, 2], [1, 0, 0, 2]])
    conf = confusion_matrix(pred, target, 3)
    # counted pixels (6): (0,0) x2, (0,1) x1, (1,1) x2, (1,2) x1; the two ignored ones not at all
    assert conf.tolist() == [[2, 1, 0], [0, 2, 1], [0, 0, 0]]
    s = segmentation_scores(conf, ["a", "b", "c"])
    # IoU a: 2 / (3 + 2 - 2) = 2/3; b: 2 / (3 + 3 - 2) = 1/2; c: 0 / (0 + 1 - 0) = 0
    assert s["IoU"] == pytest.approx({"a": 2 / 3, "b": 0.5, "c": 0.0})
    assert s["mIoU"] == pytest.approx((2 / 3 + 0.5 + 0) / 3)
    assert s["aAcc"] == pytest.approx(4 / 6)
    assert s["Acc"]["a"] == pytest.approx(2 / 3) and s["Acc"]["b"] == pytest.approx(2 / 3)
    assert math.isnan(s["Acc"]["c"]) and s["mAcc"] == pytest.approx(2 / 3)


def test_absent_class_is_left_out_of_the_mean():
    conf = torch.tensor([[5, 1, 0], [0, 3, 0], [0, 0, 0]])  # class 2: no label, no prediction
    s = segmentation_scores(conf)
    assert math.isnan(s["IoU"]["2"])
    # IoU 0: 5 / (6 + 5 - 5); IoU 1: 3 / (3 + 4 - 3)
    assert s["mIoU"] == pytest.approx((5 / 6 + 3 / 4) / 2)


def _numpy_scores(preds, targets, num_classes):
    """Intersections and unions counted class by class with numpy masks, summed over images."""
    inter = np.zeros(num_classes)
    union = np.zeros(num_classes)
    label = np.zeros(num_classes)
    for p, t in zip(preds, targets):
        valid = t != IGNORE_INDEX
        for c in range(num_classes):
            pc, tc = (p == c) & valid, (t == c) & valid
            inter[c] += np.logical_and(pc, tc).sum()
            union[c] += np.logical_or(pc, tc).sum()
            label[c] += tc.sum()
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = inter / union
    return iou, inter.sum() / label.sum()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_label_maps_match_numpy(seed):
    rng = np.random.default_rng(seed)
    num_classes = 7
    preds, targets = [], []
    conf = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    for _ in range(4):
        h, w = rng.integers(5, 40, size=2)
        t = rng.integers(0, num_classes, size=(h, w))
        t[rng.random((h, w)) < 0.1] = IGNORE_INDEX
        p = np.where(rng.random((h, w)) < 0.6, t, rng.integers(0, num_classes, size=(h, w)))
        p[p == IGNORE_INDEX] = 0
        preds.append(p)
        targets.append(t)
        conf += confusion_matrix(torch.from_numpy(p), torch.from_numpy(t), num_classes)
    s = segmentation_scores(conf)
    iou, acc = _numpy_scores(preds, targets, num_classes)
    np.testing.assert_allclose(list(s["IoU"].values()), iou, rtol=1e-12)
    assert s["mIoU"] == pytest.approx(np.nanmean(iou), rel=1e-12)
    assert s["aAcc"] == pytest.approx(acc, rel=1e-12)


def test_label_above_the_class_count_is_one_line():
    with pytest.raises(ValueError, match=r"label id 9 is outside 0\.\.3 .*set the class count"):
        confusion_matrix(torch.zeros(2, 2, dtype=torch.long), torch.tensor([[0, 9], [1, 255]]), 4)


def test_per_class_iou_reaches_wandb_as_one_key_per_class():
    from peco_scale.engine.logger import wandb_scalars

    s = segmentation_scores(torch.tensor([[2, 1, 0], [0, 3, 0], [1, 0, 4]]), ["sky", "road", "car"])
    row = {"step": 7, "eval_mIoU": 100 * s["mIoU"], "eval_IoU": {k: 100 * v for k, v in s["IoU"].items()},
           "eval_split": "validation"}
    # IoU = diagonal / (row + column - diagonal): sky 2 / (3 + 3 - 2), road 3 / (3 + 4 - 3), car 4 / (5 + 4 - 4)
    assert wandb_scalars(row) == pytest.approx({"step": 7, "eval_mIoU": row["eval_mIoU"], "eval_IoU/sky": 50.0,
                                                "eval_IoU/road": 75.0, "eval_IoU/car": 80.0})
