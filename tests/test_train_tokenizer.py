"""Stage-1 training for real: learning on the demo data, exact resume, 2 ranks under DeepSpeed."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ok, read_metrics, rewound_copy, run_launch, tiny_args
from peco_scale.models.artifact import load_tokenizer


@pytest.mark.slow
def test_training_learns_on_demo_data(demo_data, tmp_path):
    """Reconstruction loss falls and codebook usage rises over a short run (40 steps at 64 px and
    the demo's lr 1e-3, a row every 5 steps)."""
    out = tmp_path / "run"
    res = ok(run_launch("launch/train_tokenizer.py",
                        tiny_args(demo_data, out, **{"data.img_size": 64, "train.batch_size": 16, "train.max_steps": 40,
                                                     "train.log_every": 5, "train.ckpt_every": 1000,
                                                     "optim.warmup_steps": 5})))
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == list(range(5, 41, 5))
    for key in ("step", "loss", "rec_loss", "percep_loss", "codebook_usage", "perplexity", "images_per_s"):
        assert all(key in r for r in rows), key
    first, last = rows[0], rows[-1]
    # measured on an AMD EPYC, torch 2.14.1: rec_loss 0.80 x the first row, loss 0.79 x, codebook usage
    # 0.41 -> 0.92 (at the old fixture lr 1e-2 the same machine gave 0.89 x and +0.05: too noisy)
    assert np.mean([r["rec_loss"] for r in rows[-3:]]) < 0.9 * first["rec_loss"], rows
    assert np.mean([r["loss"] for r in rows[-3:]]) < first["loss"], rows
    assert last["codebook_usage"] > first["codebook_usage"] + 0.1, rows
    assert 0 < last["codebook_usage"] <= 1
    assert "RANDOM INIT" in res.stdout + res.stderr  # the log says which perceptual network was used
    tok = load_tokenizer(out / "tokenizer.safetensors")
    assert tok.quant_cfg.codebook_size == 1024
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model"]["preset"] == "tiny"


@pytest.mark.slow
def test_resume_reproduces_losses(demo_data, tmp_path):
    """Resumed at step 3, while the k-means init is still gathering vectors (it needs 8 batches
    here: 1024 codes, 32 vectors per batch), and run past the init to step 10: the same losses and
    weights as the run that went through."""
    full = tmp_path / "full"
    ok(run_launch("launch/train_tokenizer.py", tiny_args(demo_data, full, **{"train.max_steps": 10,
                                                                              "train.keep_last": 4})))
    part = rewound_copy(full, tmp_path / "part", 3)
    assert (part / "checkpoints" / "step_00000003" / "kmeans_pool_rank0.pt").is_file()
    # a save killed midway: a newer folder without COMPLETE must be ignored by resume
    (part / "checkpoints" / "step_00000005").mkdir()
    res = run_launch("launch/train_tokenizer.py", tiny_args(demo_data, part, **{"train.resume": "auto",
                                                                               "train.max_steps": 10}))
    ok(res)
    assert "resumed from" in res.stdout and "step_00000003" in res.stdout
    a, b = read_metrics(full), read_metrics(part)
    assert [r["step"] for r in b] == list(range(1, 11))
    assert not (full / "checkpoints" / "step_00000009" / "kmeans_pool_rank0.pt").exists()  # initialised by then
    for ra, rb in zip(a, b):
        for key in ("loss", "rec_loss", "percep_loss", "perplexity", "codebook_usage"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-5, abs=1e-7), (ra["step"], key)
    ta, tb = load_tokenizer(full / "tokenizer.safetensors"), load_tokenizer(part / "tokenizer.safetensors")
    for (k, va), vb in zip(ta.state_dict().items(), tb.state_dict().values()):
        torch.testing.assert_close(va, vb, rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.slow
def test_two_ranks_deepspeed_keep_one_codebook(demo_data, tmp_path):
    """2 ranks (gloo) under the deepspeed launcher, ZeRO-2; corrupt files are skipped and counted."""
    data = tmp_path / "data"
    import shutil

    shutil.copytree(demo_data, data)
    bad = data / "train" / "circles"
    (bad / "zz_truncated.jpg").write_bytes((bad / sorted(p.name for p in bad.iterdir())[0]).read_bytes()[:200])
    (bad / "zz_text.jpg").write_text("not a jpeg")
    out = tmp_path / "run"
    res = run_launch("launch/train_tokenizer.py",
                     tiny_args(data, out, **{"train.max_steps": 20, "train.log_every": 10, "train.ckpt_every": 10,
                                             "train.zero_stage": 2, "quantizer.dead_code_steps": 3,
                                             "train.batch_size": 16}), ranks=2)
    ok(res)
    rows = read_metrics(out)
    assert rows[-1]["step"] == 20 and all(r["codebook_in_sync"] for r in rows), rows
    # 20 steps x 16 images x 2 ranks = 640 draws from 302 files, so both corrupt files were hit
    assert rows[-1]["skipped_images"] >= 2
    ckpt = out / "checkpoints" / "step_00000020" / "model"
    assert sorted(p.name for p in ckpt.glob("zero_pp_rank_*")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]


@pytest.mark.slow
def test_quantizer_two_ranks_equal_one_process(tmp_path):
    """EMA statistics all-reduced over 2 ranks == one process seeing both ranks' data."""
    res = run_launch("tests/dist_quantizer.py", ["--out", str(tmp_path)], ranks=2, port=29533)
    ok(res)
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    for key in ("codebook", "restart_codebook"):
        assert torch.equal(r0[key], r1[key]), key  # every rank holds one codebook
    from dist_quantizer import run_single

    single = run_single()
    torch.testing.assert_close(r0["codebook"], single, rtol=1e-5, atol=1e-5)
    assert not torch.equal(r0["restart_codebook"], r0["restart_init"])  # restarts happened


def test_tokenize_command(demo_data, tmp_path):
    torch.manual_seed(0)
    from peco_scale.train.tokenizer_config import tokenizer_config
    from peco_scale.models.artifact import save_tokenizer
    from peco_scale.models.tokenizer import VQTokenizer
    from peco_scale.tools.tokenize import main

    cfg = tokenizer_config(None, {"model.preset": "tiny"})
    model = VQTokenizer(cfg.model, cfg.quantizer)
    save_tokenizer(model, tmp_path / "tok.safetensors")
    Image.new("RGB", (10, 10)).save(tmp_path / "x.png")
    data = tmp_path / "imgs"
    (data / "a").mkdir(parents=True)
    for i, p in enumerate(sorted((demo_data / "train" / "dots").iterdir())[:5]):
        (data / "a" / p.name).write_bytes(p.read_bytes())
    (data / "a" / "broken.jpg").write_bytes(b"\xff\xd8garbage")
    assert main(["--tokenizer", str(tmp_path / "tok.safetensors"), "--data", str(data), "--out",
                 str(tmp_path / "t.npz"), "--img_size", "32", "--workers", "0"]) == 0
    z = np.load(tmp_path / "t.npz")
    assert z["tokens"].shape == (5, 2, 2) and len(z["paths"]) == 5
    # the same ids as calling the tokenizer directly on the first image
    from peco_scale.data import tokenizer_transform

    x = tokenizer_transform(32, train=False)(Image.open(z["paths"][0]).convert("RGB"))[None]
    assert np.array_equal(load_tokenizer(tmp_path / "tok.safetensors").tokenize(x)[0].numpy(), z["tokens"][0])


@pytest.mark.slow
def test_discriminator_joins_at_start_step(demo_data, tmp_path):
    out = tmp_path / "run"
    ok(run_launch("launch/train_tokenizer.py",
                   tiny_args(demo_data, out, **{"disc.enabled": "true", "disc.start_step": 2, "train.max_steps": 4,
                                                "train.ckpt_every": 4})))
    rows = read_metrics(out)
    assert all("d_loss" not in r and "g_loss" not in r for r in rows[:2])
    assert all(np.isfinite(r["d_loss"]) and np.isfinite(r["g_loss"]) for r in rows[2:])
    assert (out / "checkpoints" / "step_00000004" / "disc").is_dir()


def test_hinge_losses():
    from peco_scale.models.discriminator import PatchDiscriminator, hinge_d_loss, hinge_g_loss

    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 1.0])
    # by hand: relu(1 - real) = [0, .5, 2] -> mean 5/6; relu(1 + fake) = [0, 1, 2] -> mean 1
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (5 / 6 + 1))
    assert hinge_g_loss(fake).item() == pytest.approx(1 / 3)
    assert PatchDiscriminator()(torch.randn(2, 3, 64, 64)).shape == (2, 1, 6, 6)


def test_non_finite_loss_stops_with_step(demo_data, tmp_path):
    out = tmp_path / "run"
    res = run_launch("launch/train_tokenizer.py", tiny_args(demo_data, out, **{"loss.perceptual_weight": ".nan"}))
    assert res.returncode == 3, res.stderr[-2000:]
    assert "non-finite loss nan at step 1" in res.stderr
    assert not (out / "checkpoints" / "latest").exists()


def test_wandb_run_id_survives_a_resume(demo_data, tmp_path, monkeypatch):
    """Stage 1 logs to wandb (offline without a key) on rank 0, keeps the run id in its
    checkpoints and continues the same run after a resume."""
    import json
    import os

    pytest.importorskip("wandb", reason="wandb is an optional extra (installed by `make test` through .[dev])")
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    monkeypatch.setattr(os, "environ", {**env, "WANDB_SILENT": "true"})
    out = tmp_path / "run"
    ok(run_launch("launch/train_tokenizer.py", tiny_args(demo_data, out, **{"train.max_steps": 3,
                                                                             "train.wandb": "true"})))
    first = json.loads((out / "checkpoints" / "step_00000003" / "state.json").read_text())["wandb_id"]
    res = run_launch("launch/train_tokenizer.py", tiny_args(demo_data, out, **{"train.resume": "auto",
                                                                              "train.wandb": "true"}))
    ok(res)
    assert "wandb: offline mode" in res.stdout
    again = json.loads((out / "checkpoints" / "step_00000006" / "state.json").read_text())["wandb_id"]
    assert first and again == first
    assert len(list((out / "wandb").glob(f"offline-run-*-{first}"))) == 2  # one per start, one run id
