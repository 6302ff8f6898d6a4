"""Stage 3 end to end: fine-tuning under the deepspeed launcher (2 CPU ranks), EMA under ZeRO-3,
exact resume, export to timm, and the bad-input lines."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, config_line, flags, ok, read_metrics, resolve_argv, run_launch
from peco_scale.data import make_demo_dataset
from peco_scale.data.eval import EvalLoader
from peco_scale.train.finetune_config import FinetuneConfig, resolve_finetune
from peco_scale.models.transfer import build_classifier
from peco_scale.tools.export import consolidate, create_timm_model, export_checkpoint


@pytest.fixture(scope="module")
def pretrained(pretrain_run):
    """The session's tiny stage-2 run (conftest.pretrain_run), read only: the fine-tunes' --init."""
    return pretrain_run


def ft_args(data, val, init, out, **over):
    return flags({
        "deepspeed_config": str(ROOT / "ds_configs/finetune_zero3_vith448.json"), "model": "vit_pico_patch16",
        "img_size": 64, "init": str(init), "data": str(data), "val": str(val), "output_dir": str(out),
        "batch_size": 8, "global_batch": 16, "max_steps": 6, "train.log_every": 1, "train.ckpt_every": 3,
        "workers": 0, "lr": 2e-3, "optim.base_batch": 16, "optim.warmup_steps": 2, "model.drop_path": 0.1,
        "model.ema_decay": 0.9,
    }, over)


def test_ema_under_zero3_resume_and_zero2_agree(demo_data, val_data, pretrained, tmp_path):
    full, part, z2 = tmp_path / "full", tmp_path / "part", tmp_path / "z2"
    ok(run_launch("launch/finetune.py", ft_args(demo_data, val_data, pretrained, full), ranks=2, port=29561))
    ok(run_launch("launch/finetune.py", ft_args(demo_data, val_data, pretrained, part, max_steps=3), ranks=2,
                   port=29562))
    ok(run_launch("launch/finetune.py", ft_args(demo_data, val_data, pretrained, part, **{"train.resume": "auto"}),
                   ranks=2, port=29563))
    ok(run_launch("launch/finetune.py", ft_args(demo_data, val_data, pretrained, z2, **{"train.zero_stage": 2}),
                   ranks=2, port=29564))
    rows = {name: read_metrics(run) for name, run in (("full", full), ("part", part), ("z2", z2))}
    train = {k: [r for r in v if "loss" in r] for k, v in rows.items()}
    evals = {k: [r for r in v if "eval_top1" in r] for k, v in rows.items()}
    # the recipe is ZeRO-3 with EMA; mixup, cutmix and drop path draw from the RNG restored on resume
    assert [r["step"] for r in train["full"]] == list(range(1, 7))
    assert [r["loss"] for r in train["part"]] == [r["loss"] for r in train["full"]]
    # "Resumed equals uninterrupted" for best-model tracking: every value measured at a step both
    # runs evaluated is equal, and best_top1 is the best of ALL evaluations the run folder has seen.
    # "part" was first a finished 3-step run, so it also evaluated at step 3, which "full" never did:
    # its best is the higher of full's best and that step-3 top-1 (a stop signal adds no evaluation,
    # so a stopped run's best equals the uninterrupted run's: test_stop_signal_... checks that).
    measured = lambda r: {k: v for k, v in r.items() if k != "best_top1"}  # noqa: E731
    assert measured(evals["part"][-1]) == measured(evals["full"][-1]) and evals["full"][-1]["step"] == 6
    assert [r["step"] for r in evals["part"]] == [3, *[r["step"] for r in evals["full"]]]
    for run_evals in evals.values():
        assert all(r["best_top1"] == max(e["eval_top1"] for e in run_evals[:i + 1]) for i, r in enumerate(run_evals))
    assert evals["part"][-1]["best_top1"] == max(evals["full"][-1]["best_top1"], evals["part"][0]["eval_top1"])
    best = {run: (run / "checkpoints" / "best").read_text().strip() for run in (full, part)}
    for run, run_evals in ((full, evals["full"]), (part, evals["part"])):
        first_best = next(r["step"] for r in run_evals if r["eval_top1"] == run_evals[-1]["best_top1"])
        assert best[run] == f"step_{first_best:08d}", (best[run], run_evals)
    last = lambda run: run / "checkpoints" / "step_00000006"  # noqa: E731
    w_full, w_part = consolidate(last(full)), consolidate(last(part))
    assert all(torch.equal(w_full[k], w_part[k]) for k in w_full)
    ema_full, ema_part, ema_z2 = (load_file(str(last(r) / "ema.safetensors")) for r in (full, part, z2))
    assert ema_full.keys() == w_full.keys()
    assert all(torch.equal(ema_full[k], ema_part[k]) for k in ema_full)
    # ZeRO-3 keeps each rank's partition of the EMA; ZeRO-2 whole tensors: the same average
    for k in ema_full:
        torch.testing.assert_close(ema_full[k], ema_z2[k], atol=2e-5, rtol=0)
    assert abs(evals["full"][-1]["ema_eval_loss"] - evals["z2"][-1]["ema_eval_loss"]) < 1e-3
    # ... and it is an average, not the weights: it lags the trained head measurably
    assert (ema_full["head.weight"] - w_full["head.weight"]).abs().max() > 1e-3
    # the EMA export is the averaged classifier
    res = export_checkpoint(full, tmp_path / "ema.safetensors", ema=True)
    assert res["timm_kwargs"]["num_classes"] == 10


@pytest.mark.slow
def test_stop_signal_saves_exits_75_and_resume_matches(demo_data, val_data, pretrained, tmp_path):
    """SIGTERM mid fine-tune: a checkpoint at the step boundary, exit 75, no summary; ``--resume auto``
    then ends with the uninterrupted run's losses, evaluation, weights and EMA."""
    from peco_scale.engine.checkpoint import find_resume

    over = {"max_steps": 16, "train.ckpt_every": 1000}
    full, part = tmp_path / "full", tmp_path / "part"
    ok(run_launch("launch/finetune.py", ft_args(demo_data, val_data, pretrained, full, **over)))
    proc = subprocess.Popen([sys.executable, str(ROOT / "launch/finetune.py"),
                             *ft_args(demo_data, val_data, pretrained, part, **over)], cwd=ROOT,
                            env={**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not ((part / "metrics.jsonl").exists() and len([r for r in read_metrics(part) if "loss" in r]) >= 3):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("interrupted:")]
    assert len(lines) == 1 and "stopped by SIGTERM after step " in lines[0], err[-3000:]
    k = int(lines[0].split("after step ")[1].split()[0])
    assert 3 <= k < 16
    assert find_resume(part / "checkpoints") == part / "checkpoints" / f"step_{k:08d}"
    assert (full / "summary.json").exists() and not (part / "summary.json").exists()  # unfinished: no summary
    ok(run_launch("launch/finetune.py",
                   ft_args(demo_data, val_data, pretrained, part, **{**over, "train.resume": "auto"})))
    final = json.loads((part / "summary.json").read_text())["final"]
    assert isinstance(final["grad_norm"], float) and math.isfinite(final["grad_norm"])  # a number, not "tensor(...)"
    rows = {name: read_metrics(run) for name, run in (("full", full), ("part", part))}
    train = {n: [(r["step"], r["loss"]) for r in v if "loss" in r] for n, v in rows.items()}
    assert [s for s, _ in train["full"]] == list(range(1, 17))
    assert train["part"] == train["full"]
    evals = {n: [r for r in v if "eval_top1" in r] for n, v in rows.items()}
    assert evals["part"] == evals["full"] and evals["full"]
    last = lambda run: run / "checkpoints" / "step_00000016"  # noqa: E731
    w_full, w_part = consolidate(last(full)), consolidate(last(part))
    assert all(torch.equal(w_full[k], w_part[k]) for k in w_full)
    e_full, e_part = (load_file(str(last(r) / "ema.safetensors")) for r in (full, part))
    assert all(torch.equal(e_full[k], e_part[k]) for k in e_full)


def test_finetune_learns_the_demo_labels_and_exports_to_timm(tiny_tokenizer, pretrained, val_data, tmp_path):
    train = tmp_path / "train"
    make_demo_dataset(train, images_per_class=100, seed=2, max_size=128)
    out = tmp_path / "ft"
    res = ok(run_launch("launch/finetune.py", ft_args(
        train, val_data, pretrained, out, max_steps=0, epochs=8, lr=4e-3, **{
            "deepspeed_config": str(ROOT / "ds_configs/finetune_zero2_vitb.json"), "train.eval_every": 4,
            "data.mixup": 0, "data.cutmix": 0, "data.min_crop_scale": 0.35, "train.log_every": 50,
            "optim.warmup_steps": 20, "model.drop_path": 0.0, "train.ckpt_every": 10000}), ranks=2, port=29565))
    evals = [r for r in read_metrics(out) if "eval_top1" in r]
    assert [r["epoch"] for r in evals] == [4.0, 8.0] and all(r["eval_images"] == 200 for r in evals)
    # above chance by a one-sided binomial test on the 200 held-out images (chance: p = 0.1 per image);
    # a pico ViT learns these shape classes slowly (a plain torch loop on the same data: ~22% after 8 epochs)
    hits = round(evals[-1]["best_top1"] * 2)
    p_value = sum(math.comb(200, k) * 0.1**k * 0.9 ** (200 - k) for k in range(hits, 201))
    assert p_value < 1e-3, (evals, p_value)
    assert "chance 10.00%" in res.stdout
    best = (out / "checkpoints" / "best").read_text().strip()
    assert int(best.split("_")[1]) == max(evals, key=lambda r: r["eval_top1"])["step"]

    # export (layer scale folded) -> timm strict load -> the same logits and the same top-1
    exp = export_checkpoint(out, tmp_path / "cls.safetensors")
    timm_model = create_timm_model(exp["backbone"]).eval()
    folder = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
    state = json.loads((folder / "state.json").read_text())
    ref = build_classifier("vit_pico_patch16", 64, 10, drop_path=0.0,
                           layer_scale=0.1 if state["model"]["layer_scale"] else None)
    ref.load_state_dict(consolidate(folder), strict=True)
    ref.eval()
    loader = EvalLoader(val_data, 64, batch_size=50)
    hits = 0
    with torch.no_grad():
        for batch in loader:
            a, b = timm_model(batch["image"]), ref(batch["image"])
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
            hits += int((a.argmax(1) == batch["label"]).sum())
    assert hits / 2 == evals[-1]["eval_top1"]


def test_bad_inputs_are_one_clear_line(demo_data, val_data, pretrained, tmp_path):
    base = ft_args(demo_data, val_data, pretrained, tmp_path / "x")
    r = resolve_argv(resolve_finetune, FinetuneConfig, base)
    assert r.num_classes == 10 and r.layer_decay == 0.8 and r.grad_accum == 2  # H/448 recipe decay; 16 / (8 x 1 rank)

    def line(extra, *words):
        config_line(resolve_finetune, FinetuneConfig, base + extra, *words)

    line(["--img_size", "72"], "72", "not divisible", "position embeddings", "64 or 80")
    line(["--model.num_classes", "7"], "num_classes=7", "10 classes")
    line(["--val", ""], "--val")
    line(["--batch_size", "7", "--global_batch", "14"], "even micro-batch", "batch_size=7")
    line(["--init", str(tmp_path / "missing")], "missing", "does not exist")
    other = tmp_path / "other"
    (other / "a").mkdir(parents=True)
    (other / "b").mkdir()
    for c in ("a", "b"):
        (other / c / "x.png").write_bytes((demo_data / "train" / "circles").iterdir().__next__().read_bytes())
    line(["--val", str(other)], "classes", "differ")
    # an architecture that does not match the checkpoint: through the launcher, one line, exit 2
    res = run_launch("launch/finetune.py", base + ["--model", "vit_tiny_patch16"])
    assert res.returncode == 2, res.stderr[-3000:]
    err = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "does not match the model's architecture" in err[0] and "missing" in err[0], res.stderr[-2000:]
