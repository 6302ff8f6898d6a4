"""COCO-format detection data: targets read against pycocotools, the large-scale jitter's geometry
against the masks it moves, evaluation's mapping back to the original pixels, and bad input."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from peco_scale.data.dense_demo import make_dense_demo
from peco_scale.data.detection import (CocoSplit, DetAugment, DetectionDataset, DetectionLoader, check_categories,
                                       eval_image, to_coco_results, train_sample)
from peco_scale.data.spec import DataError
from peco_scale.metrics.detection import coco_scores


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    root = tmp_path_factory.mktemp("dense")
    make_dense_demo(root, train_images=12, val_images=4, min_size=64, max_size=96)
    return root


def _coco_folder(root, split, images, anns, categories=({"id": 7, "name": "a"}, {"id": 3, "name": "b"})):
    """A hand-made COCO split: ``images`` name -> (w, h), ``anns`` dicts without ids."""
    (root / "images" / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(exist_ok=True)
    entries = []
    for i, (name, (w, h)) in enumerate(images.items()):
        Image.new("RGB", (w, h), (120, 60, 30)).save(root / "images" / split / name)
        entries.append({"id": i + 1, "file_name": name, "width": w, "height": h})
    full = [{"id": k + 1, "iscrowd": 0, **a} for k, a in enumerate(anns)]
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(
        {"images": entries, "annotations": full, "categories": list(categories)}))
    return root


def test_targets_match_pycocotools(dense):
    split = CocoSplit(dense, "training")
    assert [name for _, name in split.categories] == ["circle", "square", "triangle"]
    for image_id in split.image_ids[:6]:
        boxes, labels, masks, dropped = split.instances(image_id)
        anns = split.coco.imgToAnns[image_id]
        assert dropped == 0 and len(boxes) == len(anns)
        for a, box, label, mask in zip(anns, boxes, labels, masks):
            x, y, w, h = a["bbox"]
            np.testing.assert_allclose(box, [x, y, x + w, y + h], atol=1e-4)
            assert label == split.label_of[a["category_id"]]
            np.testing.assert_array_equal(mask, split.coco.annToMask(a))


def test_categories_keep_id_order_and_labels_start_at_one(tmp_path):
    root = _coco_folder(tmp_path, "training", {"a.png": (20, 20)},
                        [{"image_id": 1, "category_id": 7, "bbox": [1, 1, 5, 5]}])
    split = CocoSplit(root, "training")
    assert split.categories == [(3, "b"), (7, "a")] and split.label_of == {3: 1, 7: 2}


def test_clipping_crowd_and_instances_outside_the_image(tmp_path):
    """A polygon reaching past the border is clipped (pycocotools rasterises inside the image), a box
    wholly outside is dropped and counted, a crowd region is left out of the targets."""
    anns = [
        {"image_id": 1, "category_id": 7, "bbox": [-5, 10, 20, 10],
         "segmentation": [[-5, 10, 15, 10, 15, 20, -5, 20]]},
        {"image_id": 1, "category_id": 7, "bbox": [40, 40, 10, 10], "segmentation": [[40, 40, 50, 40, 50, 50]]},
        {"image_id": 1, "category_id": 3, "bbox": [2, 2, 6, 6], "iscrowd": 1,
         "segmentation": {"size": [30, 30], "counts": [0, 900]}},
    ]
    split = CocoSplit(_coco_folder(tmp_path, "training", {"a.png": (30, 30)}, anns), "training")
    boxes, labels, masks, dropped = split.instances(1)
    assert dropped == 1 and labels.tolist() == [2]
    np.testing.assert_allclose(boxes[0], [0, 10, 15, 20])
    assert masks.shape == (1, 30, 30) and masks[0].sum() == 15 * 10 and masks[0, 10:20, :15].all()


def test_images_without_instances_are_left_out_of_training_and_counted(tmp_path):
    anns = [{"image_id": 2, "category_id": 7, "bbox": [1, 1, 5, 5], "segmentation": [[1, 1, 6, 1, 6, 6, 1, 6]]}]
    root = _coco_folder(tmp_path, "training", {"a.png": (20, 20), "b.png": (20, 20), "c.png": (20, 20)}, anns)
    ds = DetectionDataset(root, "training", DetAugment(size=32))
    assert ds.ids == [2] and ds.empty == 2
    with pytest.raises(DataError, match="none of the 1 images .* has a non-crowd instance"):
        DetectionDataset(_coco_folder(tmp_path / "e", "training", {"a.png": (20, 20)}, []), "training",
                         DetAugment(size=32))


def test_category_lists_that_differ_are_one_line(tmp_path):
    _coco_folder(tmp_path, "training", {"a.png": (20, 20)}, [])
    _coco_folder(tmp_path, "validation", {"a.png": (20, 20)}, [], categories=({"id": 7, "name": "a"},))
    with pytest.raises(DataError, match=r"categories of instances_training.json \(2\) and instances_validation.json "
                                        r"\(1\) differ \(e.g. id 3 'b'\)") as info:
        check_categories(CocoSplit(tmp_path, "training"), CocoSplit(tmp_path, "validation"))
    assert "\n" not in str(info.value)


def test_missing_annotations_and_broken_json_are_one_line(tmp_path):
    with pytest.raises(DataError, match="instances_training.json' does not exist"):
        CocoSplit(tmp_path, "training")
    _coco_folder(tmp_path, "training", {"a.png": (20, 20)}, [])
    (tmp_path / "annotations" / "instances_training.json").write_text("{not json")
    with pytest.raises(DataError, match="unreadable") as info:
        CocoSplit(tmp_path, "training")
    assert "\n" not in str(info.value)


def _mask_box(m):
    ys, xs = np.nonzero(m)
    return [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


@pytest.mark.parametrize("seed", range(6))
def test_large_scale_jitter_moves_boxes_with_their_masks(dense, seed):
    """Each kept box is its moved mask's tight box, and lies where the original box lands when
    rescaled, cropped and flipped by the same draws (the demo's boxes are tight to their masks):
    equal to a pixel of rescaling unless the crop cut the shape, inside it always."""
    split = CocoSplit(dense, "training")
    image_id = split.image_ids[seed]
    boxes, labels, masks, _ = split.instances(image_id)
    img = split.read_image(image_id)
    aug = DetAugment(size=64, scale_range=(0.5, 2.0), hflip=0.5)
    image, t = train_sample(img, labels, masks, aug, np.random.default_rng(seed))
    assert image.shape == (3, 64, 64) and t["masks"].shape[1:] == (64, 64) and 0 <= image.min() <= image.max() <= 1
    assert len(t["boxes"]) == len(t["labels"]) == len(t["masks"]) >= 1
    rng = np.random.default_rng(seed)  # the same draws, in the same order
    w, h = img.size
    s = 64 * rng.uniform(0.5, 2.0) / max(w, h)
    nw, nh = int(w * s + 0.5), int(h * s + 0.5)
    top, left = int(rng.integers(max(nh - 64, 0) + 1)), int(rng.integers(max(nw - 64, 0) + 1))
    flip = rng.random() < 0.5
    cw, ch = min(nw - left, 64), min(nh - top, 64)
    ref = boxes * np.array([nw / w, nh / h, nw / w, nh / h]) - np.array([left, top, left, top])
    if flip:
        ref = np.stack([cw - ref[:, 2], ref[:, 1], cw - ref[:, 0], ref[:, 3]], 1)
    clipped = np.stack([ref[:, 0].clip(0, cw), ref[:, 1].clip(0, ch), ref[:, 2].clip(0, cw), ref[:, 3].clip(0, ch)], 1)
    for box, m, label in zip(t["boxes"].numpy(), t["masks"].numpy(), t["labels"].numpy()):
        np.testing.assert_array_equal(box, _mask_box(m))
        cand = [k for k in range(len(ref)) if labels[k] == label and np.all(box[:2] >= clipped[k, :2] - 1.5)
                and np.all(box[2:] <= clipped[k, 2:] + 1.5)]
        assert cand, (box, clipped)
        k = cand[0]
        if (clipped[k] == ref[k]).all():  # not cut by the crop: the whole shape moved
            np.testing.assert_allclose(box, ref[k], atol=1.5)


def test_jitter_reproduces_from_the_seed_and_flip_mirrors(dense):
    split = CocoSplit(dense, "training")
    image_id = split.image_ids[0]
    _, labels, masks, _ = split.instances(image_id)
    args = (split.read_image(image_id), labels, masks)
    a = train_sample(*args, DetAugment(size=64, scale_range=(1.0, 1.0), hflip=0.0), np.random.default_rng(1))
    b = train_sample(*args, DetAugment(size=64, scale_range=(1.0, 1.0), hflip=1.0), np.random.default_rng(1))
    w = a[0].shape[-1] - int((a[0] == torch.tensor([0.485, 0.456, 0.406])[:, None, None]).all(0).all(0).sum())
    torch.testing.assert_close(b[0][:, :, :w], a[0][:, :, :w].flip(-1))
    torch.testing.assert_close(b[1]["boxes"][:, [0, 2]], w - a[1]["boxes"][:, [2, 0]])
    c = train_sample(*args, DetAugment(size=64, scale_range=(1.0, 1.0), hflip=0.0), np.random.default_rng(1))
    torch.testing.assert_close(a[1]["boxes"], c[1]["boxes"])


def test_ground_truth_through_the_eval_path_scores_one(dense):
    """The validation instances, moved to the evaluation input (rescaled, padded) as if predicted,
    come back through to_coco_results onto the original pixels: box AP 1, mask AP50 1."""
    split = CocoSplit(dense, "validation")
    results = []
    for image_id in split.image_ids:
        img = split.read_image(image_id)
        _, scale = eval_image(img, 64)
        boxes, labels, masks, _ = split.instances(image_id)
        h, w = masks.shape[1:]
        nh, nw = int(h * scale + 0.5), int(w * scale + 0.5)
        small = torch.nn.functional.interpolate(torch.from_numpy(masks)[:, None].float(), size=(nh, nw),
                                                mode="bilinear", align_corners=False)
        padded = torch.zeros(len(masks), 1, 64, 64)
        padded[:, :, :nh, :nw] = small
        out = {"boxes": torch.from_numpy(boxes) * scale, "labels": torch.from_numpy(labels),
               "scores": torch.linspace(1, 0.5, len(boxes)), "masks": padded}
        results += to_coco_results(split, image_id, out, scale)
    assert coco_scores(split.coco, results, "bbox")["AP"] == pytest.approx(1.0)
    assert coco_scores(split.coco, results, "segm")["AP50"] == pytest.approx(1.0)


def test_loader_batches_and_skips_unreadable_images(dense, tmp_path):
    import shutil

    root = tmp_path / "d"
    shutil.copytree(dense, root)
    split = CocoSplit(root, "training")
    split.image_path(split.image_ids[0]).write_bytes(b"not an image")
    loader = DetectionLoader(root, "training", DetAugment(size=64), batch_size=4, seed=0)
    batches = list(loader)
    assert len(batches) == 3 and all(b["image"].shape == (4, 3, 64, 64) and len(b["target"]) == 4 for b in batches)
    assert sum(b["skipped"] for b in batches) == 1
