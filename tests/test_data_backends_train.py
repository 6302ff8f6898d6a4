"""Stage 2 trains on every data backend; the converter CLI; resume is exact on DALI too."""

import json
import subprocess
import sys

import pytest

from conftest import ROOT, ok, pretrain_args, read_metrics, rewound_copy, run_launch


def test_convert_cli_writes_skips_and_reuses(demo_data, tmp_path):
    pytest.importorskip("ffcv")
    import shutil

    tree = tmp_path / "tree"
    shutil.copytree(demo_data, tree)
    victim = sorted((tree / "train" / "circles").glob("*.jpg"))[0]
    victim.write_bytes(victim.read_bytes()[:200])  # truncated JPEG
    out = tmp_path / "d.beton"
    cmd = [sys.executable, "-m", "peco_scale.data", "convert", "--to", "ffcv", "--data", str(tree), "--out", str(out),
           "--max_resolution", "96"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "299 images in 10 classes, 1 unreadable skipped" in res.stdout
    meta = json.loads((tmp_path / "d.beton.json").read_text())
    assert meta["count"] == 299 and meta["skipped"] == 1 and meta["max_resolution"] == 96
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "up to date" in again.stdout
    bad = subprocess.run(cmd[:-4] + ["--data", str(tree)], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "needs --out" in bad.stderr


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["ffcv", "dali"])
def test_pretrain_on_backend(backend, demo_data, tiny_tokenizer, tmp_path):
    pytest.importorskip({"ffcv": "ffcv", "dali": "nvidia.dali"}[backend])
    data = demo_data
    if backend == "ffcv":
        from peco_scale.data.ffcv_backend import write_beton

        data = tmp_path / "demo.beton"
        write_beton(demo_data, data, max_resolution=128)
    out = tmp_path / "run"
    res = run_launch("launch/pretrain.py", pretrain_args(data, tiny_tokenizer, out, **{
        "data.backend": backend, "max_steps": 4, "workers": 1}), ranks=2, port=29551 if backend == "ffcv" else 29552)
    ok(res)
    assert f"data: {backend} backend" in res.stdout
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(r["loss"] > 0 for r in rows)


@pytest.mark.slow
def test_resume_is_exact_on_dali(demo_data, tiny_tokenizer, tmp_path):
    pytest.importorskip("nvidia.dali")
    extra = {"data.backend": "dali", "workers": 1, "max_steps": 4, "train.ckpt_every": 2}
    full = tmp_path / "full"
    ok(run_launch("launch/pretrain.py", pretrain_args(demo_data, tiny_tokenizer, full, **extra)))
    part = rewound_copy(full, tmp_path / "part", 2)
    ok(run_launch("launch/pretrain.py", pretrain_args(demo_data, tiny_tokenizer, part, **{**extra, "train.resume": "auto"})))
    a, b = read_metrics(full), read_metrics(part)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5), ra["step"]
