"""Semantic segmentation transfer: UperNet on a pre-trained ViT, under DeepSpeed ZeRO 0-3.

The backbone is the stage-2 / exported ViT (timm keys; position embeddings resized to the crop),
four of its blocks feed BEiT's multi-scale neck, transformers' UperNet head and its auxiliary FCN
head predict the classes (loss 1.0 / 0.4, pixels labelled 255 ignored). AdamW with layer-wise lr
decay over the ViT (neck and heads at the full lr), warm-up then poly decay. BatchNorm (neck, heads)
normalises each rank's micro-batch; its running statistics are averaged over ranks after every
step, so evaluation and checkpoints do not depend on the rank. Every
``train.eval_every`` steps and at the end the validation split is scored by sliding windows (mIoU,
per-class IoU, pixel accuracy, gathered over ranks); a new best mIoU is checkpointed and named in
``checkpoints/best``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..data.segmentation import SegAugment, SegmentationLoader, eval_samples
from ..engine import dist as pdist
from ..metrics.segmentation import confusion_matrix, segmentation_scores
from ..models.cost import vit_forward_flops
from ..models.dense import build_dense, segmentation_loss, slide_logits
from ..models.vit import VIT_PRESETS
from .segment_config import SegmentConfig, resolve_segment
from .transfer import TransferStage


class SegmentStage(TransferStage):
    name = "segment"
    best_metric = "mIoU"
    EVAL_TEXT = "mIoU {eval_mIoU:.2f}% aAcc {eval_aAcc:.2f}% mAcc {eval_mAcc:.2f}% on {eval_images} images"
    cfg: SegmentConfig
    resolver = staticmethod(resolve_segment)
    vit_path = "backbone.vit"

    def build_loader(self):
        d, r = self.cfg.data, self.r
        aug = SegAugment(crop=r.crop, ratio_range=(d.ratio_min, d.ratio_max), cat_max_ratio=d.cat_max_ratio,
                         hflip=d.hflip, photometric=d.photometric)
        return SegmentationLoader(d.path, "training", r.num_classes, aug, batch_size=r.batch_size,
                                  reduce_zero_label=d.reduce_zero_label, **self.loader_kwargs())

    def build_models(self) -> None:
        r = self.r
        sd, info, layer_scale = self.pretrained()
        model = build_dense(self.name, self.model_meta(), drop_path=r.drop_path, layer_scale=layer_scale)
        self.load_vit(model.backbone.vit, sd, info)
        self.model, self.info = model, info
        self.flops_per_image = 3 * vit_forward_flops(VIT_PRESETS[r.model_name], r.crop)  # backbone, fwd + bwd

    def describe(self) -> str:
        r = self.r
        return (f"segment: {r.model_name} blocks {list(r.blocks)} + UperNet ({self.cfg.model.channels} ch) at "
                f"{r.crop} px, {r.num_classes} classes, {self.transfer_text()}")

    def micro_step(self, batch: dict[str, Any], step: int) -> dict[str, torch.Tensor]:
        engine = self.engines["model"]
        x, y = batch["image"].to(self.device, non_blocking=True), batch["label"].to(self.device, non_blocking=True)
        logits, aux = engine(x.to(self.dtype))
        out = segmentation_loss(logits, aux, y, aux_weight=self.cfg.model.aux_weight)
        engine.backward(out["loss"])
        engine.step()
        valid = y != 255
        acc = (logits.detach().argmax(1)[valid] == y[valid]).float().mean() * 100 if valid.any() else logits.new_zeros(())
        return {"loss": out["loss"].detach(), "decode_loss": out["decode_loss"], "aux_loss": out["aux_loss"],
                "pixel_acc": acc}

    def after_step(self) -> None:
        pdist.average_norm_stats(self.engines["model"].module)

    @torch.no_grad()
    def score(self) -> dict[str, Any]:
        """Sliding-window scores of the validation split over all ranks. Every rank runs the same
        number of forward passes (ZeRO-3 gathers parameters collectively): the ranks with fewer
        windows run extra passes on an empty window."""
        d, r = self.cfg.data, self.r
        engine = self.engines["model"]
        was_training = engine.training
        engine.eval()
        passes = 0

        def forward(x: torch.Tensor):
            nonlocal passes
            passes += 1
            return engine(x.to(self.dtype))

        conf = torch.zeros(r.num_classes, r.num_classes, dtype=torch.int64)
        images = 0
        for _, image, label in eval_samples(d.path, "validation", r.crop, rank=self.rank, world_size=self.world,
                                            reduce_zero_label=d.reduce_zero_label):
            logits = slide_logits(forward, image.to(self.device), r.num_classes, r.crop, d.eval_stride, d.eval_flip)
            logits = F.interpolate(logits, size=tuple(label.shape), mode="bilinear", align_corners=False)
            conf += confusion_matrix(logits.argmax(1)[0].cpu(), label, r.num_classes)
            images += 1
        empty = torch.zeros(1 + d.eval_flip, 3, r.crop, r.crop, device=self.device)
        pdist.match_forward_passes(passes, lambda: forward(empty), self.device)
        total = torch.cat([conf.flatten().to(self.device), torch.tensor([images], device=self.device)])
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(total)
        engine.train(was_training)
        scores = segmentation_scores(total[:-1].cpu().reshape(r.num_classes, r.num_classes))
        scores["images"] = int(total[-1])
        return scores

    def eval_row(self, step: int) -> dict[str, Any]:
        s = self.score()
        return {"step": step, "eval_mIoU": 100 * s["mIoU"], "eval_aAcc": 100 * s["aAcc"], "eval_mAcc": 100 * s["mAcc"],
                "eval_images": s["images"], "eval_IoU": {k: round(100 * v, 3) for k, v in s["IoU"].items()}}

    def model_meta(self) -> dict[str, Any]:
        r = self.r
        return {"name": r.model_name, "crop": r.crop, "num_classes": r.num_classes, "blocks": list(r.blocks),
                "channels": self.cfg.model.channels}


# -- what launch/segment.py runs (train/entry.py) ------------------------------------------------
CONFIG, resolve, STAGE, USER_ERRORS = SegmentConfig, resolve_segment, SegmentStage, ()
