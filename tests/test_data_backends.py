"""The backend interface (peco_scale.data.spec, make_loader) on the folder backend, the data benchmark, and
every image mode decoded alike by the folder, dali and ffcv backends."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT
from peco_scale.data import AugmentSpec, DataError, make_loader

SPEC2 = AugmentSpec(64, "pretrain", tokenizer_size=32, mask=dict(grid=(4, 4), num_masked=6))


def _indices(loader, epoch, start=0):
    loader.set_epoch(epoch)
    loader.set_start_batch(start)
    return [int(i) for b in loader for i in b["index"]]


@pytest.mark.parametrize("task", ["tokenizer", "pretrain", "finetune"])
def test_folder_batches_follow_the_contract(demo_data, task):
    spec = AugmentSpec(64, task, tokenizer_size=32, mask=dict(grid=(4, 4), num_masked=6))
    loader = make_loader("folder", demo_data, spec, batch_size=8, seed=0)
    loader.set_epoch(0)
    b = next(iter(loader))
    assert b["label"].dtype == torch.int64 and b["label"].shape == (8,) and b["skipped"] == 0
    if task == "pretrain":
        assert b["patch"].shape == (8, 3, 64, 64) and b["tokenizer"].shape == (8, 3, 32, 32)
        assert b["mask"].dtype == torch.bool and b["mask"].flatten(1).sum(1).eq(6).all()
        assert -1 <= b["tokenizer"].min() and b["tokenizer"].max() <= 1
    else:
        img = b["image"]
        assert img.shape == (8, 3, 64, 64)
        if task == "tokenizer":
            assert -1 <= img.min() and img.max() <= 1
        else:  # ImageNet normalisation: values beyond [-1, 1] occur
            assert img.min() < -1.0 or img.max() > 1.0


def test_folder_mae_batches_have_one_view_and_exact_random_masks(demo_data):
    spec = AugmentSpec(64, "pretrain", tokenizer_size=0, mask=dict(kind="random", grid=(4, 4), num_masked=12))
    loader = make_loader("folder", demo_data, spec, batch_size=8, seed=0)
    loader.set_epoch(0)
    b = next(iter(loader))
    assert "tokenizer" not in b and b["patch"].shape == (8, 3, 64, 64)
    assert b["mask"].dtype == torch.bool and b["mask"].flatten(1).sum(1).eq(12).all()
    assert len({m.numpy().tobytes() for m in b["mask"]}) > 1


def test_folder_sharding_and_mid_epoch_resume(demo_data):
    ranks = [make_loader("folder", demo_data, SPEC2, batch_size=8, rank=r, world_size=2, seed=3) for r in range(2)]
    assert ranks[0].batches_per_epoch == ranks[1].batches_per_epoch == 300 // 16
    seen = [_indices(r, 1) for r in ranks]
    everything = seen[0] + seen[1]
    assert len(everything) == len(set(everything)) == 18 * 16  # each kept index once, drop-last
    assert _indices(ranks[0], 1, start=5) == seen[0][5 * 8:]  # resume continues exactly
    assert _indices(ranks[0], 2) != seen[0]  # a new permutation each epoch


def test_unknown_backend_is_one_line(demo_data):
    with pytest.raises(DataError, match="data backend 'beton' is unknown"):
        make_loader("beton", demo_data, SPEC2, batch_size=8)


def test_data_bench_runs_and_records(demo_data, tmp_path):
    out = tmp_path / "bench.jsonl"
    res = subprocess.run([sys.executable, "-m", "peco_scale.data.bench", "--backend", "folder", "--img_size", "64",
                          "--workers", "0", "--batch_size", "8", "--batches", "3", "--data", str(demo_data),
                          "--results", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    row = json.loads(out.read_text().splitlines()[-1])
    assert row["images"] == 24 and row["backend"] == "folder" and row["tokenizer_size"] == 64
    assert row["images_per_s"] == pytest.approx(24 / row["seconds"])
    assert np.isclose(row["images_per_s_per_core"] * row["cores"], row["images_per_s"])
    assert "images/s per core" in res.stdout


# ----------------------------------------------------------------------------- every image mode, every backend

IDENTITY = dict(scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0, jitter=0.0)  # whole image, same size: no resampling


@pytest.fixture(scope="module")
def mode_folder(tmp_path_factory):
    """One class folder holding one file per case of test_data_colour.mode_cases."""
    from test_data_colour import mode_cases

    cases = mode_cases()
    root = tmp_path_factory.mktemp("modes")
    (root / "x").mkdir()
    for name, (data, ext, _, _) in cases.items():
        (root / "x" / f"{name}.{ext}").write_bytes(data)
    return root, cases


def _check_modes(loader, root, cases):
    """One batch of the whole folder vs the numpy references, within one 8-bit level."""
    from peco_scale.data import scan_image_folder
    from test_data_colour import SIDE

    names = [Path(p).stem for p, _ in scan_image_folder(root)[0]]
    loader.set_epoch(0)
    b = next(iter(loader))
    got = ((b["image"].cpu().double() + 1) * 127.5).permute(0, 2, 3, 1).numpy()  # stage 1: [-1, 1] -> [0, 255]
    assert got.shape == (len(cases), SIDE, SIDE, 3) and b["skipped"] == 0
    seen = {}
    for k, i in enumerate(b["index"].tolist()):
        seen[names[i]] = float(np.abs(got[k] - cases[names[i]][3]).max())
    assert set(seen) == set(cases)
    bad = {n: d for n, d in seen.items() if d > 1.0 + 1e-3}
    assert not bad, bad


def test_every_mode_decodes_right_on_the_folder_backend(mode_folder):
    root, cases = mode_folder
    loader = make_loader("folder", root, AugmentSpec(32, "tokenizer", **IDENTITY), batch_size=len(cases), seed=0)
    _check_modes(loader, root, cases)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_every_mode_decodes_right_on_the_dali_backend(mode_folder, device):
    pytest.importorskip("nvidia.dali")
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    root, cases = mode_folder
    loader = make_loader("dali", root, AugmentSpec(32, "tokenizer", **IDENTITY), batch_size=len(cases), rank=0,
                         world_size=1, seed=0, workers=1, device=device)
    _check_modes(loader, root, cases)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # see test_data_ffcv.py
def test_every_mode_decodes_right_on_the_ffcv_backend(mode_folder, tmp_path):
    pytest.importorskip("ffcv")
    from peco_scale.data.ffcv_backend import write_beton

    root, cases = mode_folder
    beton = tmp_path / "modes.beton"
    stats = write_beton(root, beton, max_resolution=32, mode="raw", workers=1, progress=False)
    assert stats["written"] == len(cases) and stats["skipped"] == 0
    loader = make_loader("ffcv", beton, AugmentSpec(32, "tokenizer", **IDENTITY), batch_size=len(cases), seed=0)
    _check_modes(loader, root, cases)
