"""The MAE task (``--task mae``): random masking, the visible-only encoder, the decoder and the
pixel loss checked against independent computations (numpy, per-image loops, MAE's own
position-embedding formula); then 2 ranks under ZeRO-3 through the `deepspeed` launcher: loss
falls, resume reproduces the uninterrupted run, the encoder exports to timm strictly."""

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import config_line, ok, picture_cli, read_metrics, resolve_argv, rewound_copy, rows_match, run_launch, ROOT
from peco_scale.data.masking import RandomMaskGenerator, mask_generator
from peco_scale.models.cost import count_forward_flops, mae_train_flops
from peco_scale.models.mae import MAETask, mae_loss, patchify, sincos_pos_embed, unpatchify, visible_indices
from peco_scale.models.vit import VIT_PRESETS, MaskedViT
from peco_scale.tools.export import consolidate, create_timm_model, export_checkpoint
from peco_scale.train.pretrain_config import PretrainConfig, resolve_pretrain

PICO = VIT_PRESETS["vit_pico_patch16"]


def _masks(grid: int, num_masked: int, batch: int, seed: int = 0) -> torch.Tensor:
    gen = RandomMaskGenerator(grid, num_masked)
    return torch.from_numpy(np.stack([gen(np.random.default_rng(seed + i)) for i in range(batch)]))


def test_random_masks_are_exact_uniform_and_seeded():
    gen = mask_generator(kind="random", grid=(4, 5), num_masked=15)
    masks = np.stack([gen(np.random.default_rng(i)) for i in range(4000)])
    assert masks.shape == (4000, 4, 5) and (masks.reshape(4000, -1).sum(1) == 15).all()
    # each patch is masked with probability 15/20; 4000 draws: sd of the frequency ~0.007
    assert np.abs(masks.mean(0) - 0.75).max() < 0.05
    assert (gen(np.random.default_rng(7)) == gen(np.random.default_rng(7))).all()
    assert RandomMaskGenerator(14).num_masked == 147  # MAE's 75% of 196
    with pytest.raises(ValueError, match="num_masked=20"):
        RandomMaskGenerator(4, 20)
    with pytest.raises(ValueError, match="mask kind 'grid'"):
        mask_generator(kind="grid", grid=4)


def test_patchify_matches_numpy_and_inverts():
    x = torch.randn(2, 3, 32, 48)
    p = 16
    ref = np.zeros((2, 6, p * p * 3), np.float32)
    xn = x.numpy()
    for b in range(2):
        for i in range(2):
            for j in range(3):
                block = xn[b, :, i * p:(i + 1) * p, j * p:(j + 1) * p]  # [C, p, p]
                ref[b, i * 3 + j] = block.transpose(1, 2, 0).reshape(-1)  # rows, columns, channels innermost
    np.testing.assert_array_equal(patchify(x, p).numpy(), ref)
    torch.testing.assert_close(unpatchify(patchify(x, p), p, (2, 3)), x, rtol=0, atol=0)


@pytest.mark.parametrize("norm_pix", [True, False])
def test_loss_matches_numpy(norm_pix):
    rng = np.random.default_rng(3)
    pred, target = rng.normal(size=(3, 16, 48)), rng.normal(size=(3, 16, 48)) * 2 + 1
    mask = np.stack([RandomMaskGenerator(4, 12)(np.random.default_rng(i)).reshape(-1) for i in range(3)])
    total, count = 0.0, 0
    for b in range(3):
        for n in range(16):
            if not mask[b, n]:
                continue
            t = target[b, n]
            if norm_pix:
                t = (t - t.mean()) / np.sqrt(t.var(ddof=1) + 1e-6)
            total += np.mean((pred[b, n] - t) ** 2)
            count += 1
    got = mae_loss(torch.tensor(pred), torch.tensor(target), torch.tensor(mask), norm_pix=norm_pix)
    assert got.item() == pytest.approx(total / count, rel=1e-5)


def test_sincos_matches_mae_formula():
    """MAE's get_2d_sincos_pos_embed, written out in numpy: the first half from the column
    coordinate, the second from the row, each [sin, cos] over omega = 1 / 10000 ** (i / (D/4))."""
    dim, gh, gw = 16, 3, 5
    omega = 1.0 / 10000 ** (np.arange(dim // 4) / (dim / 4.0))
    rows = []
    for r in range(gh):
        for c in range(gw):
            rows.append(np.concatenate([np.sin(c * omega), np.cos(c * omega), np.sin(r * omega), np.cos(r * omega)]))
    ref = np.concatenate([np.zeros((1, dim)), np.array(rows)])
    np.testing.assert_allclose(sincos_pos_embed(dim, (gh, gw)).numpy(), ref, rtol=1e-6, atol=1e-6)


def test_visible_only_encoder_is_the_encoder_on_visible_tokens_alone():
    torch.manual_seed(0)
    vit = MaskedViT(PICO, 64, drop_path=0.0).eval()
    x, mask = torch.randn(3, 3, 64, 64), _masks(4, 12, 3)
    keep = visible_indices(mask)
    with torch.no_grad():
        out = vit(x, keep=keep)
        assert out.shape == (3, 1 + 4, 128)
        tokens = vit._pos_embed(vit.patch_embed(x))  # [B, 1 + N, D], position embeddings added
        for b in range(3):  # one image at a time, only its visible tokens: nothing else in the sequence
            vis = np.flatnonzero(~mask[b].reshape(-1).numpy())
            seq = torch.cat([tokens[b:b + 1, :1], tokens[b:b + 1, 1 + torch.from_numpy(vis)]], dim=1)
            torch.testing.assert_close(out[b:b + 1], vit.norm(vit.blocks(seq)), rtol=1e-5, atol=1e-5)
        # the pixels of masked patches cannot reach the output
        x2 = x.clone()
        for b in range(3):
            for n in np.flatnonzero(mask[b].reshape(-1).numpy()):
                i, j = divmod(int(n), 4)
                x2[b, :, i * 16:(i + 1) * 16, j * 16:(j + 1) * 16] = torch.randn(3, 16, 16)
        torch.testing.assert_close(vit(x2, keep=keep), out, rtol=0, atol=0)


def test_decoder_places_tokens_and_loss_covers_masked_patches_only():
    torch.manual_seed(1)
    task = MAETask(MaskedViT(PICO, 64, drop_path=0.0), decoder_dim=32, decoder_depth=2, decoder_heads=4,
                   num_masked=12).eval()
    x, mask = torch.randn(2, 3, 64, 64), _masks(4, 12, 2, seed=5)
    dec = task.decoder
    with torch.no_grad():
        out = task(x, mask)
        pos = torch.from_numpy(np.concatenate([np.zeros((1, 32)), _numpy_sincos(32, 4)]).astype(np.float32))
        for b in range(2):
            latent = task.backbone(x[b:b + 1], keep=visible_indices(mask[b:b + 1]))
            emb = dec.embed(latent)[0]
            seq, k = [emb[0]], 1
            for n in range(16):  # a loop over positions instead of scatter
                if mask[b].reshape(-1)[n]:
                    seq.append(dec.mask_token[0, 0])
                else:
                    seq.append(emb[k])
                    k += 1
            y = torch.stack(seq)[None] + pos[None]
            ref = dec.pred(dec.norm(dec.blocks(y)))[0, 1:]
            torch.testing.assert_close(out["pred"][b], ref, rtol=1e-4, atol=1e-5)
        assert out["loss"].item() == pytest.approx(
            mae_loss(out["pred"], patchify(x, 16), mask.flatten(1)).item(), rel=1e-6)
        # the reconstruction keeps the input at visible patches
        rec = patchify(task.reconstruct(x, mask, out["pred"]), 16)
        vis = ~mask.flatten(1)
        torch.testing.assert_close(rec[vis], patchify(x, 16)[vis], rtol=1e-5, atol=1e-5)


def _numpy_sincos(dim: int, side: int) -> np.ndarray:
    omega = 1.0 / 10000 ** (np.arange(dim // 4) / (dim / 4.0))
    return np.array([np.concatenate([np.sin(c * omega), np.cos(c * omega), np.sin(r * omega), np.cos(r * omega)])
                     for r in range(side) for c in range(side)])


def test_mae_flops_match_the_flop_counter():
    torch.manual_seed(0)
    task = MAETask(MaskedViT(VIT_PRESETS["vit_tiny_patch16"], 112), decoder_dim=64, decoder_depth=2,
                   decoder_heads=4, num_masked=37).eval()
    measured = count_forward_flops(task.predict, torch.randn(1, 3, 112, 112), _masks(7, 37, 1))
    f = mae_train_flops(VIT_PRESETS["vit_tiny_patch16"], 112, num_masked=37, decoder_dim=64, decoder_depth=2)
    assert measured == pytest.approx(f["backbone_forward"] + f["decoder_forward"], rel=0.01)
    assert f["model"] == 3 * (f["backbone_forward"] + f["decoder_forward"])


# -- config --------------------------------------------------------------------------------------


def _args(data, out, **over):
    base = {"deepspeed_config": str(ROOT / "ds_configs/zero3_vith.json"), "model": "vit_pico_patch16",
            "img_size": 64, "data": str(data), "output_dir": str(out), "task": "mae", "mae.decoder_dim": 32,
            "mae.decoder_depth": 2, "mae.decoder_heads": 4, "batch_size": 8, "global_batch": 16, "max_steps": 6,
            "train.log_every": 1, "train.ckpt_every": 3, "workers": 0, "lr": 2e-3, "optim.base_batch": 16,
            "optim.warmup_steps": 2}
    base.update(over)
    return [a for k, v in base.items() for a in (f"--{k}", str(v))]


def test_config_needs_no_tokenizer_and_checks_the_mae_section(demo_data, tmp_path):
    r = resolve_argv(resolve_pretrain, PretrainConfig, _args(demo_data, tmp_path / "x"))
    assert (r.task, r.vocab, r.tokenizer_img_size, r.num_masked) == ("mae", 0, 0, 12)
    assert r.mask == {"kind": "random", "grid": (4, 4), "num_masked": 12}
    config_line(resolve_pretrain, PretrainConfig, _args(demo_data, tmp_path / "x", task="beit"), "model.task='beit'",
                "peco, mae")
    config_line(resolve_pretrain, PretrainConfig, _args(demo_data, tmp_path / "x", **{"mae.mask_ratio": 1.0}),
                "mae.mask_ratio=1.0")
    config_line(resolve_pretrain, PretrainConfig, _args(demo_data, tmp_path / "x", **{"mae.mask_ratio": 0.01}),
                "masks 0 of 16")
    config_line(resolve_pretrain, PretrainConfig, _args(demo_data, tmp_path / "x", **{"mae.decoder_heads": 5}),
                "mae.decoder_dim=32", "decoder_heads=5")


def test_a_recipe_block_picks_the_task(demo_data, tmp_path):
    """``model.task`` in a recipe's peco_scale block, and a flag over it (flags win)."""
    import json

    recipe = json.loads((ROOT / "ds_configs/zero3_vith.json").read_text())
    recipe["peco_scale"].update({"model.task": "mae", "mae.mask_ratio": 0.5})
    path = tmp_path / "mae_recipe.json"
    path.write_text(json.dumps(recipe))
    args = _args(demo_data, tmp_path / "x", deepspeed_config=path)
    args = args[:args.index("--task")] + args[args.index("--task") + 2:]  # the task from the recipe alone
    r = resolve_argv(resolve_pretrain, PretrainConfig, args)
    assert (r.task, r.num_masked, r.mask["kind"]) == ("mae", 8, "random")
    r = resolve_argv(resolve_pretrain, PretrainConfig, args + ["--task", "perceptual_mae", "--perceptual.weights",
                                                               "random"])
    assert r.task == "perceptual_mae"


# -- 2 ranks under ZeRO-3 ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mae_run(demo_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("mae") / "run"
    res = ok(run_launch("launch/pretrain.py", _args(demo_data, out, max_steps=30, **{"train.ckpt_every": 15}),
                        ranks=2, port=29561))
    return out, res


@pytest.mark.slow
def test_zero3_two_ranks_learns_resumes_and_exports_to_timm(mae_run, demo_data, tiny_tokenizer, tmp_path):
    out, res = mae_run
    assert "ZeRO 3" in res.stdout and "task mae: 12 masked at random" in res.stdout
    n = sum(p.numel() for p in MAETask(MaskedViT(PICO, 64), decoder_dim=32, decoder_depth=2, decoder_heads=4).parameters())
    assert f"{n / 1e6:.1f}M trainable params" in res.stdout  # the full count, though ZeRO-3 partitions them
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 31))
    assert "mlm_acc" not in rows[0]
    first, last = np.mean([r["loss"] for r in rows[:3]]), np.mean([r["loss"] for r in rows[-3:]])
    assert last < 0.9 * first, (first, last)

    # resume from step 15 reproduces steps 16..30; another task is refused with one line
    part = rewound_copy(out, tmp_path / "part", 15)
    bad = run_launch("launch/pretrain.py", _args(demo_data, part, task="peco", tokenizer=tiny_tokenizer,
                                                 max_steps=30, **{"train.resume": "auto", "train.ckpt_every": 15}))
    assert bad.returncode == 2 and bad.stderr.count("error:") == 1, bad.stderr[-2000:]
    ok(run_launch("launch/pretrain.py", _args(demo_data, part, max_steps=30, **{"train.resume": "auto",
                                                                                "train.ckpt_every": 15}),
                  ranks=2, port=29562))
    rows_match(out, part, ("loss", "grad_norm", "lr"))

    # export: the encoder loads into timm strictly and computes our backbone's features
    exp = export_checkpoint(out, tmp_path / "backbone.safetensors")
    assert exp["task"] == "mae" and exp["head"].endswith("backbone.mae.safetensors")
    assert {k.split(".")[0] for k in load_file(exp["head"])} == {"decoder", "backbone"}
    model = create_timm_model(exp["backbone"]).eval()
    ours = MaskedViT(PICO, 64, drop_path=0.0).eval()
    sd = {k[len("backbone."):]: v for k, v in consolidate(out / "checkpoints" / "step_00000030").items()
          if k.startswith("backbone.")}
    ours.load_state_dict(sd, strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x)[:, 1:], ours(x), rtol=1e-4, atol=1e-4)
    assert timm.create_model("vit_tiny_patch16_224", pretrained=False, **exp["timm_kwargs"]).load_state_dict(
        load_file(exp["backbone"]), strict=True) is not None

    # pictures: the trainer's at the last step; the command's on the finished run (3 rows x 3 columns)
    assert Image.open(out / "images" / "step_00000030.png").size[0] > 3 * 64
    assert picture_cli(out, demo_data, tmp_path / "grid.png").size[1] > 3 * 64


def test_bench_step_times_the_mae_tasks_and_prints_their_ratio(tmp_path):
    """bench_step --task mae,perceptual_mae on CPU: one JSON row each with MAE's FLOPs, then the ratio line."""
    import json
    import subprocess
    import sys

    out = tmp_path / "bench.jsonl"
    cmd = [sys.executable, "-m", "peco_scale.tools.bench_step", "--model", "vit_pico_patch16", "--img_size", "64",
           "--batch_size", "4", "--steps", "2", "--warmup", "0", "--perceptual_arch", "vit_tiny_patch16",
           "--results", str(out)]
    res = subprocess.run(cmd + ["--task", "mae,perceptual_mae"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["task"] for r in rows] == ["mae", "perceptual_mae"] and all(r["num_masked"] == 12 for r in rows)
    flops = mae_train_flops(PICO, 64, num_masked=12, decoder_dim=512, decoder_depth=8)["model"]
    for r in rows:
        assert r["images_per_s"] == pytest.approx(4 / r["step_s"])
        assert r["tflops"] == pytest.approx(flops * r["images_per_s"] / 1e12)
    ratio = rows[1]["step_s"] / rows[0]["step_s"]
    assert f"time per image, checkpointing off: perceptual_mae/mae {ratio:.3f}" in res.stdout
    bad = subprocess.run(cmd + ["--task", "beit"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "error: --task 'beit': choose from peco, mae, perceptual_mae, comma-separated"]
