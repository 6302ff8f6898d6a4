"""The perceptual_mae task (``--task perceptual_mae``): the reconstruction checked against a
per-patch loop, the loss against the stage-1 modules called directly, the perceptual term's
gradient reaching the encoder's first block, the multi-scale decoder and discriminator; then 2
ranks under ZeRO-3 with the multi-scale discriminator: losses fall, resume reproduces the
uninterrupted run (discriminator included), the encoder exports to timm strictly."""

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from conftest import config_line, ok, picture_cli, read_metrics, resolve_argv, rewound_copy, rows_match, run_launch, ROOT
from peco_scale.data.masking import RandomMaskGenerator
from peco_scale.models.discriminator import MultiScalePatchDiscriminator, PatchDiscriminator, hinge_g_loss
from peco_scale.models.mae import MAETask, visible_indices
from peco_scale.models.perceptual import PerceptualLoss
from peco_scale.models.pmae import PerceptualMAELoss, real_images, reconstructions
from peco_scale.models.vit import VIT_PRESETS, MaskedViT
from peco_scale.tools.export import create_timm_model, export_checkpoint
from peco_scale.train.pretrain_config import PretrainConfig, resolve_pretrain

PICO = VIT_PRESETS["vit_pico_patch16"]
MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


def _masks(batch: int, seed: int = 0) -> torch.Tensor:
    gen = RandomMaskGenerator(4, 12)
    return torch.from_numpy(np.stack([gen(np.random.default_rng(seed + i)) for i in range(batch)]))


def _task(scales=(), depth=2, seed=0) -> MAETask:
    torch.manual_seed(seed)
    return MAETask(MaskedViT(PICO, 64, drop_path=0.0), decoder_dim=32, decoder_depth=depth, decoder_heads=4,
                   num_masked=12, scales=scales)


def _reference_reconstruction(images: np.ndarray, mask: np.ndarray, pred: np.ndarray, patch: int) -> np.ndarray:
    """Per image and patch: the de-normalised prediction where masked, the input elsewhere; then
    ImageNet-normalised -> [-1, 1]. pred rows are MAE's (row, column, channel) flattening."""
    b, c, h, w = images.shape
    out = images.copy()
    gw = w // patch
    for i in range(b):
        for n in range(mask.shape[1]):
            if not mask[i, n]:
                continue
            r, q = divmod(n, gw)
            tile = images[i, :, r * patch:(r + 1) * patch, q * patch:(q + 1) * patch]
            values = pred[i, n].reshape(patch, patch, c).transpose(2, 0, 1)
            values = values * np.sqrt(tile.var(ddof=1) + 1e-6) + tile.mean()
            out[i, :, r * patch:(r + 1) * patch, q * patch:(q + 1) * patch] = values
    return (out * STD[:, None, None] + MEAN[:, None, None]) * 2 - 1


def test_reconstruction_pastes_the_prediction_at_masked_patches_only():
    torch.manual_seed(1)
    images, mask = torch.randn(3, 3, 64, 64), _masks(3).flatten(1)
    pred = torch.randn(3, 16, 16 * 16 * 3, requires_grad=True)
    (full,) = reconstructions(images, mask, {"pred": pred}, 16, (4, 4), norm_pix=True)
    ref = _reference_reconstruction(images.double().numpy(), mask.numpy(), pred.detach().double().numpy(), 16)
    np.testing.assert_allclose(full.detach().numpy(), ref, rtol=1e-4, atol=1e-4)
    full.sum().backward()
    touched = pred.grad.abs().sum(-1) > 0
    assert torch.equal(touched, mask)  # gradient at the masked patches, none at the visible ones


def test_loss_is_mae_plus_weighted_perceptual_and_reaches_encoder_block_0():
    task, images, mask = _task(), torch.randn(2, 3, 64, 64), _masks(2)
    torch.manual_seed(2)
    perceptual = PerceptualLoss("vit_tiny_patch16", None, "random")
    crit = PerceptualMAELoss(perceptual, 0.5, patch=16, grid=(4, 4), norm_pix=True)
    out = task(images, mask)
    parts = crit(images, mask, out)
    real = torch.from_numpy((images.double().numpy() * STD[:, None, None] + MEAN[:, None, None]) * 2 - 1).float()
    fake = torch.from_numpy(_reference_reconstruction(images.double().numpy(), mask.flatten(1).numpy(),
                                                      out["pred"].detach().double().numpy(), 16)).float()
    with torch.no_grad():
        ref_percep = perceptual(real, fake)
    torch.testing.assert_close(parts["percep_loss"], ref_percep, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(parts["loss"].detach(), out["loss"].detach() + 0.5 * ref_percep, rtol=1e-3, atol=1e-4)
    assert set(parts) == {"loss", "mae_loss", "percep_loss", "fakes", "real"}

    # the perceptual term alone sends gradient through the decoder into the encoder's first block
    first = [task.backbone.blocks[0].attn.qkv.weight, task.backbone.patch_embed.proj.weight]
    grads = torch.autograd.grad(parts["loss"] - out["loss"], first)
    for g in grads:
        assert torch.isfinite(g).all() and g.abs().sum() > 0
    assert all(not p.requires_grad for p in perceptual.parameters())


def test_adversarial_term_uses_the_discriminator_on_the_reconstruction():
    task, images, mask = _task(), torch.randn(2, 3, 64, 64), _masks(2)
    torch.manual_seed(3)
    crit = PerceptualMAELoss(PerceptualLoss("vit_tiny_patch16", None, "random"), 1.0, patch=16, grid=(4, 4),
                             norm_pix=True)
    disc = PatchDiscriminator(3, 8, 3).eval()
    out = task(images, mask)
    parts = crit(images, mask, out, disc=disc, disc_weight=0.4)
    with torch.no_grad():
        g = hinge_g_loss(disc(parts["fakes"][0]))
    torch.testing.assert_close(parts["g_loss"], g)
    torch.testing.assert_close(parts["loss"].detach(), out["loss"].detach() + parts["percep_loss"] + 0.4 * g,
                               rtol=1e-4, atol=1e-5)
    # without a perceptual network (lambda 0): MAE's loss + the adversarial term alone
    alone = PerceptualMAELoss(None, 0.0, patch=16, grid=(4, 4), norm_pix=True)(images, mask, out, disc=disc,
                                                                              disc_weight=0.4)
    assert float(alone["percep_loss"]) == 0.0
    torch.testing.assert_close(alone["loss"].detach(), out["loss"].detach() + 0.4 * g, rtol=1e-5, atol=1e-6)


def test_multiscale_decoder_taps_earlier_blocks_and_feeds_the_msg_discriminator():
    task, images, mask = _task(scales=(2, 4, 8), depth=4), torch.randn(2, 3, 64, 64), _masks(2)
    task.eval()
    with torch.no_grad():
        out = task(images, mask)
        # the decoder by hand: image at 1/s read by its head after block depth - 2 - k
        dec = task.decoder
        keep = visible_indices(mask, 12)
        x = dec.embed(task.backbone(images, keep=keep))
        full = dec.mask_token.expand(2, 16, 32).scatter(1, keep[..., None].expand(-1, -1, 32), x[:, 1:])
        x = torch.cat([x[:, :1], full], 1) + dec.pos_embed
        hidden = []
        for block in dec.blocks:
            x = block(x)
            hidden.append(x)
    assert sorted(out["scales"]) == [2, 4, 8]
    for k, s in enumerate((2, 4, 8)):
        assert out["scales"][s].shape == (2, 16, (16 // s) ** 2 * 3)
        torch.testing.assert_close(out["scales"][s], dec.scale_heads[k](hidden[2 - k][:, 1:]))
    torch.testing.assert_close(out["pred"], dec.pred(dec.norm(hidden[-1]))[:, 1:])

    fakes = reconstructions(images, mask, out, 16, (4, 4), norm_pix=True)
    assert [f.shape[-1] for f in fakes] == [64, 32, 16, 8]
    # visible patches of each scale are the average-pooled input
    real = real_images(torch.from_numpy((images.numpy() * STD[:, None, None] + MEAN[:, None, None]) * 2 - 1).float(), 3)
    pooled = real[3].numpy()
    by_hand = ((images.numpy() * STD[:, None, None] + MEAN[:, None, None]) * 2 - 1).reshape(2, 3, 8, 8, 8, 8).mean((3, 5))
    np.testing.assert_allclose(pooled, by_hand, rtol=1e-5, atol=1e-5)
    visible = ~mask.reshape(2, 4, 4)
    big = F.interpolate(visible[:, None].float(), size=8).bool().expand(-1, 3, -1, -1)
    np.testing.assert_allclose(fakes[3][big].numpy(), pooled[big.numpy()], rtol=1e-4, atol=1e-4)

    disc = MultiScalePatchDiscriminator(3, 8, 3)
    assert disc(fakes).shape == disc(real).shape == (2, 1, 6, 6)
    with pytest.raises(ValueError, match="full size and at 1/2, 1/4, 1/8"):
        disc(fakes[:2])
    with pytest.raises(ValueError, match="must divide the patch size"):
        _task(scales=(32,), depth=4)


# -- config --------------------------------------------------------------------------------------


def _args(data, out, **over):
    base = {"deepspeed_config": str(ROOT / "ds_configs/zero3_vith.json"), "model": "vit_pico_patch16",
            "img_size": 64, "data": str(data), "output_dir": str(out), "task": "perceptual_mae",
            "mae.decoder_dim": 32, "mae.decoder_depth": 4, "mae.decoder_heads": 4,
            "perceptual.arch": "vit_tiny_patch16", "perceptual.weights": "random", "batch_size": 8,
            "global_batch": 16, "max_steps": 6, "train.log_every": 1, "train.ckpt_every": 3, "workers": 0,
            "lr": 2e-3, "optim.base_batch": 16, "optim.warmup_steps": 2}
    base.update(over)
    return [a for k, v in base.items() for a in (f"--{k}", str(v))]


def test_config_checks_the_perceptual_network_and_the_discriminator(demo_data, tmp_path):
    out = tmp_path / "x"
    r = resolve_argv(resolve_pretrain, PretrainConfig, _args(demo_data, out))
    assert (r.task, r.scales, r.mask["kind"]) == ("perceptual_mae", (), "random")
    r = resolve_argv(resolve_pretrain, PretrainConfig, _args(demo_data, out, **{"disc.enabled": "true",
                                                                                "disc.multiscale": "true"}))
    assert r.scales == (2, 4, 8)
    line = lambda *a, **kw: config_line(resolve_pretrain, PretrainConfig, _args(demo_data, out, **kw), *a)  # noqa: E731
    line("perceptual.weights is empty", **{"perceptual.weights": ""})
    line(f"'{tmp_path / 'nope.pth'}' not found", **{"perceptual.weights": str(tmp_path / "nope.pth")})
    line("perceptual.arch='alexnet'", **{"perceptual.arch": "alexnet"})
    line("mae.perceptual_weight=-1.0", **{"mae.perceptual_weight": -1.0})
    line("disc.multiscale needs disc.enabled", **{"disc.multiscale": "true"})
    line("disc.enabled applies to --task perceptual_mae", task="mae", **{"disc.enabled": "true"})
    line("patch size divisible by 32", **{"disc.enabled": "true", "disc.multiscale": "true", "disc.n_layers": 5})
    line("mae.decoder_depth=3 must be at least 4", **{"disc.enabled": "true", "disc.multiscale": "true",
                                                     "mae.decoder_depth": 3})
    line("disc weight -1.0", **{"disc.enabled": "true", "disc.weight": -1.0})
    # lambda 0: no perceptual network to name (MAE with a discriminator alone)
    r = resolve_argv(resolve_pretrain, PretrainConfig, _args(demo_data, out, **{
        "mae.perceptual_weight": 0, "perceptual.weights": "", "perceptual.arch": "alexnet", "disc.enabled": "true"}))
    assert r.task == "perceptual_mae"


# -- 2 ranks under ZeRO-3 ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pmae_run(demo_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("pmae") / "run"
    res = ok(run_launch("launch/pretrain.py", _args(demo_data, out, **RUN), ranks=2, port=29563))
    return out, res


RUN = {"max_steps": 30, "train.ckpt_every": 15, "disc.enabled": "true", "disc.multiscale": "true",
       "disc.start_step": 10, "disc.lr": 1e-4}


@pytest.mark.slow
def test_zero3_two_ranks_learns_resumes_and_exports_to_timm(pmae_run, demo_data, tmp_path):
    out, res = pmae_run
    assert "ZeRO 3" in res.stdout and "task perceptual_mae: 12 masked at random" in res.stdout
    assert "multi-scale (1/2, 1/4, 1/8) patch discriminator" in res.stdout
    n = sum(p.numel() for p in _task(scales=(2, 4, 8), depth=4).parameters())  # ZeRO-3 partitions: count the full
    assert f"{n / 1e6:.1f}M trainable params" in res.stdout
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 31))
    assert "d_loss" not in rows[9] and {"d_loss", "g_loss"} <= set(rows[10])  # the discriminator from step 10
    for key in ("mae_loss", "percep_loss"):
        first, last = np.mean([r[key] for r in rows[:3]]), np.mean([r[key] for r in rows[-3:]])
        assert last < 0.9 * first, (key, first, last)

    # resume from step 15 (discriminator trained for 5 steps) reproduces steps 16..30
    part = rewound_copy(out, tmp_path / "part", 15)
    ok(run_launch("launch/pretrain.py", _args(demo_data, part, **RUN, **{"train.resume": "auto"}), ranks=2,
                  port=29564))
    rows_match(out, part, ("loss", "mae_loss", "percep_loss", "g_loss", "d_loss", "grad_norm", "lr"))

    exp = export_checkpoint(out, tmp_path / "backbone.safetensors")
    assert exp["task"] == "perceptual_mae" and exp["head"].endswith("backbone.perceptual_mae.safetensors")
    assert any(k.startswith("decoder.scale_heads.") for k in load_file(exp["head"]))
    model = create_timm_model(exp["backbone"]).eval()
    assert timm.create_model("vit_tiny_patch16_224", pretrained=False, **exp["timm_kwargs"]).load_state_dict(
        load_file(exp["backbone"]), strict=True) is not None
    assert model.patch_embed.proj.weight.shape[0] == PICO.embed_dim

    # pictures: the trainer's at the last step; the command's on the finished run (its multi-scale decoder loads)
    assert Image.open(out / "images" / "step_00000030.png").size[0] > 3 * 64
    assert picture_cli(out, demo_data, tmp_path / "grid.png").size[1] > 3 * 64
