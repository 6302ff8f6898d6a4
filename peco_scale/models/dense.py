"""Dense prediction on a plain ViT (timm keys, as pre-training exports it).

- :class:`ViTBackbone`: the patch-token maps ``[B, D, H/p, W/p]`` of chosen blocks (before the
  final norm), one pass through the blocks.
- Segmentation (BEiT / MAE practice): :class:`MultiScaleNeck` turns four block outputs into strides
  4, 8, 16 and 32 (two stride-2 transposed convs with BatchNorm and GELU between them; one; identity;
  2x2 max-pool); :class:`Segmenter` puts Hugging Face transformers' UperNet head (pyramid pooling +
  FPN fuse) and its auxiliary FCN head (on the third scale) on top.
- Detection (ViTDet): :class:`SimpleFeaturePyramid` builds P2-P6 from the last block alone
  (transposed convs / identity / max-pool, then 1x1 and 3x3 convs with channel LayerNorm to 256
  channels, P6 by stride-2 subsampling of P5); :func:`build_mask_rcnn` puts torchvision's Mask R-CNN
  on it.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError
from .transfer import build_classifier
from .vit import VIT_PRESETS

# BEiT/MAE segmentation blocks by depth (B 12, L 24, H 32); other depths: evenly spaced quarters
SEG_BLOCKS = {12: (3, 5, 7, 11), 24: (7, 11, 15, 23), 32: (7, 15, 23, 31)}


def default_blocks(depth: int) -> tuple[int, ...]:
    return SEG_BLOCKS.get(depth, tuple(depth * k // 4 - 1 for k in (1, 2, 3, 4)))


def check_blocks(blocks: tuple[int, ...], depth: int, want: int | None = None) -> tuple[int, ...]:
    """Block indices, each in ``0..depth-1`` and increasing (``want`` of them when given)."""
    if want is not None and len(blocks) != want:
        raise ConfigError(f"model.blocks {list(blocks)}: give {want} block indices, e.g. {list(default_blocks(depth))}")
    if any(b < 0 or b >= depth for b in blocks) or list(blocks) != sorted(set(blocks)):
        raise ConfigError(f"model.blocks {list(blocks)} must be increasing indices in 0..{depth - 1} "
                          f"(this backbone has {depth} blocks), e.g. {list(default_blocks(depth))}")
    return tuple(blocks)


def global_blocks(depth: int) -> tuple[int, ...]:
    """ViTDet's global-attention blocks among windowed ones: the last of each quarter (B 2,5,8,11;
    L 5,11,17,23; H 7,15,23,31)."""
    return tuple(depth * k // 4 - 1 for k in (1, 2, 3, 4))


def window_block(block: nn.Module, x: torch.Tensor, grid: tuple[int, int], window: int) -> torch.Tensor:
    """Run a transformer block on non-overlapping ``window x window`` windows of the token grid
    ``x [B, gh*gw, D]`` (zero-padded to whole windows; the padding takes part in attention, as in
    ViTDet). Everything but attention acts per token, so this is the block with windowed attention."""
    b, _, d = x.shape
    gh, gw = grid
    ph, pw = (-gh) % window, (-gw) % window
    x = F.pad(x.reshape(b, gh, gw, d), (0, 0, 0, pw, 0, ph))
    nh, nw = (gh + ph) // window, (gw + pw) // window
    x = x.reshape(b, nh, window, nw, window, d).permute(0, 1, 3, 2, 4, 5).reshape(b * nh * nw, window * window, d)
    x = block(x)
    x = x.reshape(b, nh, nw, window, window, d).permute(0, 1, 3, 2, 4, 5).reshape(b, nh * window, nw * window, d)
    return x[:, :gh, :gw].reshape(b, gh * gw, d)


class ViTBackbone(nn.Module):
    """A timm VisionTransformer (no head) returning the patch-token maps of ``blocks``. With
    ``window`` > 0 (ViTDet) the class token is dropped after the position embedding and every
    block but ``global_attn`` attends within ``window x window`` windows."""

    def __init__(self, name: str, img_size: int, blocks: tuple[int, ...], *, drop_path: float = 0.0,
                 layer_scale: float | None = None, window: int = 0, global_attn: tuple[int, ...] = ()) -> None:
        super().__init__()
        preset = VIT_PRESETS[name]
        self.vit = build_classifier(name, img_size, 0, drop_path=drop_path, layer_scale=layer_scale)
        self.blocks = check_blocks(tuple(blocks), preset.depth)
        self.embed_dim, self.patch_size = preset.embed_dim, preset.patch_size
        self.window, self.global_attn = window, set(global_attn)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        vit = self.vit
        b, _, h, w = x.shape
        grid = (h // self.patch_size, w // self.patch_size)
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))
        prefix = vit.num_prefix_tokens
        if self.window:
            x, prefix = x[:, prefix:], 0
        out = []
        for i, blk in enumerate(vit.blocks[: self.blocks[-1] + 1]):
            x = window_block(blk, x, grid, self.window) if self.window and i not in self.global_attn else blk(x)
            if i in self.blocks:
                out.append(x[:, prefix:].transpose(1, 2).reshape(b, -1, *grid))
        return out


class MultiScaleNeck(nn.Module):
    """Four same-stride maps -> strides 4, 8, 16, 32 (BEiT's fpn1..fpn4 for patch 16)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.up4 = nn.Sequential(nn.ConvTranspose2d(dim, dim, 2, 2), nn.BatchNorm2d(dim), nn.GELU(),
                                 nn.ConvTranspose2d(dim, dim, 2, 2))
        self.up2 = nn.ConvTranspose2d(dim, dim, 2, 2)
        self.down2 = nn.MaxPool2d(2)

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        return [self.up4(feats[0]), self.up2(feats[1]), feats[2], self.down2(feats[3])]


def upernet_heads(in_dim: int, num_classes: int, channels: int = 512, aux_channels: int = 256):
    """(decode head, auxiliary head): transformers' UperNetHead and UperNetFCNHead (in_index 2)."""
    from transformers import UperNetConfig
    from transformers.models.upernet.modeling_upernet import UperNetFCNHead, UperNetHead

    # the config's own defaults fill whatever else the heads read; the backbone part is unused here
    cfg = UperNetConfig(pool_scales=[1, 2, 3, 6], hidden_size=channels, num_labels=num_classes,
                        auxiliary_channels=aux_channels, auxiliary_num_convs=1, auxiliary_concat_input=False)
    return UperNetHead(cfg, in_channels=[in_dim] * 4), UperNetFCNHead(cfg, in_channels=[in_dim] * 4, in_index=2)


class Segmenter(nn.Module):
    """ViT -> multi-scale neck -> UperNet (+ auxiliary FCN); logits at the input resolution."""

    def __init__(self, name: str, img_size: int, num_classes: int, *, blocks: tuple[int, ...] | None = None,
                 drop_path: float = 0.1, layer_scale: float | None = None, channels: int = 512) -> None:
        super().__init__()
        depth = VIT_PRESETS[name].depth
        blocks = check_blocks(tuple(blocks) if blocks else default_blocks(depth), depth, want=4)
        self.backbone = ViTBackbone(name, img_size, blocks, drop_path=drop_path, layer_scale=layer_scale)
        dim = self.backbone.embed_dim
        self.neck = MultiScaleNeck(dim)
        self.decode_head, self.auxiliary_head = upernet_heads(dim, num_classes, channels, max(channels // 2, 16))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        feats = self.neck(self.backbone(x))
        size = x.shape[-2:]
        logits = F.interpolate(self.decode_head(feats), size=size, mode="bilinear", align_corners=False)
        if not self.training:
            return logits, None
        aux = F.interpolate(self.auxiliary_head(feats), size=size, mode="bilinear", align_corners=False)
        return logits, aux


def segmentation_loss(logits: torch.Tensor, aux: torch.Tensor | None, target: torch.Tensor,
                      aux_weight: float = 0.4, ignore_index: int = 255) -> dict[str, torch.Tensor]:
    """Pixel cross-entropy of the decode head (weight 1) plus ``aux_weight`` x the auxiliary head's."""
    main = F.cross_entropy(logits.float(), target, ignore_index=ignore_index)
    out = {"loss": main, "decode_loss": main.detach()}
    if aux is not None:
        aux_loss = F.cross_entropy(aux.float(), target, ignore_index=ignore_index)
        out["loss"] = main + aux_weight * aux_loss
        out["aux_loss"] = aux_loss.detach()
    return out


# ----------------------------------------------------------------------------- detection


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW map (detectron2's LayerNorm for convs)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's pyramid from the last block: P2..P5 at strides 4..32 (for patch 16), P6 at 64."""

    def __init__(self, name: str, img_size: int, *, out_channels: int = 256, drop_path: float = 0.1,
                 layer_scale: float | None = None, window: int = 0, global_attn: tuple[int, ...] = ()) -> None:
        super().__init__()
        preset = VIT_PRESETS[name]
        self.backbone = ViTBackbone(name, img_size, (preset.depth - 1,), drop_path=drop_path, layer_scale=layer_scale,
                                    window=window, global_attn=global_attn)
        d = preset.embed_dim
        scales = [
            nn.Sequential(nn.ConvTranspose2d(d, d // 2, 2, 2), LayerNorm2d(d // 2), nn.GELU(),
                          nn.ConvTranspose2d(d // 2, d // 4, 2, 2)),
            nn.ConvTranspose2d(d, d // 2, 2, 2),
            nn.Identity(),
            nn.MaxPool2d(2),
        ]
        dims = (d // 4, d // 2, d, d)
        self.scales = nn.ModuleList(
            nn.Sequential(scale, nn.Conv2d(c, out_channels, 1, bias=False), LayerNorm2d(out_channels),
                          nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False), LayerNorm2d(out_channels))
            for scale, c in zip(scales, dims))
        self.out_channels = out_channels  # what torchvision's detectors read

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        last = self.backbone(x)[-1]
        levels = [scale(last) for scale in self.scales]
        names = ["p2", "p3", "p4", "p5"]
        out = OrderedDict(zip(names, levels))
        out["p6"] = F.max_pool2d(levels[-1], kernel_size=1, stride=2)
        return out


VITDET_ANCHORS = (32, 64, 128, 256, 512)  # RPN anchor size in pixels on P2..P6 (runs saved without one)


def build_mask_rcnn(name: str, img_size: int, num_classes: int, *, drop_path: float = 0.1,
                    layer_scale: float | None = None, window: int = 0, global_attn: tuple[int, ...] = (),
                    channels: int = 256, anchors: tuple[int, ...] = VITDET_ANCHORS,
                    mean: tuple[float, ...] = (0.485, 0.456, 0.406),
                    std: tuple[float, ...] = (0.229, 0.224, 0.225), **kwargs: Any) -> nn.Module:
    """torchvision's Mask R-CNN (RPN, RoIAlign heads) on :class:`SimpleFeaturePyramid`;
    ``num_classes`` excludes the background. ``channels``: the pyramid's and the mask head's width
    (256 as in ViTDet; the box head's MLP is 4x that). Images come in in [0, 1], padded to
    ``img_size`` square (the detector normalises them and, at that size, does not resize). ``anchors``:
    the RPN's anchor size on each of P2..P6, at aspect ratios 0.5, 1 and 2."""
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
    from torchvision.ops import MultiScaleRoIAlign

    backbone = SimpleFeaturePyramid(name, img_size, out_channels=channels, drop_path=drop_path,
                                    layer_scale=layer_scale, window=window, global_attn=global_attn)
    levels = ["p2", "p3", "p4", "p5"]
    anchor_gen = AnchorGenerator(sizes=tuple((int(a),) for a in anchors), aspect_ratios=((0.5, 1.0, 2.0),) * 5)
    classes = num_classes + 1
    return MaskRCNN(backbone, rpn_anchor_generator=anchor_gen,
                    box_roi_pool=MultiScaleRoIAlign(levels, 7, 0), mask_roi_pool=MultiScaleRoIAlign(levels, 14, 0),
                    box_head=TwoMLPHead(channels * 7 * 7, 4 * channels),
                    box_predictor=FastRCNNPredictor(4 * channels, classes),
                    mask_head=MaskRCNNHeads(channels, (channels,) * 4, 1),
                    mask_predictor=MaskRCNNPredictor(channels, channels, classes),
                    min_size=img_size, max_size=img_size, image_mean=list(mean), image_std=list(std), **kwargs)


def build_dense(kind: str, meta: dict[str, Any], *, drop_path: float = 0.0, layer_scale: float | None = None) -> nn.Module:
    """The task model of a segment or detect run from the ``model`` entry its checkpoints save
    (and its exports carry): a :class:`Segmenter` or a Mask R-CNN."""
    if kind == "segment":
        return Segmenter(meta["name"], int(meta["crop"]), int(meta["num_classes"]), blocks=tuple(meta["blocks"]),
                         drop_path=drop_path, layer_scale=layer_scale, channels=int(meta["channels"]))
    if kind == "detect":
        return build_mask_rcnn(meta["name"], int(meta["size"]), int(meta["num_classes"]), drop_path=drop_path,
                               layer_scale=layer_scale, window=int(meta["window"]),
                               global_attn=tuple(meta["global_attn"]), channels=int(meta["channels"]),
                               anchors=tuple(meta.get("anchors", VITDET_ANCHORS)),
                               box_detections_per_img=int(meta["detections"]))
    raise ValueError(f"no dense model of kind '{kind}' (segment or detect)")


def window_starts(size: int, crop: int, stride: int) -> list[int]:
    """Window offsets along one side (mmsegmentation's slide inference): every ``stride`` pixels,
    the last window moved back to end at the border; one window when the side is at most ``crop``."""
    n = max(size - crop + stride - 1, 0) // stride + 1
    return sorted({max(min(i * stride + crop, size) - crop, 0) for i in range(n)})


@torch.no_grad()
def slide_logits(model: nn.Module, image: torch.Tensor, num_classes: int, crop: int, stride: int,
                 flip: bool = False) -> torch.Tensor:
    """Class scores ``[1, C, h, w]`` of one image by sliding ``crop`` windows with ``stride``,
    each window zero-padded to ``crop`` and the overlaps averaged; with ``flip`` the mirrored
    windows' scores are averaged in too. ``model(x)[0]`` gives ``[N, C, crop, crop]`` logits."""
    _, _, h, w = image.shape
    total = image.new_zeros(1, num_classes, h, w)
    count = image.new_zeros(1, 1, h, w)
    for top in window_starts(h, crop, stride):
        for left in window_starts(w, crop, stride):
            win = image[:, :, top:top + crop, left:left + crop]
            wh, ww = win.shape[-2:]
            x = F.pad(win, (0, crop - ww, 0, crop - wh))
            batch = torch.cat([x, x.flip(-1)]) if flip else x
            out = model(batch)[0].float()
            scores = out[:1] if not flip else (out[:1] + out[1:].flip(-1)) / 2
            total[:, :, top:top + wh, left:left + ww] += scores[:, :, :wh, :ww]
            count[:, :, top:top + wh, left:left + ww] += 1
    return total / count
