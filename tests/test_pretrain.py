"""Stage 2 for real: 2 ranks under ZeRO-3 through the `deepspeed` launcher, resume, export to timm,
and every bad-input error as users meet it (one `error:` line, exit 2, before any launch cost)."""

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file

from conftest import ok, pretrain_args, read_metrics, rewound_copy, run_launch
from peco_scale.config import ConfigError
from peco_scale.train.config import config_from_argv
from peco_scale.train.pretrain_config import PretrainConfig, resolve_pretrain
from peco_scale.models.artifact import load_tokenizer, save_tokenizer
from peco_scale.models.vit import VIT_PRESETS, MaskedViT
from peco_scale.tools.export import create_timm_model, export_checkpoint


@pytest.mark.slow
def test_zero3_two_ranks_learns_and_exports_to_timm(demo_data, tiny_tokenizer, tmp_path):
    """The ViT-H recipe's code path (ZeRO-3, leaf blocks) with a pico backbone on 2 CPU ranks."""
    out = tmp_path / "run"
    res = run_launch("launch/pretrain.py",
                     pretrain_args(demo_data, tiny_tokenizer, out, **{"max_steps": 80, "train.log_every": 10,
                                                                      "train.ckpt_every": 40, "batch_size": 16,
                                                                      "global_batch": 32, "optim.base_batch": 32,
                                                                      "optim.warmup_steps": 10,
                                                                      "model.drop_path": 0.0}),
                     ranks=2, port=29541)
    ok(res)
    assert "ZeRO 3" in res.stdout and "ZeRO-3 leaf blocks 4 " in res.stdout
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == list(range(10, 81, 10))
    for key in ("step", "loss", "mlm_acc", "lr", "grad_norm", "images_per_s", "tflops_per_gpu", "mem_gb"):
        assert all(isinstance(r[key], (int, float)) for r in rows), key
    vocab = load_tokenizer(tiny_tokenizer).quant_cfg.codebook_size
    final = np.mean([r["loss"] for r in rows[-2:]])
    assert rows[0]["loss"] > final
    assert final < math.log(vocab) - 1.0, rows  # well below chance
    assert rows[-1]["mlm_acc"] > 5.0 / vocab
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert ckpts == ["step_00000040", "step_00000080"]

    # export: consolidated ZeRO-3 shards -> timm strict load, same features as our backbone
    res_exp = export_checkpoint(out, tmp_path / "backbone.safetensors")
    model = create_timm_model(res_exp["backbone"]).eval()
    mim = load_file(res_exp["mim"])
    assert set(mim) == {"head.weight", "head.bias", "backbone.mask_token"}
    assert mim["head.weight"].shape == (vocab, 128)
    ours = MaskedViT(VIT_PRESETS["vit_pico_patch16"], 64, drop_path=0.0).eval()
    from peco_scale.tools.export import consolidate
    sd = {k[len("backbone."):]: v for k, v in consolidate(out / "checkpoints" / "step_00000080").items()
          if k.startswith("backbone.")}
    ours.load_state_dict(sd, strict=True)  # unfolded layer scale
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x)[:, 1:], ours(x), rtol=1e-4, atol=1e-4)
        assert not torch.allclose(ours(x), MaskedViT(VIT_PRESETS["vit_pico_patch16"], 64).eval()(x))  # trained
    assert timm.create_model("vit_tiny_patch16_224", pretrained=False, **res_exp["timm_kwargs"]).load_state_dict(
        load_file(res_exp["backbone"]), strict=True) is not None


@pytest.fixture(scope="module")
def two_rank_run(demo_data, tiny_tokenizer, tmp_path_factory) -> Path:
    """6 steps on 2 ranks under ZeRO-3, checkpoints at 3 and 6; the tests below resume copies of it."""
    out = tmp_path_factory.mktemp("two_ranks") / "run"
    ok(run_launch("launch/pretrain.py", pretrain_args(demo_data, tiny_tokenizer, out), ranks=2, port=29542))
    return out


@pytest.mark.slow
def test_resume_reproduces_losses_and_refuses_other_tokenizer(demo_data, tiny_tokenizer, two_rank_run, tmp_path):
    full = two_rank_run
    part = rewound_copy(full, tmp_path / "part", 3)
    # a save killed midway: a newer folder without COMPLETE must be ignored by resume
    (part / "checkpoints" / "step_00000005").mkdir()
    other = tmp_path / "other_tokenizer.safetensors"
    save_tokenizer(load_tokenizer(tiny_tokenizer), other, extra={"note": "a different artifact"})
    res = run_launch("launch/pretrain.py", pretrain_args(demo_data, other, part, **{"train.resume": "auto"}))
    assert res.returncode == 2 and "error:" in res.stderr and "tokenizer" in res.stderr, res.stderr[-2000:]
    assert len([ln for ln in res.stderr.splitlines() if ln.startswith("error:")]) == 1
    res = run_launch("launch/pretrain.py", pretrain_args(demo_data, tiny_tokenizer, part, **{"train.resume": "auto"}),
                     ranks=2, port=29544)
    ok(res)
    assert "resumed from" in res.stdout and "step_00000003" in res.stdout
    a, b = read_metrics(full), read_metrics(part)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    for ra, rb in zip(a, b):
        for key in ("loss", "mlm_acc", "grad_norm", "lr"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-5, abs=1e-6), (ra["step"], key)
    wa = load_file(export_checkpoint(full, tmp_path / "a.safetensors")["backbone"])
    wb = load_file(export_checkpoint(part, tmp_path / "b.safetensors")["backbone"])
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6, msg=k)


# -- bad input: each gives one clear line before anything expensive ---------------------------


def _resolve(argv):
    cfg, _ = config_from_argv(argv, PretrainConfig)
    return resolve_pretrain(cfg)


def test_bad_inputs_are_one_clear_line(demo_data, tiny_tokenizer, tmp_path):
    base = pretrain_args(demo_data, tiny_tokenizer, tmp_path / "x")
    assert _resolve(base).grid == (4, 4)
    cases = {
        "not divisible by the patch size 16": ["--img_size", "70"],
        "token grid 8x8 (data.tokenizer_img_size=128": ["--data.tokenizer_img_size", "128"],
        "not found": ["--tokenizer", str(tmp_path / "missing.safetensors")],
        "model.vocab=8192 but tokenizer": ["--model.vocab", "8192"],
        "x gradient accumulation 3 x world size 1 = 24, but the train batch size is 16": ["--grad_accum", "3"],
        "not divisible by micro-batch 5": ["--batch_size", "5"],
        "unknown model 'vit_gigantic_patch14'": ["--model", "vit_gigantic_patch14"],
    }
    for expected, extra in cases.items():
        with pytest.raises(ConfigError, match=None) as info:
            _resolve(base + extra)
        msg = str(info.value)
        assert expected in msg and "\n" not in msg, (expected, msg)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 100)
    with pytest.raises(ConfigError, match="unreadable"):
        _resolve(base + ["--tokenizer", str(garbage)])


def test_bad_input_through_the_launcher(demo_data, tiny_tokenizer, tmp_path):
    """As a user sees it: exit 2 and one `error:` line, for a resolve-time and a data-time error."""
    empty = tmp_path / "empty"
    (empty / "class_a").mkdir(parents=True)
    for extra, expected in ((["--img_size", "70"], "not divisible"), (["--data", str(empty)], "contains no images")):
        res = run_launch("launch/pretrain.py", pretrain_args(demo_data, tiny_tokenizer, tmp_path / "y") + extra)
        assert res.returncode == 2, res.stderr[-2000:]
        errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1 and expected in errors[0], res.stderr[-2000:]
        assert "Traceback" not in res.stderr
    assert not (tmp_path / "y" / "checkpoints").exists()
    shutil.rmtree(empty)


def test_bench_step_runs_and_records(tmp_path):
    """The step benchmark on CPU: a tiny model, one JSON row whose numbers are consistent."""
    import json
    import subprocess
    import sys

    from conftest import ROOT
    from peco_scale.tools.plan import mim_train_flops

    out = tmp_path / "bench.jsonl"
    res = subprocess.run([sys.executable, str(ROOT / "launch/bench_step.py"), "--model", "vit_pico_patch16", "--img_size",
                          "64", "--batch_size", "8", "--steps", "3", "--warmup", "1", "--tokenizer_preset", "tiny",
                          "--results", str(out)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "img/s" in res.stdout and "MFU" in res.stdout
    row = json.loads(out.read_text().splitlines()[-1])
    flops = mim_train_flops(VIT_PRESETS["vit_pico_patch16"], 64, vocab=1024, num_masked=6)["model"]
    assert row["images_per_s"] == pytest.approx(8 / row["step_s"])
    assert row["tflops"] == pytest.approx(flops * row["images_per_s"] / 1e12)
    assert 0 < row["mfu"] < 1 and 0 < row["tokenizer_share"] < 1 and row["peak_mem_gb"] > 0


@pytest.mark.slow
def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(demo_data, tiny_tokenizer, two_rank_run, tmp_path):
    """Resume at step 3 with an absurd learning rate (1e38): step 4's update blows the weights up to
    ~1e38 (its loss is still finite) and step 5's forward overflows to a NaN loss."""
    out = rewound_copy(two_rank_run, tmp_path / "run", 3)
    ckpts = out / "checkpoints"
    # the NaN loss at step 5 stops both ranks; the next save (step 6) never happens
    res = run_launch("launch/pretrain.py", pretrain_args(demo_data, tiny_tokenizer, out, **{
        "train.resume": "auto", "lr": "1e38"}), ranks=2, port=29546)
    assert res.returncode != 0, res.stderr[-2000:]
    errors = [ln for ln in res.stderr.splitlines() if "error: " in ln]
    assert len(errors) == 1 and "non-finite loss nan at step 5" in errors[0], res.stderr[-2000:]  # rank 0 only
    assert (ckpts / "latest").read_text().strip() == "step_00000003"
    assert (ckpts / "step_00000003" / "COMPLETE").is_file() and not (ckpts / "step_00000006").exists()
    # resuming a 2-rank ZeRO checkpoint on 1 rank: a clear line, not DeepSpeed's traceback
    res = run_launch("launch/pretrain.py", pretrain_args(demo_data, tiny_tokenizer, out, **{"train.resume": "auto"}))
    assert res.returncode == 2 and "written by 2 ranks" in res.stderr and "Traceback" not in res.stderr, \
        res.stderr[-2000:]


def test_weights_are_checked_before_a_save():
    """A poisoned update with a finite loss must not become the newest checkpoint."""
    from peco_scale.engine.common import NonFiniteLoss, stop_if_weights_nonfinite

    m = torch.nn.Linear(4, 3)
    stop_if_weights_nonfinite(m, 7, "ckpts", torch.device("cpu"))  # finite: no error
    with torch.no_grad():
        m.bias[1] = float("inf")
    with pytest.raises(NonFiniteLoss, match="non-finite weights after step 7; that checkpoint was not written"):
        stop_if_weights_nonfinite(m, 7, "ckpts", torch.device("cpu"))


def test_wandb_offline_run_id_is_kept_in_checkpoints(demo_data, tiny_tokenizer, tmp_path, monkeypatch):
    import json
    import os

    pytest.importorskip("wandb", reason="wandb is an optional extra (installed by `make test` through .[dev])")
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    monkeypatch.setattr(os, "environ", {**env, "WANDB_SILENT": "true"})
    res = run_launch("launch/pretrain.py", pretrain_args(demo_data, tiny_tokenizer, out, **{
        "max_steps": 2, "train.ckpt_every": 2, "train.wandb": "true"}))
    ok(res)
    assert "wandb: offline mode" in res.stdout
    state = json.loads((out / "checkpoints" / "step_00000002" / "state.json").read_text())
    run_id = state["wandb_id"]
    assert run_id and list((out / "wandb").glob(f"offline-run-*-{run_id}"))
    # the picture of the last step goes to wandb too (the run's default image_every: the last step)
    assert (out / "images" / "step_00000002.png").is_file()
    assert list((out / "wandb").glob(f"offline-run-*-{run_id}/files/media/images/predictions_2_*.png"))


@pytest.mark.parametrize("world,accum", [(64, 1), (8, 8)])
def test_main_command_needs_only_data_and_tokenizer(demo_data, tiny_tokenizer, world, accum):
    """`deepspeed launch/pretrain.py --deepspeed_config ds_configs/zero3_vith.json --data D --tokenizer T`
    resolves to the paper's ViT-H/14 at 448 (checked up to the launch, which needs GPUs)."""
    from conftest import ROOT

    cfg, ds_dict = config_from_argv(["--deepspeed_config", str(ROOT / "ds_configs/zero3_vith.json"),
                                     "--data", str(demo_data), "--tokenizer", str(tiny_tokenizer)], PretrainConfig)
    r = resolve_pretrain(cfg, world)
    assert (r.model_name, r.img_size, r.grid, r.tokenizer_img_size) == ("vit_huge_patch14", 448, (32, 32), 512)
    assert r.num_masked == 392 and r.min_block == 84
    assert (r.batch_size, r.grad_accum, r.global_batch) == (32, accum, 2048)
    assert cfg.optim.betas == (0.9, 0.98) and cfg.optim.grad_clip == 3.0 and cfg.train.epochs == 800
    assert ds_dict["zero_optimization"]["stage"] == 3 and ds_dict["bf16"]["enabled"]


def test_bf16_engine_path_runs_and_exports(demo_data, tiny_tokenizer, tmp_path):
    """DeepSpeed's bf16 mode (the GPU recipes' precision) on one CPU process: bf16 module, fp32 master
    weights in the ZeRO-3 checkpoint."""
    out = tmp_path / "bf16"
    res = run_launch("launch/pretrain.py", pretrain_args(demo_data, tiny_tokenizer, out, **{
        "max_steps": 4, "train.ckpt_every": 4, "train.precision": "bf16"}))
    ok(res)
    assert "ZeRO 3, bf16" in res.stdout
    rows = read_metrics(out)
    assert len(rows) == 4 and all(math.isfinite(r["loss"]) for r in rows)
    sd = load_file(export_checkpoint(out, tmp_path / "b.safetensors")["backbone"])
    assert all(v.dtype == torch.float32 for v in sd.values())
    assert create_timm_model(tmp_path / "b.safetensors") is not None
