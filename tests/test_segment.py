"""Segmentation transfer for real: 2 ranks under the deepspeed launcher on the dense demo data
(ZeRO-3), evaluation gathered over ranks, exact resume, --eval_only and export, bad input as one
line."""

import json

import pytest

from conftest import (ROOT, config_line, dense_args, export_cli, folder_files, ok, read_metrics, resolve_argv,
                      rewound_copy, rows_match, run_launch)
from peco_scale.data.dense_demo import make_dense_demo
from peco_scale.train.config import config_from_argv
from peco_scale.train.segment_config import SegmentConfig, resolve_segment


def seg_args(data, out, **over):
    return dense_args(data, out, "segment_zero2_vitb.json", {
        "crop": 64, "data.num_classes": 4, "batch_size": 4, "global_batch": 8, "max_steps": 6, "train.eval_every": 3,
        "train.ckpt_every": 3, "model.channels": 32, "data.eval_stride": 43, "optim.base_batch": 8}, over)


ZERO3 = {"deepspeed_config": str(ROOT / "ds_configs/segment_zero3_vitl.json"), "max_steps": 60, "train.eval_every": 30,
         "train.ckpt_every": 30, "lr": 2e-3, "model.drop_path": 0.0, "model.layer_decay": 1.0}


@pytest.fixture(scope="module")
def two_rank_run(dense_data, tmp_path_factory):
    """60 steps of the ViT-L recipe's ZeRO-3 code path with a pico backbone on 2 ranks, evaluated
    at steps 30 and 60, checkpoints at 30 and 60."""
    out = tmp_path_factory.mktemp("seg") / "run"
    res = ok(run_launch("launch/segment.py", seg_args(dense_data, out, **ZERO3), ranks=2, port=29591))
    (out / "launch.log").write_text(res.stdout)
    return out


@pytest.mark.slow
def test_two_ranks_learn_evaluate_and_resume_exactly(dense_data, two_rank_run, tmp_path):
    """The training loss falls, the held-out mIoU ends above what predicting the majority class
    everywhere scores, every evaluation covers the whole validation split, and a run resumed at
    step 30 gives back the rest."""
    import numpy as np
    from PIL import Image

    assert "ZeRO 3" in (two_rank_run / "launch.log").read_text()
    rows = read_metrics(two_rank_run)
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_mIoU" in r]
    assert [r["step"] for r in train] == list(range(1, 61))
    losses = [r["loss"] for r in train]
    assert sum(losses[-2:]) / 2 < 0.85 * losses[0], losses  # measured 0.66 (torch 2.14.1)
    assert [r["step"] for r in evals] == [30, 60] and all(r["eval_images"] == 6 for r in evals)  # both ranks' shares
    for r in evals:
        assert 0 <= r["eval_mIoU"] <= 100 and set(r["eval_IoU"]) == {"0", "1", "2", "3"}
    # predicting the majority class (background) everywhere scores its pixel share as its IoU and
    # 0 for the 3 shapes: mIoU = share / 4 (21.3% here; the run measured 28.6%)
    labels = np.concatenate([np.asarray(Image.open(p)).ravel()
                             for p in sorted((dense_data / "annotations" / "validation").glob("*.png"))])
    share = float((labels[labels != 0] == 1).mean())
    assert evals[-1]["eval_mIoU"] > 100 * share / 4 + 3, (evals[-1]["eval_mIoU"], share)
    best = (two_rank_run / "checkpoints" / "best").read_text().strip()
    assert best == f"step_{max(evals, key=lambda r: (r['eval_mIoU'], -r['step']))['step']:08d}"
    summary = json.loads((two_rank_run / "summary.json").read_text())
    assert summary["best"]["mIoU"] == pytest.approx(evals[-1]["best_mIoU"])

    part = rewound_copy(two_rank_run, tmp_path / "part", 30)
    res = ok(run_launch("launch/segment.py", seg_args(dense_data, part, **ZERO3, **{"train.resume": "auto"}),
                        ranks=2, port=29592))
    assert "resumed from" in res.stdout and "step_00000030" in res.stdout
    rows_match(two_rank_run, part, ("loss", "decode_loss", "aux_loss", "eval_mIoU", "eval_aAcc"))


@pytest.mark.slow
def test_eval_only_and_export_reproduce_the_best_evaluation(dense_data, two_rank_run, tmp_path):
    """--eval_only on the run scores its best checkpoint again on 2 ranks, touching nothing in the
    run folder; the exported segmenter, loaded in one process without DeepSpeed, scores the same."""
    import torch
    import torch.nn.functional as F

    from peco_scale.data.segmentation import eval_samples
    from peco_scale.metrics.segmentation import confusion_matrix, segmentation_scores
    from peco_scale.models.dense import slide_logits
    from peco_scale.tools.export import load_dense

    best_step = json.loads((two_rank_run / "summary.json").read_text())["best"]["step"]
    best = next(r for r in read_metrics(two_rank_run) if "eval_mIoU" in r and r["step"] == best_step)
    before = folder_files(two_rank_run)
    res = ok(run_launch("launch/segment.py", seg_args(dense_data, tmp_path / "ev", **ZERO3,
                                                      eval_only=str(two_rank_run)), ranks=2, port=29594))
    assert "eval: mIoU" in res.stdout
    again = json.loads((tmp_path / "ev" / f"eval_step_{best_step:08d}.json").read_text())
    for key in ("eval_mIoU", "eval_aAcc", "eval_mAcc"):
        assert again[key] == pytest.approx(best[key], rel=1e-6, abs=1e-6), key
    assert folder_files(two_rank_run) == before

    res = export_cli(str(two_rank_run), "--best", "--out", str(tmp_path / "s.safetensors"))
    assert res.returncode == 0 and "segment model" in res.stdout, res.stderr[-2000:]
    model, meta = load_dense(tmp_path / "s.safetensors")
    conf = torch.zeros(4, 4, dtype=torch.int64)
    with torch.no_grad():
        for _, image, label in eval_samples(dense_data, "validation", meta["crop"]):
            logits = slide_logits(model, image, 4, meta["crop"], 43)
            logits = F.interpolate(logits, size=tuple(label.shape), mode="bilinear", align_corners=False)
            conf += confusion_matrix(logits.argmax(1)[0], label, 4)
    assert 100 * segmentation_scores(conf)["mIoU"] == pytest.approx(best["eval_mIoU"], rel=1e-6, abs=1e-6)


def test_bad_inputs_are_one_clear_line(dense_data, tmp_path):
    base = seg_args(dense_data, tmp_path / "x")
    r = resolve_argv(resolve_segment, SegmentConfig, base)
    assert r.blocks == (0, 1, 2, 3) and r.layer_decay == 0.65 and r.grad_accum == 2

    def line(extra, *words):
        config_line(resolve_segment, SegmentConfig, base + extra, *words)

    line(["--crop", "70"], "not divisible by the patch size 16")
    line(["--model.blocks", "[0, 1, 5, 2]"], "must be increasing indices in 0..3")
    line(["--data.eval_stride", "100"], "data.eval_stride=100 must be in 1..64")
    line(["--data", str(tmp_path / "none")], "does not exist", "ADE20K layout")
    line(["--init", str(tmp_path / "missing")], "does not exist")
    line(["--data.backend", "ffcv"], "folder only")
    bad = tmp_path / "bad"
    make_dense_demo(bad, train_images=3, val_images=2, min_size=64, max_size=64)
    (bad / "annotations" / "validation" / "scene_00001.png").unlink()
    line(["--data", str(bad)], "1 of 2 images", "no annotation PNG", "scene_00001.jpg")
    # too few classes for the labels: one line from the launcher, before any process group
    res = run_launch("launch/segment.py", seg_args(dense_data, tmp_path / "y", **{"data.num_classes": 2}))
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert res.returncode == 2 and len(errors) == 1 and "above the 2 classes" in errors[0], res.stderr[-2000:]


def test_init_from_a_pretrain_run_loads_the_backbone(dense_data, pretrain_run, tmp_path):
    """--init with a stage-2 run: the segmenter's ViT holds the run's consolidated backbone weights
    (the pre-training norm, head and mask token dropped); neck and heads stay freshly initialised."""
    import torch

    from peco_scale.engine.weights import consolidate
    from peco_scale.train.segment import SegmentStage

    cfg, ds_dict = config_from_argv(seg_args(dense_data, tmp_path / "x", init=str(pretrain_run)), SegmentConfig)
    stage = SegmentStage(cfg, ds_dict)
    stage.check(1)
    stage.build_models()
    assert stage.info["kind"] != "random" and stage.info["loaded"] > 0
    saved = consolidate(pretrain_run / "checkpoints" / "step_00000006")
    vit = stage.model.backbone.vit.state_dict()
    torch.testing.assert_close(vit["blocks.3.mlp.fc2.weight"], saved["backbone.blocks.3.mlp.fc2.weight"])
    torch.testing.assert_close(vit["patch_embed.proj.weight"], saved["backbone.patch_embed.proj.weight"])
