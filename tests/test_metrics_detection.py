"""COCO box and mask AP through pycocotools, against APs worked out by hand."""

import numpy as np
import pytest
from pycocotools import mask as mask_util
from pycocotools.coco import COCO

from peco_scale.metrics.detection import coco_scores


def _gt(boxes, crowd=(), size=(100, 100)):
    """A one-image ground truth with one category; ``boxes`` [x, y, w, h], masks = the boxes."""
    h, w = size
    anns = []
    for i, (x, y, bw, bh) in enumerate(boxes):
        anns.append({"id": i + 1, "image_id": 1, "category_id": 1, "bbox": [x, y, bw, bh], "area": bw * bh,
                     "iscrowd": int(i in crowd), "segmentation": [[x, y, x + bw, y, x + bw, y + bh, x, y + bh]]})
    coco = COCO()
    coco.dataset = {"images": [{"id": 1, "width": w, "height": h, "file_name": "a.jpg"}],
                    "categories": [{"id": 1, "name": "thing"}], "annotations": anns}
    coco.createIndex()
    return coco


def _rle(x, y, bw, bh, size=(100, 100)):
    m = np.zeros(size, np.uint8)
    m[y:y + bh, x:x + bw] = 1
    rle = mask_util.encode(np.asfortranarray(m))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def _det(box, score, mask=True):
    r = {"image_id": 1, "category_id": 1, "bbox": list(box), "score": score}
    if mask:
        r["segmentation"] = _rle(*box)
    return r


def test_ground_truth_as_predictions_scores_one():
    gt = _gt([(10, 10, 20, 20), (50, 40, 40, 30)])
    res = [_det((10, 10, 20, 20), 0.9), _det((50, 40, 40, 30), 0.8)]
    for kind in ("bbox", "segm"):
        s = coco_scores(gt, res, kind)
        assert s["AP"] == pytest.approx(1.0) and s["AP50"] == pytest.approx(1.0) and s["AP75"] == pytest.approx(1.0)


def test_shifted_box_scores_the_thresholds_its_iou_passes():
    """A 10x10 box shifted 2 px: IoU = 80 / 120 = 0.667, a hit at IoU 0.50, 0.55, 0.60 and 0.65 of
    COCO's ten thresholds: AP = 4/10, AP50 = 1, AP75 = 0. Small object (area 100 < 32^2)."""
    gt = _gt([(10, 10, 10, 10)])
    for kind in ("bbox", "segm"):
        s = coco_scores(gt, [_det((12, 10, 10, 10), 0.9)], kind)
        assert s["AP"] == pytest.approx(0.4) and s["AP50"] == pytest.approx(1.0) and s["AP75"] == 0.0
        assert s["APs"] == pytest.approx(0.4) and s["APm"] == -1.0 and s["APl"] == -1.0


def test_a_higher_scored_false_positive_costs_a_third():
    """Detections by score: a miss (0.9), then both objects: precision 0, 1/2, 2/3 at recall 0,
    1/2, 1. COCO's interpolated precision is 2/3 at every recall point: AP = 2/3."""
    gt = _gt([(10, 10, 20, 20), (60, 60, 20, 20)])
    res = [_det((40, 5, 10, 10), 0.9), _det((10, 10, 20, 20), 0.8), _det((60, 60, 20, 20), 0.7)]
    for kind in ("bbox", "segm"):
        assert coco_scores(gt, res, kind)["AP"] == pytest.approx(2 / 3, abs=1e-6)


def test_detections_on_crowd_regions_are_not_false_positives():
    gt = _gt([(10, 10, 20, 20), (50, 50, 40, 40)], crowd=(1,))
    res = [_det((55, 55, 20, 20), 0.95), _det((10, 10, 20, 20), 0.8)]  # the first lies inside the crowd box
    assert coco_scores(gt, res, "bbox")["AP"] == pytest.approx(1.0)


def test_no_detections_scores_zero():
    assert coco_scores(_gt([(10, 10, 20, 20)]), [], "bbox")["AP"] == 0.0
