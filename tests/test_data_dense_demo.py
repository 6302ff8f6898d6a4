"""The dense demo data: label maps, COCO boxes and masks agree with the drawn shapes, read back
through pycocotools (the COCO reference reader)."""

import json

import numpy as np
import pytest
from PIL import Image

from peco_scale.data.dense_demo import SEG_CLASSES, make_dense_demo, render_scene, rle_encode
from peco_scale.data.spec import DataError


@pytest.fixture(scope="module", params=["plain", "cluttered"])
def dense(tmp_path_factory, request):
    root = tmp_path_factory.mktemp(f"dense_{request.param}")
    make_dense_demo(root, train_images=12, val_images=4, min_size=64, max_size=112, style=request.param)
    return root


def _style(root) -> str:
    return json.loads((root / "manifest.json").read_text())["params"].get("style", "plain")


def test_layout_and_reuse(dense):
    for split, n in (("training", 12), ("validation", 4)):
        assert len(list((dense / "images" / split).glob("*.jpg"))) == n
        assert len(list((dense / "annotations" / split).glob("*.png"))) == n
        coco = json.loads((dense / "annotations" / f"instances_{split}.json").read_text())
        assert len(coco["images"]) == n and [c["name"] for c in coco["categories"]] == list(SEG_CLASSES[1:])
        ids = [a["id"] for a in coco["annotations"]]
        assert len(ids) == len(set(ids)) >= n  # at least one shape per scene, each its own id
    before = (dense / "manifest.json").stat().st_mtime_ns
    make_dense_demo(dense, train_images=12, val_images=4, min_size=64, max_size=112, style=_style(dense))
    assert (dense / "manifest.json").stat().st_mtime_ns == before  # same parameters: reused


def test_rle_matches_pycocotools():
    mask_util = pytest.importorskip("pycocotools.mask")
    rng = np.random.default_rng(0)
    for first in (False, True):
        m = rng.random((7, 5)) < 0.4
        m[0, 0] = first
        rle = rle_encode(m)
        assert sum(rle["counts"]) == m.size
        decoded = mask_util.decode(mask_util.frPyObjects(rle, *rle["size"]))
        assert np.array_equal(decoded.astype(bool), m)


def test_masks_boxes_and_label_maps_agree(dense):
    pytest.importorskip("pycocotools")
    from pycocotools.coco import COCO

    coco = COCO(str(dense / "annotations" / "instances_training.json"))
    seen_polygon = seen_rle = False
    for img in coco.loadImgs(coco.getImgIds()):
        label = np.array(Image.open(dense / "annotations" / "training" / img["file_name"].replace(".jpg", ".png")))
        assert label.shape == (img["height"], img["width"]) and set(np.unique(label)) <= {0, 1, 2, 3, 4}
        anns = coco.loadAnns(coco.getAnnIds(imgIds=img["id"]))
        # the scene drawn again gives the same instances
        _, again, instances = render_scene(0, "training", img["id"] - 1, 64, 112, _style(dense))
        assert np.array_equal(again, label) and len(instances) == len(anns)
        for ann, inst in zip(anns, instances):
            mask = coco.annToMask(ann).astype(bool)
            ys, xs = np.nonzero(inst["mask"])
            assert ann["bbox"] == [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()]
            if isinstance(ann["segmentation"], list):  # a polygon, rasterised by pycocotools
                seen_polygon = True
                iou = (mask & inst["mask"]).sum() / (mask | inst["mask"]).sum()
                assert iou > 0.85, (img["file_name"], ann["id"], iou)
            else:
                seen_rle = True
                assert np.array_equal(mask, inst["mask"])
            # the class id labels the shape's pixels except its unlabelled rim
            cls = 1 + SEG_CLASSES.index(coco.loadCats(ann["category_id"])[0]["name"])
            assert set(np.unique(label[inst["mask"]])) <= {0, cls} and (label[inst["mask"]] == cls).mean() > 0.5
    assert seen_polygon and seen_rle


def test_ground_truth_as_predictions_scores_ap_one(dense):
    pytest.importorskip("pycocotools")
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = COCO(str(dense / "annotations" / "instances_training.json"))
    dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0,
             "segmentation": a["segmentation"]} for a in gt.loadAnns(gt.getAnnIds())]
    for kind in ("bbox", "segm"):
        ev = COCOeval(gt, gt.loadRes(dets), kind)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
        assert ev.stats[0] == pytest.approx(1.0) and ev.stats[1] == pytest.approx(1.0)


def test_cli_writes_and_refuses_bad_counts(tmp_path, capsys):
    from peco_scale.data.__main__ import main

    assert main(["dense-demo", "--out", str(tmp_path / "d"), "--train_images", "2", "--val_images", "1",
                 "--min_size", "48", "--max_size", "64"]) == 0
    assert "2 training / 1 validation scenes" in capsys.readouterr().out
    assert main(["dense-demo", "--out", str(tmp_path / "e"), "--train_images", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train_images=0" in err[0] and "must be >= 1" in err[0]
    assert not (tmp_path / "e" / "manifest.json").exists()
    with pytest.raises(SystemExit):  # argparse's one line for a style it does not know
        main(["dense-demo", "--out", str(tmp_path / "f"), "--style", "busy"])
    assert "invalid choice: 'busy'" in capsys.readouterr().err
    with pytest.raises(DataError, match="style='busy'.*plain, cluttered"):
        make_dense_demo(tmp_path / "g", style="busy")
    assert not (tmp_path / "g").exists()


def test_cluttered_scenes_hide_the_shapes_among_unlabelled_distractors():
    """The cluttered style paints blobs and strokes that stay background: some background pixels
    differ sharply from their right-hand neighbour (the distractors' edges and stripes), where the
    plain scenes' smooth backgrounds have none. (That the shapes' labels, boxes and masks stay exact
    in both styles is checked above through pycocotools.)"""
    def busy_background(style):
        frac = []
        for i in range(8):
            img, label, _ = render_scene(3, "training", i, 96, 96, style)
            grad = np.abs(np.diff(img.astype(np.int16), axis=1)).sum(-1)  # colour change to the right
            bg = (label[:, 1:] == 1) & (label[:, :-1] == 1)
            frac.append((grad[bg] > 120).mean())
        return float(np.mean(frac))
    plain, cluttered = busy_background("plain"), busy_background("cluttered")
    assert plain < 0.002 and cluttered > 5 * max(plain, 0.002), (plain, cluttered)


def test_unlabelled_scenes_are_new_and_read_as_an_image_folder(tmp_path, capsys):
    """--unlabelled_images: scenes of the same generator in a one-class ImageFolder tree that
    stage 2's folder reader takes, none of them a copy of a training scene."""
    from peco_scale.data.__main__ import main
    from peco_scale.data.folder import scan_image_folder

    out = tmp_path / "d"
    assert main(["dense-demo", "--out", str(out), "--train_images", "3", "--val_images", "1",
                 "--unlabelled_images", "5", "--min_size", "48", "--max_size", "64"]) == 0
    assert f"--data.path {out / 'unlabelled'}" in capsys.readouterr().out
    samples, classes, _ = scan_image_folder(out / "unlabelled")
    assert classes == ["scenes"] and len(samples) == 5
    train = {p.read_bytes() for p in (out / "images" / "training").glob("*.jpg")}
    assert len(train) == 3 and not train & {p.read_bytes() for p in (out / "unlabelled" / "scenes").glob("*.jpg")}
    assert json.loads((out / "manifest.json").read_text())["counts"]["unlabelled"] == {"images": 5}
    # asked again without them: the tree is rewritten and the unlabelled folder goes
    assert main(["dense-demo", "--out", str(out), "--train_images", "3", "--val_images", "1",
                 "--min_size", "48", "--max_size", "64"]) == 0
    assert not (out / "unlabelled").exists()
    assert main(["dense-demo", "--out", str(tmp_path / "e"), "--unlabelled_images", "-1"]) == 2
    assert "unlabelled_images=-1" in capsys.readouterr().err
