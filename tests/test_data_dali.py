"""DALI backend (CPU-only pipelines): batch contract, one crop -> two views, sharding, resume,
corrupt files, bad input."""

import shutil
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("nvidia.dali")

from PIL import Image  # noqa: E402

from peco_scale.data import AugmentSpec, DataError, ShardedSampler, sample_seed, scan_image_folder  # noqa: E402
from peco_scale.data.dali_backend import DALILoader, crop_window  # noqa: E402
from peco_scale.data.mim import denormalize_patch  # noqa: E402

MASK = {"grid": 4, "num_masked": 6}


def make(root, task="pretrain", *, bs=8, rank=0, ws=1, seed=0, size=64, **spec):
    spec.setdefault("tokenizer_size", 32 if task == "pretrain" else 0)
    spec.setdefault("mask", MASK if task == "pretrain" else {})
    return DALILoader(root, AugmentSpec(size, task=task, **spec), batch_size=bs, rank=rank,
                      world_size=ws, seed=seed, workers=2)


def first(loader):
    for b in loader:
        return b


@pytest.mark.parametrize("task", ["tokenizer", "pretrain", "finetune"])
def test_batch_contract(demo_data, task):
    b = first(make(demo_data, task))
    expect = {"tokenizer": {"image", "label", "index", "skipped"},
              "finetune": {"image", "label", "index", "skipped"},
              "pretrain": {"patch", "tokenizer", "mask", "label", "index", "skipped"}}[task]
    assert set(b) == expect
    assert b["label"].dtype == torch.int64 and b["label"].shape == (8,)
    assert b["index"].dtype == torch.int64 and b["index"].shape == (8,)
    assert isinstance(b["skipped"], int) and b["skipped"] == 0
    if task == "pretrain":
        assert b["patch"].shape == (8, 3, 64, 64) and b["patch"].dtype == torch.float32
        assert b["tokenizer"].shape == (8, 3, 32, 32) and b["tokenizer"].dtype == torch.float32
        assert b["tokenizer"].min() >= -1 and b["tokenizer"].max() <= 1
        assert b["mask"].shape == (8, 4, 4) and b["mask"].dtype == torch.bool
        assert (b["mask"].flatten(1).sum(1) == 6).all()
        assert not (b["mask"][0] == b["mask"][1:]).all((1, 2)).all()  # masks differ per sample
        img = b["patch"]
        lo = (0 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
        hi = (1 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
        assert (img >= lo.view(1, 3, 1, 1) - 1e-4).all() and (img <= hi.view(1, 3, 1, 1) + 1e-4).all()
    else:
        img = b["image"]
        assert img.shape == (8, 3, 64, 64) and img.dtype == torch.float32
        if task == "tokenizer":
            assert img.min() >= -1 and img.max() <= 1
        else:
            assert img.min() < -1.2 or img.max() > 1.2  # ImageNet-normalised, not [-1, 1]
    assert torch.isfinite(img).all() and img.std() > 0.05


def test_two_views_share_one_crop_and_match_pil(demo_data):
    b = first(make(demo_data, "pretrain", jitter=0.0, seed=3))
    patch01 = denormalize_patch(b["patch"])
    tok01 = (b["tokenizer"] + 1) / 2
    down = F.interpolate(patch01, size=32, mode="bilinear", antialias=True, align_corners=False)
    same = (down - tok01).abs().mean(dim=(1, 2, 3))
    other = (down - tok01.roll(1, 0)).abs().mean(dim=(1, 2, 3))
    assert (same < 0.04).all(), same
    assert (same * 2 < other).all(), (same, other)
    # the crop window and flip are the ones drawn from the sample's seed (reference with PIL)
    samples, _, _ = scan_image_folder(demo_data)
    for k in range(3):
        index = int(b["index"][k])
        with Image.open(samples[index][0]) as im:
            im = im.convert("RGB")
        rng = np.random.default_rng([sample_seed(3, 0, index), 1])
        left, top, w, h = crop_window(rng, *im.size, (0.08, 1.0), (3 / 4, 4 / 3))
        ref = im.crop((left, top, left + w, top + h)).resize((32, 32), Image.BICUBIC)
        if rng.random() < 0.5:
            ref = ref.transpose(Image.FLIP_LEFT_RIGHT)
        ref = torch.from_numpy(np.asarray(ref, dtype=np.float32) / 255).permute(2, 0, 1)
        assert (ref - tok01[k]).abs().mean() < 0.04


def test_crop_window_distribution():
    rng = np.random.default_rng(0)
    boxes = np.array([crop_window(rng, 200, 100, (0.08, 1.0), (3 / 4, 4 / 3)) for _ in range(500)])
    left, top, w, h = boxes.T
    assert (left >= 0).all() and (top >= 0).all() and (left + w <= 200).all() and (top + h <= 100).all()
    frac = w * h / 20000
    assert frac.min() >= 0.07 and frac.max() <= 1.0
    # same distribution as torchvision's RandomResizedCrop.get_params (area fraction, aspect)
    from torchvision.transforms import RandomResizedCrop

    torch.manual_seed(0)
    img = torch.zeros(3, 100, 200)
    ref = np.array([RandomResizedCrop.get_params(img, [0.08, 1.0], [3 / 4, 4 / 3]) for _ in range(500)])
    ref_frac = ref[:, 2] * ref[:, 3] / 20000
    assert abs(frac.mean() - ref_frac.mean()) < 0.04
    assert abs(np.log(w / h).mean() - np.log(ref[:, 3] / ref[:, 2]).mean()) < 0.05


def test_sharding_covers_epoch_once(demo_data):
    per_rank = []
    for rank in range(2):
        loader = make(demo_data, "tokenizer", bs=8, rank=rank, ws=2, seed=5, size=32, jitter=0.0)
        loader.set_epoch(2)
        got = [b["index"] for b in loader]
        assert len(got) == loader.batches_per_epoch == 300 // 16
        per_rank.append(torch.cat(got).numpy())
    both = np.concatenate(per_rank)
    assert len(both) == len(set(both.tolist())) == 288  # every kept index exactly once
    for rank in range(2):  # same order as the folder backend's sampler
        s = ShardedSampler(300, rank=rank, world_size=2, batch_size=8, seed=5)
        s.set_epoch(2)
        np.testing.assert_array_equal(per_rank[rank], s.shard_indices())


def test_mid_epoch_resume_continues_exactly(demo_data):
    full = make(demo_data, "pretrain", bs=16, seed=1)
    full.set_epoch(1)
    batches = list(full)
    resumed = make(demo_data, "pretrain", bs=16, seed=1)
    resumed.set_epoch(1)
    resumed.set_start_batch(12)
    rest = list(resumed)
    assert len(batches) == 18 and len(rest) == 6 == len(resumed)
    np.testing.assert_array_equal(torch.cat([b["index"] for b in rest]).numpy(),
                                  torch.cat([b["index"] for b in batches[12:]]).numpy())
    for a, b in zip(batches[12:], rest):  # and the same tensors: randomness is per sample
        for k in ("patch", "tokenizer", "mask", "label"):
            assert torch.equal(a[k], b[k]), k
    resumed.set_start_batch(18)
    assert list(resumed) == []
    with pytest.raises(DataError, match="start batch 19"):
        resumed.set_start_batch(19)


@pytest.mark.parametrize("verify,fmt", [("header", "JPEG"), ("full", "JPEG"), ("header", "PNG")])
def test_truncated_file_is_skipped_and_counted(demo_data, tmp_path, verify, fmt):
    root = tmp_path / "data"
    shutil.copytree(demo_data, root)
    samples, _, _ = scan_image_folder(root)
    if fmt == "PNG":  # the demo tree is all JPEG: turn two files into PNGs (one good, one truncated)
        for k in (3, 7):
            src = samples[k][0]
            Image.open(src).convert("RGB").save(src[: src.rindex(".")] + ".png")
            (tmp_path / "gone").mkdir(exist_ok=True)
            shutil.move(src, tmp_path / "gone" / f"{k}.jpg")
        samples, _, _ = scan_image_folder(root)
        assert len(samples) == 300
    path = next(p for p, _ in samples if Image.open(p).format == fmt)
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    loader = DALILoader(root, AugmentSpec(32, task="tokenizer"), batch_size=10, rank=0,
                        world_size=1, seed=0, workers=2, verify=verify)
    batches = list(loader)
    assert len(batches) == loader.batches_per_epoch == 30
    assert sum(b["skipped"] for b in batches) == 1
    idx = torch.cat([b["index"] for b in batches])
    assert sorted(idx.tolist()) == list(range(300))  # epoch unchanged; the index is still served


def test_bad_input_errors(tmp_path, demo_data, monkeypatch):
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(DataError, match="contains no images"):
        make(tmp_path / "empty", "tokenizer")
    with pytest.raises(DataError, match="does not exist"):
        make(tmp_path / "missing", "tokenizer")
    with pytest.raises(DataError, match="tokenizer_size"):
        make(demo_data, "pretrain", tokenizer_size=-1)
    with pytest.raises(DataError, match="grid"):
        make(demo_data, "pretrain", mask={})
    with pytest.raises(DataError, match="smaller than one global batch"):
        make(demo_data, "tokenizer", bs=200, ws=2)
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)
    with pytest.raises(ImportError, match=r"pip install -e '\.\[dali\]'"):
        make(demo_data, "tokenizer")


def test_equal_view_sizes_share_the_jittered_resize(demo_data):
    b = first(make(demo_data, "pretrain", seed=4, tokenizer_size=64, jitter=0.4))
    patch01 = denormalize_patch(b["patch"])
    tok01 = (b["tokenizer"] + 1) / 2
    assert (patch01 - tok01).abs().max() < 1e-4  # one resize + jitter, two normalisations


def test_files_are_checked_once_per_process(demo_data, monkeypatch):
    from peco_scale.data import dali_backend

    calls = []
    real = dali_backend._check_bytes
    monkeypatch.setattr(dali_backend, "_check_bytes", lambda data, full: calls.append(1) or real(data, full))
    loader = make(demo_data, "tokenizer", bs=50, size=32, jitter=0.0)
    for epoch in range(2):
        loader.set_epoch(epoch)
        assert sum(len(x["index"]) for x in loader) == 300
    assert len(calls) == 300


def test_mae_batches_have_one_view_and_seeded_random_masks(demo_data):
    """tokenizer_size 0 (the MAE tasks): no tokenizer view; random masks of exactly num_masked,
    a function of the seed."""
    spec = dict(tokenizer_size=0, mask={"kind": "random", "grid": 4, "num_masked": 12})
    b, again = first(make(demo_data, **spec)), first(make(demo_data, **spec))
    assert "tokenizer" not in b and b["patch"].shape == (8, 3, 64, 64)
    assert b["mask"].dtype == torch.bool and b["mask"].flatten(1).sum(1).eq(12).all()
    assert torch.equal(b["mask"], again["mask"]) and len({m.numpy().tobytes() for m in b["mask"]}) > 1
