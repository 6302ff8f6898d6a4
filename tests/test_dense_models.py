"""Dense-prediction models: backbone features against timm's own forward_intermediates, the neck's
and pyramid's strides, UperNet / Mask R-CNN forward passes and losses."""

import pytest
import torch

from peco_scale.config import ConfigError
from peco_scale.models.dense import (
    Segmenter,
    SimpleFeaturePyramid,
    ViTBackbone,
    build_mask_rcnn,
    default_blocks,
    global_blocks,
    segmentation_loss,
    window_block,
)


@pytest.mark.parametrize("blocks", [(0, 1, 2, 3), (1, 3)])
def test_backbone_features_match_timm_forward_intermediates(blocks):
    torch.manual_seed(0)
    bb = ViTBackbone("vit_pico_patch16", 64, blocks).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ours = bb(x)
        ref = bb.vit.forward_intermediates(x, indices=list(blocks), norm=False, output_fmt="NCHW",
                                           intermediates_only=True)
    assert len(ours) == len(ref) == len(blocks)
    for a, b in zip(ours, ref):
        assert a.shape == (2, 128, 4, 4)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("grid,window", [((6, 6), 3), ((5, 7), 3), ((4, 4), 4)])
def test_window_block_runs_the_block_on_each_padded_window(grid, window):
    """Against a loop over the windows of the zero-padded token grid, each run through the block on
    its own; a token changed in one window changes that window's outputs only."""
    torch.manual_seed(0)
    blk = ViTBackbone("vit_pico_patch16", 64, (0,)).vit.blocks[0].eval()
    gh, gw = grid
    x = torch.randn(2, gh * gw, 128)
    with torch.no_grad():
        ours = window_block(blk, x, grid, window)
        ph, pw = -(-gh // window) * window, -(-gw // window) * window
        padded = torch.zeros(2, ph, pw, 128)
        padded[:, :gh, :gw] = x.reshape(2, gh, gw, 128)
        ref = torch.zeros_like(padded)
        for top in range(0, ph, window):
            for left in range(0, pw, window):
                win = padded[:, top:top + window, left:left + window].reshape(2, -1, 128)
                ref[:, top:top + window, left:left + window] = blk(win).reshape(2, window, window, 128)
        torch.testing.assert_close(ours, ref[:, :gh, :gw].reshape(2, gh * gw, 128), rtol=1e-5, atol=1e-5)
        if grid == (window, window):  # one window: the plain block
            torch.testing.assert_close(ours, blk(x), rtol=1e-5, atol=1e-5)
        y = x.clone()
        y[:, 0] += 10 * torch.randn(128)  # the top-left token
        changed = (window_block(blk, y, grid, window) - ours).abs().amax((0, 2)).reshape(gh, gw) > 0
    assert changed[:window, :window].all() and not changed[window:].any() and not changed[:, window:].any()


def test_vitdet_global_blocks_and_windowed_backbone():
    assert global_blocks(12) == (2, 5, 8, 11) and global_blocks(24) == (5, 11, 17, 23)
    assert global_blocks(32) == (7, 15, 23, 31)
    torch.manual_seed(0)
    bb = ViTBackbone("vit_pico_patch16", 128, (3,), window=4, global_attn=(3,)).eval()
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        (out,) = bb(x)
        vit = bb.vit  # reference: class token dropped, blocks 0-2 on 4x4 windows, block 3 global
        t = vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))[:, 1:]
        for blk in vit.blocks[:3]:
            t = torch.cat([torch.cat([blk(t.reshape(1, 8, 8, 128)[:, r:r + 4, c:c + 4].reshape(1, 16, 128))
                                      .reshape(1, 4, 4, 128) for c in (0, 4)], 2) for r in (0, 4)], 1).reshape(1, 64, 128)
        t = vit.blocks[3](t)
    torch.testing.assert_close(out, t.transpose(1, 2).reshape(1, 128, 8, 8), rtol=1e-5, atol=1e-5)


def test_default_blocks_follow_beit_and_bad_blocks_are_one_line():
    assert default_blocks(12) == (3, 5, 7, 11) and default_blocks(24) == (7, 11, 15, 23)
    assert default_blocks(32) == (7, 15, 23, 31) and default_blocks(4) == (0, 1, 2, 3)
    with pytest.raises(ConfigError, match=r"model.blocks \[0, 1, 9, 3\] must be increasing indices in 0..3"):
        Segmenter("vit_pico_patch16", 64, 5, blocks=(0, 1, 9, 3))
    with pytest.raises(ConfigError, match="give 4 block indices"):
        Segmenter("vit_pico_patch16", 64, 5, blocks=(0, 1))


def test_segmenter_scales_logits_and_loss():
    torch.manual_seed(0)
    model = Segmenter("vit_pico_patch16", 64, 5, channels=32)
    feats = model.neck(model.backbone(torch.randn(2, 3, 64, 64)))
    assert [tuple(f.shape[-2:]) for f in feats] == [(16, 16), (8, 8), (4, 4), (2, 2)]  # strides 4, 8, 16, 32
    x = torch.randn(2, 3, 64, 64)
    target = torch.randint(0, 5, (2, 64, 64))
    target[:, :8] = 255
    logits, aux = model(x)
    assert logits.shape == aux.shape == (2, 5, 64, 64)
    out = segmentation_loss(logits, aux, target)
    expected = (torch.nn.functional.cross_entropy(logits, target, ignore_index=255)
                + 0.4 * torch.nn.functional.cross_entropy(aux, target, ignore_index=255))
    torch.testing.assert_close(out["loss"], expected)
    out["loss"].backward()
    assert model.backbone.vit.patch_embed.proj.weight.grad is not None
    model.eval()
    logits, aux = model(x)
    assert aux is None and logits.shape == (2, 5, 64, 64)


def test_simple_feature_pyramid_strides():
    fpn = SimpleFeaturePyramid("vit_pico_patch16", 64, out_channels=32)
    out = fpn(torch.randn(1, 3, 64, 64))
    assert list(out) == ["p2", "p3", "p4", "p5", "p6"]
    assert [tuple(v.shape[1:]) for v in out.values()] == [(32, 16, 16), (32, 8, 8), (32, 4, 4), (32, 2, 2), (32, 1, 1)]


def test_mask_rcnn_trains_and_predicts():
    torch.manual_seed(0)
    model = build_mask_rcnn("vit_pico_patch16", 64, 3, channels=32)
    images = [torch.rand(3, 64, 64) for _ in range(2)]
    masks = torch.zeros(1, 64, 64, dtype=torch.uint8)
    masks[0, 10:30, 12:40] = 1
    targets = [{"boxes": torch.tensor([[12.0, 10.0, 40.0, 30.0]]), "labels": torch.tensor([2]), "masks": masks}] * 2
    losses = model(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    model.eval()
    with torch.no_grad():
        pred = model(images)
    assert len(pred) == 2 and set(pred[0]) == {"boxes", "labels", "scores", "masks"}
    assert pred[0]["masks"].shape[1:] == (1, 64, 64)


def test_mask_rcnn_anchor_sizes_per_level():
    """model.anchors sets the RPN's anchors: on each level, three boxes of about size^2 pixels (aspect
    ratios 0.5, 1, 2; torchvision rounds the corners), read back from the generated anchors."""
    from torchvision.models.detection.image_list import ImageList

    sizes = (8, 16, 32, 64, 128)
    model = build_mask_rcnn("vit_pico_patch16", 64, 3, channels=32, anchors=sizes).eval()
    images = ImageList(torch.zeros(1, 3, 64, 64), [(64, 64)])
    feats = list(model.backbone(images.tensors).values())
    anchors = model.rpn.anchor_generator(images, feats)[0]
    counts = [3 * f.shape[-2] * f.shape[-1] for f in feats]
    assert counts == [768, 192, 48, 12, 3] and len(anchors) == sum(counts)
    for size, level in zip(sizes, anchors.split(counts)):
        wh = (level[:, 2:] - level[:, :2])[:3]  # the three anchors at the first grid point
        assert (wh == float(size)).all(1).sum() == 1  # the square one, exactly
        assert torch.allclose(wh.prod(1), torch.full((3,), float(size * size)), rtol=0.15)
        assert sorted((wh[:, 1] / wh[:, 0]).tolist()) == pytest.approx([0.5, 1.0, 2.0], rel=0.15)


def test_window_starts_cover_the_side_like_mmseg():
    from peco_scale.models.dense import window_starts

    assert window_starts(512, 512, 341) == [0]
    assert window_starts(683, 512, 341) == [0, 171]  # the second window moved back to end at 683
    assert window_starts(1000, 512, 341) == [0, 341, 488]
    assert window_starts(40, 64, 43) == [0]  # a short side: one (padded) window


@pytest.mark.parametrize("flip", [False, True])
def test_slide_logits_equal_a_pixelwise_model_on_the_whole_image(flip):
    """A per-pixel model (1x1 conv) slid over a 100 x 150 image in 64-pixel windows gives what it
    gives on the whole image at once: windows are placed, cropped and averaged right."""
    from peco_scale.models.dense import slide_logits

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 1)

    def model(x):
        assert x.shape[-2:] == (64, 64)
        return conv(x), None

    image = torch.randn(1, 3, 100, 150)
    got = slide_logits(model, image, 4, 64, 43, flip=flip)
    torch.testing.assert_close(got, conv(image).detach(), rtol=1e-5, atol=1e-5)


def test_layer_decay_over_the_vit_only():
    """In a segmenter the ViT's parameters decay by depth (embeddings the most) and the neck and
    heads keep the full lr; every trainable parameter is in exactly one group."""
    from peco_scale.models.transfer import layer_decay_groups

    model = Segmenter("vit_pico_patch16", 64, 5, channels=32)
    groups = layer_decay_groups(model, 0.05, 0.5, vit="backbone.vit")
    names = [n for g in groups for n in g["names"]]
    assert sorted(names) == sorted(n for n, p in model.named_parameters() if p.requires_grad)
    scale = {n: g["lr_scale"] for g in groups for n in g["names"]}
    depth = 4
    assert scale["backbone.vit.patch_embed.proj.weight"] == 0.5 ** (depth + 1)
    assert scale["backbone.vit.blocks.2.attn.qkv.weight"] == 0.5 ** (depth + 1 - 3)
    assert scale["neck.up2.weight"] == scale["decode_head.classifier.weight"] == 1.0
    decay = {n: g["weight_decay"] for g in groups for n in g["names"]}
    assert decay["backbone.vit.pos_embed"] == 0.0 and decay["neck.up2.bias"] == 0.0
    assert decay["decode_head.classifier.weight"] == 0.05


def test_poly_schedule_is_linear_after_warmup():
    from peco_scale.train.trainer import Schedule

    s = Schedule(steps_per_epoch=10, total=110, warmup=10, base_lr=1.0, floor=0.0, kind="poly")
    assert s.lr(0) == pytest.approx(0.1) and s.lr(9) == pytest.approx(1.0)
    assert s.lr(10) == pytest.approx(1.0) and s.lr(60) == pytest.approx(0.5) and s.lr(110) == pytest.approx(0.0)


def test_step_schedule_drops_tenfold_at_vitdet_milestones():
    """ViTDet's schedule over 184375 iterations: x0.1 from iteration 163889 and again from 177546."""
    from peco_scale.train.trainer import Schedule

    s = Schedule(steps_per_epoch=1000, total=184375, warmup=250, base_lr=1e-4, kind="step")
    assert s.lr(0) == pytest.approx(1e-4 / 250) and s.lr(250) == pytest.approx(1e-4)
    assert s.lr(163888) == pytest.approx(1e-4) and s.lr(163890) == pytest.approx(1e-5)
    assert s.lr(177545) == pytest.approx(1e-5) and s.lr(177547) == pytest.approx(1e-6)
