"""COCO detection and instance-segmentation scores by pycocotools' ``COCOeval``: AP (IoU
0.50:0.95), AP50, AP75 and AP for small / medium / large objects, in [0, 1], as the first six
entries of ``COCOeval.stats``. Crowd regions of the ground truth are handled by COCOeval."""

from __future__ import annotations

import contextlib
import io
from typing import Any

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def coco_scores(coco_gt, results: list[dict[str, Any]], iou_type: str = "bbox",
                image_ids: list[int] | None = None) -> dict[str, float]:
    """Scores of ``results`` (COCO result dicts) against the ground truth ``coco_gt`` (a
    pycocotools COCO) over ``image_ids`` (default: all of the ground truth's images). No results
    scores 0; a metric without ground truth (e.g. no small objects) is -1, as COCOeval gives it."""
    from pycocotools.cocoeval import COCOeval

    # each evaluation sees only its own geometry (as detectron2 does): with a box present,
    # loadRes would take a mask's area from its box
    drop = "bbox" if iou_type == "segm" else "segmentation"
    results = [{k: v for k, v in r.items() if k != drop} for r in results]
    if not results:
        return {name: 0.0 for name in STAT_NAMES}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress and table
        ev = COCOeval(coco_gt, coco_gt.loadRes(results), iou_type)
        if image_ids is not None:
            ev.params.imgIds = sorted(image_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {name: float(v) for name, v in zip(STAT_NAMES, ev.stats[:6])}
