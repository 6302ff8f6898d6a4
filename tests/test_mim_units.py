"""Stage-2 building blocks checked against independent computations (no DeepSpeed)."""

import json
import math

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image

from peco_scale.data.masking import BlockMaskGenerator
from peco_scale.data.mim import MIMTransform, denormalize_patch
from peco_scale.engine.ds import finalize_ds_config
from peco_scale.train.recipe import read_recipe
from peco_scale.models.artifact import load_tokenizer
from peco_kernels import masked_linear_cross_entropy_reference
from peco_scale.models.mim import MIMTask
from peco_scale.models.vit import (VIT_PRESETS, MaskedViT, export_timm_state_dict, param_groups, parse_model_name,
                                   resize_pos_embed, timm_spec)

from conftest import ROOT


@pytest.mark.parametrize("name,size,expected_m", [("vit_base_patch16", 224, 86.4), ("vit_large_patch16", 224, 303.6),
                                                  ("vit_huge_patch14", 224, 631.0)])
def test_preset_parameter_counts_on_meta(name, size, expected_m):
    """Built on the meta device (no memory); the counts of timm's reference models (incl. mask token and
    layer scales, the BEiT-style additions)."""
    with torch.device("meta"):
        m = MaskedViT(VIT_PRESETS[name], size)
        ref = timm.create_model(timm_spec(VIT_PRESETS[name], size)[0], pretrained=False, num_classes=0, img_size=size)
    n = sum(p.numel() for p in m.parameters())
    extra = m.embed_dim * (1 + 2 * len(m.blocks))  # mask token + two gammas per block
    assert n == sum(p.numel() for p in ref.parameters()) + extra
    assert n / 1e6 == pytest.approx(expected_m, rel=0.01)


def test_model_name_suffix_and_bad_sizes():
    assert parse_model_name("vit_huge_patch14_448")[2] == 448
    assert parse_model_name("vit_huge_patch14", 448)[2] == 448
    assert parse_model_name("vit_large_patch16")[2] == 224
    with pytest.raises(Exception, match="unknown model 'vit_giant'"):
        parse_model_name("vit_giant")
    with pytest.raises(Exception, match="not divisible by the patch size 16"):
        MaskedViT(VIT_PRESETS["vit_pico_patch16"], 70)


def test_layer_scale_and_mask_token_behaviour():
    torch.manual_seed(0)
    m = MaskedViT(VIT_PRESETS["vit_pico_patch16"], 64, drop_path=0.0).eval()
    assert m.blocks[0].ls1.gamma.detach().eq(0.1).all()
    x = torch.randn(2, 3, 64, 64)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, 3] = True
    full, masked = m(x), m(x, mask)
    # image 1 has no masked patch; image 0 differs, and masking is the same as feeding the mask token
    torch.testing.assert_close(full[1], masked[1])
    assert not torch.allclose(full[0], masked[0])
    emb = m.patch_embed(x[:1]).clone()
    emb[0, 3] = m.mask_token[0, 0]
    manual = m.norm(m.blocks(m._pos_embed(emb)))[:, 1:]
    torch.testing.assert_close(masked[:1], manual)


def test_param_groups_cover_every_parameter_once():
    m = MaskedViT(VIT_PRESETS["vit_pico_patch16"], 64)
    groups = param_groups(m, 0.05)
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in m.parameters())
    names = {id(p): n for n, p in m.named_parameters()}
    no_decay = {names[id(p)] for p in groups[1]["params"]}
    decay = {names[id(p)] for p in groups[0]["params"]}
    assert groups[1]["weight_decay"] == 0 and groups[0]["weight_decay"] == 0.05
    for n in ("pos_embed", "cls_token", "mask_token", "blocks.0.ls1.gamma", "blocks.0.norm1.weight",
              "blocks.0.attn.qkv.bias", "norm.bias"):
        assert n in no_decay
    assert decay == {n for n, p in m.named_parameters() if p.ndim >= 2 and n not in
                     ("pos_embed", "cls_token", "mask_token")}


@pytest.mark.parametrize("fold", [True, False])
def test_export_loads_into_timm_strict_with_same_features(fold):
    torch.manual_seed(0)
    m = MaskedViT(VIT_PRESETS["vit_pico_patch8"], 48, drop_path=0.0).eval()
    with torch.no_grad():  # non-trivial layer scales so that folding is exercised
        for b in m.blocks:
            b.ls1.gamma.uniform_(0.5, 1.5)
            b.ls2.gamma.uniform_(-1, 1)
    name, kwargs = timm_spec(m.preset, 48)
    if not fold:
        kwargs["init_values"] = 0.1
    ref = timm.create_model(name, pretrained=False, **kwargs).eval()
    ref.load_state_dict(export_timm_state_dict(m, fold_layer_scale=fold), strict=True)
    x = torch.randn(2, 3, 48, 48)
    torch.testing.assert_close(ref.forward_features(x)[:, 1:], m(x), rtol=1e-4, atol=1e-5)


def test_resize_pos_embed_matches_direct_bicubic():
    pe = torch.randn(1, 1 + 16, 8)
    out = resize_pos_embed(pe, (8, 8))
    grid = pe[:, 1:].reshape(1, 4, 4, 8).permute(0, 3, 1, 2)
    direct = F.interpolate(grid, size=(8, 8), mode="bicubic", antialias=True, align_corners=False)
    torch.testing.assert_close(out[:, 1:], direct.permute(0, 2, 3, 1).reshape(1, 64, 8))
    torch.testing.assert_close(out[:, :1], pe[:, :1])


def test_reference_head_loss_counts_masked_rows_only():
    torch.manual_seed(0)
    h = torch.randn(3, 10, 16, requires_grad=True)
    w, b = torch.randn(50, 16, requires_grad=True), torch.randn(50, requires_grad=True)
    tgt = torch.randint(0, 50, (3, 10))
    mask = torch.rand(3, 10) < 0.4
    loss, acc = masked_linear_cross_entropy_reference(h, w, b, tgt, mask)
    logits = (h.double() @ w.double().T + b.double())
    per_row = F.cross_entropy(logits.reshape(-1, 50), tgt.reshape(-1), reduction="none").reshape(3, 10)
    expected = per_row[mask].mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert acc.item() == pytest.approx((logits.argmax(-1) == tgt)[mask].double().mean().item())
    loss.backward()
    assert h.grad[~mask].abs().max() == 0 and h.grad[mask].abs().max() > 0


def test_mim_task_targets_are_the_tokenizers_ids(tiny_tokenizer):
    tok = load_tokenizer(tiny_tokenizer)
    torch.manual_seed(0)
    task = MIMTask(MaskedViT(VIT_PRESETS["vit_pico_patch16"], 64, drop_path=0.0), tok)
    assert task.tokenizer_img_size == 64 and task.vocab == tok.quant_cfg.codebook_size
    assert not any(n.startswith("tokenizer") for n, _ in task.named_parameters())  # frozen, not trained/partitioned
    x_tok = torch.rand(2, 3, 64, 64) * 2 - 1
    ids = task.targets(x_tok)
    torch.testing.assert_close(ids, tok.tokenize(x_tok).flatten(1))
    mask = torch.from_numpy(np.stack([BlockMaskGenerator((4, 4), 6)(np.random.default_rng(i)) for i in range(2)]))
    out = task(torch.randn(2, 3, 64, 64), x_tok, mask)
    hidden = task.backbone(torch.randn(2, 3, 64, 64), mask)  # shapes only
    assert hidden.shape == (2, 16, 128)
    assert 0 <= out["mlm_acc"] <= 1 and out["loss"].item() == pytest.approx(math.log(task.vocab), rel=0.1)


def test_two_views_come_from_one_crop():
    rng = np.random.default_rng(0)
    arr = (rng.random((120, 160, 3)) * 255).astype(np.uint8)
    arr = np.asarray(Image.fromarray(arr).resize((40, 30), Image.BILINEAR).resize((160, 120), Image.BICUBIC))
    img = Image.fromarray(arr)
    gen = BlockMaskGenerator((4, 4), 6)
    t = MIMTransform(64, 32, gen, jitter=0.4)
    for seed in range(5):
        torch.manual_seed(seed)
        s = t(img)
        assert s["patch"].shape == (3, 64, 64) and s["tokenizer"].shape == (3, 32, 32)
        assert s["mask"].dtype == torch.bool and s["mask"].shape == (4, 4) and int(s["mask"].sum()) == 6
        assert -1 <= s["tokenizer"].min() and s["tokenizer"].max() <= 1
        small = F.interpolate(denormalize_patch(s["patch"])[None], size=(32, 32), mode="area")[0]
        # same crop, flip and jitter: the views agree up to resampling
        assert (small - (s["tokenizer"] + 1) / 2).abs().mean() < 0.03
    torch.manual_seed(3)
    a = t(img)
    torch.manual_seed(3)
    b = t(img)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("recipe,model,size,stage", [("zero3_vith.json", "vit_huge_patch14", 448, 3),
                                                     ("zero3_vitl.json", "vit_large_patch16", 448, 3),
                                                     ("zero2_vitb.json", "vit_base_patch16", 224, 2)])
def test_recipes_name_their_run_and_are_valid_deepspeed(recipe, model, size, stage):
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    ds_dict, over = read_recipe(ROOT / "ds_configs" / recipe)
    assert over["model.name"] == model and over["model.img_size"] == size
    assert over["optim.lr"] == 1.5e-3 and over["optim.base_batch"] == 2048 and over["optim.grad_clip"] == 3.0
    assert over["optim.weight_decay"] == 0.05
    assert tuple(over["optim.betas"]) == ((0.9, 0.98) if stage == 3 else (0.9, 0.999))
    assert "optimizer" not in ds_dict and "peco_scale" not in ds_dict
    final = finalize_ds_config(ds_dict, micro_batch=4, grad_accum=2, world_size=8, grad_clip=3.0, zero_stage=None,
                               bf16=True)
    assert final["train_batch_size"] == 64 and final["bf16"]["enabled"]
    zero = DeepSpeedZeroConfig(**final["zero_optimization"])  # DeepSpeed's own validation
    assert zero.stage == stage
    if stage == 3:
        assert zero.param_persistence_threshold == 100000 and zero.overlap_comm
        assert "timm.models.vision_transformer.Block" in zero.leaf_module.classes
        # prefetch about two blocks of parameters
        p = VIT_PRESETS[model]
        block = 12 * p.embed_dim ** 2
        assert 1.5 * block <= zero.prefetch_bucket_size <= 2.5 * block
    json.dumps(final)


def test_activation_checkpointing_switch_gives_same_gradients():
    torch.manual_seed(0)
    a = MaskedViT(VIT_PRESETS["vit_pico_patch16"], 64, drop_path=0.0).train()
    b = MaskedViT(VIT_PRESETS["vit_pico_patch16"], 64, drop_path=0.0, grad_checkpointing=True).train()
    b.load_state_dict(a.state_dict())
    assert b.grad_checkpointing and not a.grad_checkpointing
    x, mask = torch.randn(2, 3, 64, 64), torch.rand(2, 16) < 0.4
    saved = {}
    for name, m in (("plain", a), ("ckpt", b)):
        n = [0]

        def pack(t, n=n):
            n[0] += t.numel()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            m(x, mask).square().mean().backward()
        saved[name] = n[0]
    for (k, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-5, atol=1e-6, msg=k)
    assert saved["ckpt"] < 0.5 * saved["plain"]  # activations really were dropped
