"""ImageFolder scanning, corrupt-file skipping, seeded augmentation and ShardedSampler."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from peco_scale.data import (
    DataError,
    ImageFolderDataset,
    ShardedSampler,
    denormalize,
    sample_seed,
    scan_image_folder,
    tokenizer_transform,
)


def _write_image(path: Path, seed: int, size: tuple[int, int] = (40, 32)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)


def _make_tree(root: Path, per_class: int = 4) -> None:
    """root/{ants,bees}/img_<i>.{jpg,png} with random pixels."""
    for c, cls in enumerate(["bees", "ants"]):
        for i in range(per_class):
            _write_image(root / cls / f"img_{i}.{'png' if i % 2 else 'jpg'}", 10 * c + i)


# ----------------------------------------------------------------------------- scanning


def test_scan_ignores_and_counts_non_images(tmp_path: Path) -> None:
    _make_tree(tmp_path)
    (tmp_path / "ants" / "notes.txt").write_text("x")
    (tmp_path / "bees" / ".DS_Store").write_bytes(b"\0")
    (tmp_path / "README").write_text("stray file at the root")
    _write_image(tmp_path / "bees" / "nested" / "UPPER.JPEG", 99)  # recursive, case-insensitive
    samples, classes, n_ignored = scan_image_folder(tmp_path)
    assert classes == ["ants", "bees"]
    assert n_ignored == 3
    assert len(samples) == 9
    assert [c for _, c in samples] == [0] * 4 + [1] * 5
    assert samples == sorted(samples, key=lambda s: (s[1], s[0]))
    assert any(p.endswith("UPPER.JPEG") for p, _ in samples)
    assert scan_image_folder(tmp_path) == (samples, classes, n_ignored)  # deterministic


def test_scan_accepts_root_with_train_subfolder(tmp_path: Path) -> None:
    _make_tree(tmp_path / "train")
    (tmp_path / "manifest.json").write_text("{}")
    samples, classes, n_ignored = scan_image_folder(tmp_path)
    assert classes == ["ants", "bees"] and len(samples) == 8 and n_ignored == 0
    assert all(Path(p).parent.parent == tmp_path / "train" for p, _ in samples)


def test_scan_errors_name_the_folder(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(DataError) as err:
        scan_image_folder(missing)
    msg = str(err.value)
    assert f"'{missing}'" in msg and "does not exist" in msg and "demo --out" in msg
    assert "\n" not in msg

    empty = tmp_path / "empty"
    (empty / "cls").mkdir(parents=True)
    (empty / "cls" / "a.txt").write_text("not an image")
    with pytest.raises(DataError, match="no images") as err:
        scan_image_folder(empty)
    assert f"'{empty}'" in str(err.value)

    flat = tmp_path / "flat"
    _write_image(flat / "a.jpg", 0)
    with pytest.raises(DataError, match="class sub-folders"):
        scan_image_folder(flat)


# ----------------------------------------------------------------------------- corrupt files


def _corrupt_tree(root: Path) -> int:
    """4 good images plus two adjacent corrupt ones in 'ants'; returns the corrupt count."""
    _make_tree(root, per_class=2)
    good = root / "ants" / "img_0.jpg"
    data = good.read_bytes()
    (root / "ants" / "img_0b_truncated.jpg").write_bytes(data[: len(data) // 2])
    (root / "ants" / "img_0c_text.jpg").write_text("this is not a jpeg")
    return 2


def test_corrupt_images_are_skipped_deterministically(tmp_path: Path) -> None:
    n_bad = _corrupt_tree(tmp_path)
    ds = ImageFolderDataset(tmp_path, tokenizer_transform(16, train=False))
    assert len(ds) == 6
    names = [Path(p).name for p, _ in ds.samples]
    bad = {names.index("img_0b_truncated.jpg"), names.index("img_0c_text.jpg")}
    first = [ds[i] for i in range(len(ds))]
    assert sum(item["skipped"] for item in first) == n_bad
    assert [item["index"] for item in first] == list(range(6))
    for i in bad:  # adjacent corrupt files fall through to the next readable one
        assert first[i]["skipped"] == 1
        assert torch.equal(first[i]["image"], first[max(bad) + 1]["image"])
    # a fresh instance (no cache of known-bad files) gives the same answers
    again = ImageFolderDataset(tmp_path, tokenizer_transform(16, train=False))
    for a, b in zip(first, [again[i] for i in reversed(range(6))][::-1]):
        assert torch.equal(a["image"], b["image"]) and a["skipped"] == b["skipped"]
        assert a["label"] == b["label"]


def test_all_corrupt_raises(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.png").write_bytes(b"garbage")
    (tmp_path / "a" / "y.jpg").write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(DataError, match="could be decoded") as err:  # at construction, not in a worker
        ImageFolderDataset(tmp_path, None)
    msg = str(err.value)
    assert f"none of the 2 images under '{tmp_path}'" in msg and "point --data elsewhere" in msg
    assert "\n" not in msg


def test_corrupt_last_file_wraps_around(tmp_path: Path) -> None:
    _write_image(tmp_path / "a" / "0.png", 1)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.jpg").write_bytes(b"\xff\xd8\xff garbage")
    ds = ImageFolderDataset(tmp_path, tokenizer_transform(8, train=False))
    item = ds[1]
    assert item["skipped"] == 1 and item["label"] == 0 and item["index"] == 1


# ----------------------------------------------------------------------------- augmentation


def test_seeded_augmentation_is_pure_function_of_index_and_seed(tmp_path: Path) -> None:
    _make_tree(tmp_path)
    tf = tokenizer_transform(24, train=True)
    a = ImageFolderDataset(tmp_path, tf)
    b = ImageFolderDataset(tmp_path, tokenizer_transform(24, train=True))
    torch.manual_seed(123)
    x1 = a[(3, 2**62 + 7)]["image"]
    torch.manual_seed(999)  # global state must not matter
    b[(1, 5)]
    x2 = b[(3, 2**62 + 7)]["image"]
    assert torch.equal(x1, x2)
    assert x1.shape == (3, 24, 24) and x1.min() >= -1 and x1.max() <= 1
    others = [a[(3, s)]["image"] for s in range(1, 6)]
    assert sum(not torch.equal(x1, o) for o in others) >= 4, "different seeds should crop differently"


def test_seeded_item_restores_global_rng(tmp_path: Path) -> None:
    _make_tree(tmp_path)
    ds = ImageFolderDataset(tmp_path, tokenizer_transform(16))
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    ds[(0, 42)]
    assert torch.equal(torch.rand(3), expected)
    assert isinstance(ds[0]["image"], torch.Tensor)  # plain int key still works


def test_dataloader_workers_do_not_change_samples(tmp_path: Path) -> None:
    _make_tree(tmp_path, per_class=6)
    ds = ImageFolderDataset(tmp_path, tokenizer_transform(16))
    sampler = ShardedSampler(len(ds), rank=0, world_size=1, batch_size=4, seed=7)
    runs = []
    for workers in (0, 2):
        loader = DataLoader(ds, batch_size=4, sampler=sampler, num_workers=workers)
        runs.append(torch.cat([batch["image"] for batch in loader]))
    assert torch.equal(runs[0], runs[1])


def test_eval_transform_and_denormalize(tmp_path: Path) -> None:
    img = Image.fromarray(np.full((30, 50, 3), 255, np.uint8))
    x = tokenizer_transform(20, train=False)(img)
    assert x.shape == (3, 20, 20) and torch.allclose(x, torch.ones_like(x))
    assert torch.allclose(denormalize(torch.tensor([-1.0, 0.0, 1.0, 3.0])),
                          torch.tensor([0.0, 0.5, 1.0, 1.0]))


# ----------------------------------------------------------------------------- sampler


def _epoch(n: int, ws: int, bs: int, seed: int = 0, epoch: int = 0) -> list[list[tuple[int, int]]]:
    out = []
    for r in range(ws):
        s = ShardedSampler(n, rank=r, world_size=ws, batch_size=bs, seed=seed)
        s.set_epoch(epoch)
        out.append(list(s))
    return out


@pytest.mark.parametrize("ws", [1, 2, 3])
def test_sharded_sampler_equal_disjoint_complete(ws: int) -> None:
    n, bs = 103, 4
    shards = _epoch(n, ws, bs)
    bpe = n // (ws * bs)
    assert all(len(s) == bpe * bs for s in shards)
    sampler = ShardedSampler(n, rank=0, world_size=ws, batch_size=bs, seed=0)
    assert sampler.batches_per_epoch == bpe and len(sampler) == bpe * bs
    flat = [i for s in shards for i, _ in s]
    assert len(flat) == len(set(flat)) == bpe * ws * bs  # disjoint, each index at most once
    assert set(flat) <= set(range(n)) and n - len(flat) == n % (ws * bs)
    assert all(seed == sample_seed(0, 0, i) and 0 <= seed < 2**63 for s in shards for i, seed in s)


def test_sharded_sampler_epochs_and_resume() -> None:
    e0, e1 = _epoch(50, 2, 3, epoch=0), _epoch(50, 2, 3, epoch=1)
    assert [i for i, _ in e0[0]] != [i for i, _ in e1[0]]
    assert {s for _, s in e0[0]}.isdisjoint({s for _, s in e1[0]})  # fresh seeds per epoch
    assert e0 == _epoch(50, 2, 3, epoch=0)  # reproducible

    s = ShardedSampler(50, rank=1, world_size=2, batch_size=3, seed=0)
    s.set_epoch(1)
    full = list(s)
    for b in (0, 1, 5, s.batches_per_epoch):
        s.set_start_batch(b)
        assert list(s) == full[b * 3 :] and len(s) == len(full) - b * 3
    s.set_epoch(2)
    assert s.start_batch == 0 and len(list(s)) == len(full)
    with pytest.raises(DataError):
        s.set_start_batch(s.batches_per_epoch + 1)


def test_sharded_sampler_rejects_too_small_and_unshuffled_order() -> None:
    with pytest.raises(DataError) as err:
        ShardedSampler(7, rank=0, world_size=2, batch_size=4, seed=0)
    msg = str(err.value)
    assert "7 images" in msg and "world_size=2" in msg and "batch_size=4" in msg
    s = ShardedSampler(10, rank=1, world_size=2, batch_size=2, seed=0, shuffle=False)
    assert [i for i, _ in s] == [1, 3, 5, 7]
