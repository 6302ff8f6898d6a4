"""FFCV backend: .beton writer and the sharded, resumable FFCVLoader (CPU, small sizes)."""

import json
import shutil
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("ffcv")

from peco_scale.data import AugmentSpec, DataError, ShardedSampler, scan_image_folder  # noqa: E402
from peco_scale.data.ffcv_backend import FFCVLoader, write_beton  # noqa: E402
from peco_scale.data.folder import resolve_image_root  # noqa: E402
from peco_scale.data.mim import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402

# numba's dispatcher finalizer trips over ffcv recompiling its ctypes decoder per Loader (one per
# FFCVLoader here); harmless "Exception ignored" noise at garbage collection.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

MAXRES = 96
MASK = dict(grid=4, num_masked=6)


@pytest.fixture(scope="module")
def beton(demo_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ffcv") / "demo.beton"
    summary = write_beton(demo_data, out, max_resolution=MAXRES, workers=2, progress=False)
    assert summary["written"] == 300 and summary["skipped"] == 0 and len(summary["classes"]) == 10
    side = json.loads((out.parent / "demo.beton.json").read_text())
    assert side["max_resolution"] == MAXRES and side["count"] == 300 and side["skipped"] == 0
    return out


def _spec(task, size=32, **kw):
    if task == "pretrain":
        kw.setdefault("tokenizer_size", size // 2)
        kw.setdefault("mask", MASK)
    return AugmentSpec(img_size=size, task=task, **kw)


def _first(loader):
    for b in loader:
        return b


@pytest.mark.parametrize("task", ["tokenizer", "pretrain", "finetune"])
def test_batch_contract(beton, task):
    loader = FFCVLoader(beton, _spec(task), batch_size=16, seed=0, workers=2)
    assert loader.batches_per_epoch == 300 // 16
    b = _first(loader)
    assert b["skipped"] == 0
    assert b["label"].dtype == torch.int64 and b["label"].shape == (16,)
    assert b["index"].dtype == torch.int64 and b["index"].shape == (16,)
    if task == "tokenizer":
        x = b["image"]
        assert x.shape == (16, 3, 32, 32) and x.dtype == torch.float32
        assert x.min() >= -1 and x.max() <= 1 and x.min() < -0.5 and x.max() > 0.5
    elif task == "finetune":
        x = b["image"]
        assert x.shape == (16, 3, 32, 32) and x.dtype == torch.float32
        lo = min((0 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD))
        hi = max((1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD))
        assert x.min() >= lo - 1e-4 and x.max() <= hi + 1e-4
    else:
        p, t, m = b["patch"], b["tokenizer"], b["mask"]
        assert p.shape == (16, 3, 32, 32) and p.dtype == torch.float32
        assert t.shape == (16, 3, 16, 16) and t.dtype == torch.float32
        assert t.min() >= -1 and t.max() <= 1
        per_channel = (p.view(16, 3, -1) * torch.tensor(IMAGENET_STD).view(1, 3, 1)
                       + torch.tensor(IMAGENET_MEAN).view(1, 3, 1))
        assert per_channel.min() >= -1e-4 and per_channel.max() <= 1 + 1e-4
        assert m.shape == (16, 4, 4) and m.dtype == torch.bool
        assert (m.flatten(1).sum(1) == MASK["num_masked"]).all()


def test_pretrain_views_share_one_crop(beton):
    loader = FFCVLoader(beton, _spec("pretrain", size=64, tokenizer_size=32), batch_size=32, seed=3, workers=2)
    b = _first(loader)
    patch01 = b["patch"] * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    tok01 = b["tokenizer"] * 0.5 + 0.5
    a = F.adaptive_avg_pool2d(patch01, 8)
    c = F.adaptive_avg_pool2d(tok01, 8)
    same = (a - c).abs().mean(dim=(1, 2, 3))
    other = (a - c.roll(1, dims=0)).abs().mean(dim=(1, 2, 3))
    assert same.max() < 0.03, same
    assert same.mean() * 4 < other.mean()  # the check can tell different crops apart


def test_sharding_two_ranks_cover_epoch_once(beton):
    bs, per = 16, {}
    for rank in range(2):
        loader = FFCVLoader(beton, _spec("tokenizer", size=16, jitter=0.0), batch_size=bs, rank=rank,
                            world_size=2, seed=5, workers=1)
        loader.set_epoch(2)
        batches = [b["index"].numpy() for b in loader]
        assert len(batches) == loader.batches_per_epoch == 300 // (2 * bs)
        per[rank] = np.concatenate(batches)
        # same order as the folder backend's sampler (nothing skipped: positions == folder indices)
        ref = ShardedSampler(300, rank=rank, world_size=2, batch_size=bs, seed=5)
        ref.set_epoch(2)
        np.testing.assert_array_equal(per[rank], ref.shard_indices())
    both = np.concatenate([per[0], per[1]])
    assert len(both) == (300 // (2 * bs)) * 2 * bs
    assert len(np.unique(both)) == len(both)  # every kept index at most once, ranks disjoint
    assert set(both.tolist()) <= set(range(300))


def test_resume_mid_epoch_is_exact_and_deterministic(beton):
    spec = _spec("pretrain", size=32, tokenizer_size=16)
    full = FFCVLoader(beton, spec, batch_size=32, seed=7, workers=2)
    full.set_epoch(1)
    ref = list(full)
    resumed = FFCVLoader(beton, spec, batch_size=32, seed=7, workers=1)  # other worker count
    resumed.set_epoch(1)
    resumed.set_start_batch(3)
    rest = list(resumed)
    assert len(rest) == len(ref) - 3
    np.testing.assert_array_equal(torch.cat([b["index"] for b in rest]).numpy(),
                                  torch.cat([b["index"] for b in ref[3:]]).numpy())
    for a, b in zip(ref[3:], rest):  # same samples, same crops/flip/jitter/masks
        assert torch.equal(a["patch"], b["patch"]) and torch.equal(a["tokenizer"], b["tokenizer"])
        assert torch.equal(a["mask"], b["mask"]) and torch.equal(a["label"], b["label"])
    resumed.set_start_batch(resumed.batches_per_epoch)
    assert list(resumed) == []
    # a different epoch gives a different order and different augmentation
    full.set_epoch(2)
    other = _first(full)
    assert not torch.equal(other["index"], ref[0]["index"])


def test_writer_skips_and_counts_corrupt_images(demo_data, tmp_path):
    src, root = tmp_path / "tree", resolve_image_root(demo_data)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())[:2]
    for c in classes:
        shutil.copytree(root / c, src / c)
    good = sorted((src / classes[0]).iterdir())[0]
    data = good.read_bytes()
    (src / classes[0] / "zz_truncated.jpg").write_bytes(data[: len(data) // 3])
    (src / classes[1] / "zz_not_an_image.jpg").write_bytes(b"this is not a jpeg\n" * 20)
    (src / classes[1] / "notes.txt").write_text("ignored")
    n_scanned = len(scan_image_folder(src)[0])
    out = tmp_path / "c.beton"
    s = write_beton(src, out, max_resolution=64, mode="raw", workers=2, progress=False)
    assert s["skipped"] == 2 and s["written"] == n_scanned - 2 and s["ignored"] == 1
    assert {p.rsplit("/", 1)[-1] for p in s["skipped_files"]} == {"zz_truncated.jpg", "zz_not_an_image.jpg"}
    side = json.loads(out.with_name("c.beton.json").read_text())
    assert side["count"] == n_scanned - 2 and side["skipped"] == 2
    assert not list(tmp_path.glob("*.tmp-*")) and not list(tmp_path.glob("*.parts"))  # nothing left behind
    loader = FFCVLoader(out, _spec("tokenizer", size=16), batch_size=8, seed=0, workers=1)
    seen = np.concatenate([b["index"].numpy() for b in loader])
    kept_folder_idx = [i for i, (p, _) in enumerate(scan_image_folder(src)[0]) if "zz_" not in p]
    assert set(seen.tolist()) <= set(kept_folder_idx) and len(seen) == (n_scanned - 2) // 8 * 8


def test_bad_inputs_raise_one_line(beton, tmp_path, monkeypatch):
    def one_line(exc_info, *words):
        msg = str(exc_info.value)
        assert "\n" not in msg and all(w in msg for w in words), msg

    with pytest.raises(DataError) as e:
        FFCVLoader(tmp_path / "nope.beton", _spec("tokenizer"), batch_size=4, seed=0)
    one_line(e, "nope.beton", "does not exist")
    with pytest.raises(DataError) as e:
        FFCVLoader(beton, _spec("pretrain", size=128, tokenizer_size=64), batch_size=4, seed=0)
    one_line(e, "max_resolution=96", "128")
    with pytest.raises(DataError) as e:
        FFCVLoader(beton, _spec("tokenizer"), batch_size=200, world_size=2, rank=0, seed=0)
    one_line(e, "smaller than one global batch")
    bad = tmp_path / "bad" / "cls"
    bad.mkdir(parents=True)
    (bad / "a.jpg").write_bytes(b"garbage")
    with pytest.raises(DataError) as e:
        write_beton(tmp_path / "bad", tmp_path / "bad.beton", workers=1, progress=False)
    one_line(e, "could be decoded")
    assert not (tmp_path / "bad.beton.parts").exists()
    with pytest.raises(DataError) as e:
        write_beton(tmp_path / "missing", tmp_path / "m.beton", workers=1, progress=False)
    one_line(e, "does not exist")
    monkeypatch.setitem(sys.modules, "ffcv", None)
    with pytest.raises(ImportError) as e:
        FFCVLoader(beton, _spec("tokenizer"), batch_size=4, seed=0)
    one_line(e, "pip install -e '.[ffcv]'", "make syslibs")


_EARLY_EXIT = """
import sys
from peco_scale.data import AugmentSpec
from peco_scale.data.ffcv_backend import FFCVLoader
spec = AugmentSpec(32, "pretrain", tokenizer_size=16, mask=dict(grid=4, num_masked=6))
loader = FFCVLoader(sys.argv[1], spec, batch_size=8, seed=0, workers=2)
for epoch in range(2):
    loader.set_epoch(epoch)
    for i, b in enumerate(loader):  # break mid-epoch: the generator is closed right away
        if i == 1:
            break
held = iter(loader)  # and one left open (suspended mid-epoch) until interpreter exit
next(held)
print("ok", flush=True)
"""


def test_early_exit_stops_ffcv_threads_and_exits_zero(beton):
    import subprocess

    r = subprocess.run([sys.executable, "-c", _EARLY_EXIT, str(beton)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    assert "ok" in r.stdout and "terminate called" not in r.stderr


def test_generator_close_joins_threads(beton):
    import threading

    loader = FFCVLoader(beton, _spec("tokenizer", size=16), batch_size=8, seed=0, workers=2)
    before = {t for t in threading.enumerate()}
    g = iter(loader)
    next(g)
    g.close()
    leftover = [t for t in threading.enumerate() if t not in before and t.is_alive()]
    assert leftover == []


def _samples(beton_path):
    """Per sample (label, index, mode, height, width, stored bytes) of a .beton, read with ffcv's Reader."""
    from ffcv.reader import Reader

    r = Reader(str(beton_path))
    raw = np.fromfile(str(beton_path), dtype=np.uint8)
    sizes = {int(a["ptr"]): int(a["size"]) for a in r.alloc_table}
    out = []
    for m in r.metadata:
        img = m["f0"]
        ptr = int(img["data_ptr"])
        out.append((int(m["f1"]), int(m["f2"]), int(img["mode"]), int(img["height"]), int(img["width"]),
                    raw[ptr:ptr + sizes[ptr]].tobytes()))
    return out


def test_killed_conversion_resumes_and_equals_an_uninterrupted_one(demo_data, tmp_path):
    import signal
    import subprocess
    import time

    ref = tmp_path / "ref.beton"
    s_ref = write_beton(demo_data, ref, max_resolution=64, workers=2, progress=False, chunk_size=8)
    assert s_ref["chunks"] == 38 and s_ref["reused_chunks"] == 0
    assert not (tmp_path / "ref.beton.parts").exists()  # removed once the .beton is published

    out = tmp_path / "out.beton"
    cmd = [sys.executable, "-m", "peco_scale.data", "convert", "--to", "ffcv", "--data", str(demo_data),
           "--out", str(out), "--max_resolution", "64", "--chunk_size", "8", "--workers", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parts = tmp_path / "out.beton.parts"
    deadline = time.monotonic() + 120
    while not (parts / "chunk-000002.npz").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted(p.name for p in parts.glob("chunk-*.npz"))
    assert not out.exists() and 3 <= len(done) < 38, done  # killed mid-way: no .beton, some chunks

    from peco_scale.data.__main__ import main as data_main

    import io
    from contextlib import redirect_stdout

    buf = io.StringIO()
    with redirect_stdout(buf):
        assert data_main(cmd[3:]) == 0
    line = buf.getvalue()
    assert f"resumed: {len(done)} of 38 chunks were already encoded" in line, line
    assert not parts.exists() and out.is_file()
    assert sorted(_samples(out)) == sorted(_samples(ref))  # same images, labels, indices, bytes
    # a second run finds it up to date
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert data_main(cmd[3:]) == 0
    assert "up to date" in buf.getvalue()


def test_partial_conversion_with_other_settings_starts_over(demo_data, tmp_path):
    out = tmp_path / "o.beton"
    parts = tmp_path / "o.beton.parts"
    parts.mkdir()
    (parts / "plan.json").write_text(json.dumps({"version": 1, "max_resolution": 999}))
    (parts / "chunk-000000.npz").write_bytes(b"not what this run would write")
    (parts / "chunk-000001.npz.tmp-123").write_bytes(b"half")
    s = write_beton(demo_data, out, max_resolution=48, workers=2, progress=False, chunk_size=64)
    assert s["reused_chunks"] == 0 and s["written"] == 300 and not parts.exists()
    loader = FFCVLoader(out, _spec("tokenizer", size=16), batch_size=50, seed=0, workers=1)
    assert sum(b["image"].shape[0] for b in loader) == 300


def test_mae_batches_have_one_view_and_exact_random_masks(beton):
    """tokenizer_size 0 (the MAE tasks): no tokenizer view; random masks of exactly num_masked."""
    spec = _spec("pretrain", tokenizer_size=0, mask={"kind": "random", "grid": 4, "num_masked": 12})
    b = _first(FFCVLoader(beton, spec, batch_size=16, seed=0, workers=2))
    assert "tokenizer" not in b and b["patch"].shape == (16, 3, 32, 32)
    assert b["mask"].dtype == torch.bool and b["mask"].flatten(1).sum(1).eq(12).all()
    assert len({m.numpy().tobytes() for m in b["mask"]}) > 1
