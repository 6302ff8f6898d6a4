"""ADE20K-layout segmentation data: layout errors are one line, labels map as reduce-zero-label says,
augmented images and labels stay aligned, bad samples are skipped and counted, evaluation shards."""

import numpy as np
import pytest
import torch
from PIL import Image

from peco_scale.data.mim import IMAGENET_MEAN, IMAGENET_STD
from peco_scale.data.segmentation import (
    SegAugment,
    SegmentationDataset,
    SegmentationLoader,
    eval_samples,
    read_label,
    scan_segmentation,
    train_sample,
)
from peco_scale.data.spec import DataError


def _tree(root, n=6, size=(90, 70), classes=4, seed=0):
    """n images whose grey level encodes their label (id k -> 40 k), labels with 0 = unlabelled."""
    rng = np.random.default_rng(seed)
    for split in ("training", "validation"):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        for i in range(n):
            w, h = size
            lab = np.zeros((h, w), np.uint8)
            for k in range(1, classes + 1):  # blocks of each class
                y, x = rng.integers(0, h - 20), rng.integers(0, w - 20)
                lab[y:y + 20, x:x + 20] = k
            Image.fromarray(np.repeat((lab * 40)[..., None], 3, 2)).save(root / "images" / split / f"im{i}.png")
            Image.fromarray(lab).save(root / "annotations" / split / f"im{i}.png")
    return root


def test_layout_errors_are_one_line(tmp_path):
    with pytest.raises(DataError, match=r"images/training.*does not exist|does not exist.*ADE20K layout"):
        scan_segmentation(tmp_path, "training")
    root = _tree(tmp_path / "d", n=3)
    (root / "annotations" / "training" / "im1.png").unlink()
    with pytest.raises(DataError, match=r"1 of 3 images .* have no annotation PNG .*im1.png -> im1.png"):
        scan_segmentation(root, "training")


def test_reduce_zero_label_and_the_class_count_check(tmp_path):
    path = tmp_path / "a.png"
    Image.fromarray(np.array([[0, 1, 2], [150, 255, 3]], np.uint8)).save(path)
    assert read_label(str(path), True).tolist() == [[255, 0, 1], [149, 255, 2]]
    assert read_label(str(path), False).tolist() == [[0, 1, 2], [150, 255, 3]]
    root = _tree(tmp_path / "d", n=2, classes=4)
    with pytest.raises(DataError, match=r"class id 4, above the 3 classes of --data.num_classes 3"):
        SegmentationDataset(root, "training", 3, SegAugment(crop=32))
    SegmentationDataset(root, "training", 4, SegAugment(crop=32))


def test_samples_keep_image_and_label_aligned_and_are_seeded(tmp_path):
    root = _tree(tmp_path / "d", n=4)
    ds = SegmentationDataset(root, "training", 4, SegAugment(crop=48, photometric=False))
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    for i in range(4):
        a, b = ds[(i, 1234 + i)], ds[(i, 1234 + i)]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
        assert a["image"].shape == (3, 48, 48) and a["label"].shape == (48, 48)
        grey = ((a["image"] * std + mean) * 255)[0]
        lab = a["label"]
        valid = lab != 255
        assert set(lab[valid].unique().tolist()) <= {0, 1, 2, 3}
        # the grey level says the label (40 (k + 1) for id k after reduce-zero-label) away from edges,
        # where bilinear (image) and nearest (label) resizing may differ by a pixel
        agree = ((grey[valid] / 40).round() - 1 == lab[valid]).float().mean()
        assert agree > 0.9, (i, float(agree))
    assert not torch.equal(ds[(0, 1)]["image"], ds[(0, 2)]["image"])  # another seed, another sample


def test_photometric_distortion_changes_colours_not_labels():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8))
    lab = rng.integers(0, 3, (40, 40))
    plain = train_sample(img, lab, SegAugment(crop=40, photometric=False, ratio_range=(1, 1)), np.random.default_rng(5))
    photo = train_sample(img, lab, SegAugment(crop=40, photometric=True, ratio_range=(1, 1)), np.random.default_rng(5))
    assert torch.equal(plain[1], photo[1]) and not torch.equal(plain[0], photo[0])


def test_bad_samples_are_skipped_and_counted(tmp_path):
    root = _tree(tmp_path / "d", n=4)
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(root / "annotations" / "training" / "im2.png")  # other size
    (root / "images" / "training" / "im3.png").write_bytes(b"not a png")
    loader = SegmentationLoader(root, "training", 4, SegAugment(crop=32), batch_size=4, seed=0)
    batches = list(loader)
    assert len(batches) == 1 and batches[0]["skipped"] == 2 and batches[0]["image"].shape == (4, 3, 32, 32)


def test_evaluation_is_sharded_over_ranks(tmp_path):
    root = _tree(tmp_path / "d", n=5, size=(200, 50))
    seen = [i for r in (0, 1) for i, _, _ in eval_samples(root, "validation", 32, rank=r, world_size=2)]
    assert sorted(seen) == [0, 1, 2, 3, 4]
    _, image, label = next(eval_samples(root, "validation", 32))
    assert label.shape == (50, 200) and image.shape == (1, 3, 32, 128)  # short side 32, long <= 4 x 32
