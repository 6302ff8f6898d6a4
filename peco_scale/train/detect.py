"""Detection and instance-segmentation transfer: torchvision's Mask R-CNN on a pre-trained ViT
through ViTDet's simple feature pyramid, under DeepSpeed ZeRO 0-3.

The backbone is the stage-2 / exported ViT (timm keys; position embeddings resized to
``data.size``), with window attention in all but four global blocks when ``model.window`` > 0;
its last block feeds the pyramid (P2-P6), torchvision's RPN and RoI heads (box, class, mask) sit
on top. AdamW with layer-wise lr decay over the ViT (pyramid and heads at the full lr), warm-up
then ViTDet's step decay. Training samples use large-scale jitter at ``data.size``. Every
``train.eval_every`` steps and at the end the validation split is predicted (images rescaled to
``data.size``, predictions mapped back to the original pixels), the results of all ranks are
gathered and scored by pycocotools (box and mask AP, AP50, AP75, APs/m/l); a new best box AP is
checkpointed and named in ``checkpoints/best``.
"""

from __future__ import annotations

from typing import Any

import torch

from ..data.detection import CocoSplit, DetAugment, DetectionLoader, eval_samples, to_coco_results
from ..engine import dist as pdist
from ..metrics.detection import coco_scores
from ..models.cost import vit_forward_flops
from ..models.dense import build_dense
from ..models.vit import VIT_PRESETS
from .detect_config import DetectConfig, resolve_detect
from .transfer import TransferStage

LOSSES = ("loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg")


class DetectStage(TransferStage):
    name = "detect"
    best_metric = "bbox_AP"
    EVAL_TEXT = ("box AP {eval_bbox_AP:.2f} (AP50 {eval_bbox_AP50:.2f}), mask AP {eval_segm_AP:.2f}"
                 " (AP50 {eval_segm_AP50:.2f}) on {eval_images} images")
    cfg: DetectConfig
    resolver = staticmethod(resolve_detect)
    vit_path = "backbone.backbone.vit"

    def build_loader(self):
        d, r = self.cfg.data, self.r
        aug = DetAugment(size=r.size, scale_range=(d.scale_min, d.scale_max), hflip=d.hflip)
        return DetectionLoader(d.path, d.train_split, aug, batch_size=r.batch_size, **self.loader_kwargs())

    def prepare(self) -> None:
        self.val = CocoSplit(self.cfg.data.path, self.cfg.data.val_split)

    def build_models(self) -> None:
        r = self.r
        sd, info, layer_scale = self.pretrained()
        model = build_dense(self.name, self.model_meta(), drop_path=r.drop_path, layer_scale=layer_scale)
        self.load_vit(model.backbone.backbone.vit, sd, info)
        self.model, self.info = model, info
        self.flops_per_image = 3 * vit_forward_flops(VIT_PRESETS[r.model_name], r.size)  # backbone, fwd + bwd

    def describe(self) -> str:
        r = self.r
        attn = f"window {r.window}, global blocks {list(r.global_attn)}" if r.window else "global attention"
        return (f"detect: {r.model_name} ({attn}) + simple feature pyramid + Mask R-CNN at {r.size} px, "
                f"{r.num_classes} classes, {self.transfer_text()}")

    def micro_step(self, batch: dict[str, Any], step: int) -> dict[str, torch.Tensor]:
        engine = self.engines["model"]
        losses = engine(list(batch["image"].to(self.dtype)), batch["target"])
        loss = sum(losses[k] for k in LOSSES)
        engine.backward(loss)
        engine.step()
        return {"loss": loss.detach(), **{k: losses[k].detach() for k in LOSSES}}

    @torch.no_grad()
    def predict(self) -> tuple[list[dict[str, Any]], list[int]]:
        """This rank's share of the validation split as COCO results, and the image ids it covered.
        Every rank runs as many forward passes as the busiest (ZeRO-3)."""
        r, engine = self.r, self.engines["model"]
        was_training = engine.training
        engine.eval()
        results, ids = [], []
        for image_id, image, scale in eval_samples(self.val, r.size, rank=self.rank, world_size=self.world):
            out = engine([image.to(self.device, self.dtype)])[0]
            results += to_coco_results(self.val, image_id, out, scale)
            ids.append(image_id)
        empty = torch.zeros(3, r.size, r.size, device=self.device, dtype=self.dtype)
        pdist.match_forward_passes(len(ids), lambda: engine([empty]), self.device)
        engine.train(was_training)
        return results, ids

    def score(self) -> dict[str, Any]:
        """Box and mask AP of the validation split, from the results of every rank."""
        results, ids = self.predict()
        gathered = pdist.gather_objects((results, ids))
        scores = None
        if self.rank == 0:
            all_results = [res for part, _ in gathered for res in part]
            all_ids = sorted(i for _, part in gathered for i in part)
            scores = {"images": len(all_ids), "detections": len(all_results)}
            for kind in ("bbox", "segm"):
                scores.update({f"{kind}_{k}": v for k, v in coco_scores(self.val.coco, all_results, kind, all_ids).items()})
        return pdist.broadcast_object(scores)

    def eval_row(self, step: int) -> dict[str, Any]:
        s = self.score()
        # AP in percent; None where the split has no ground truth for it (COCOeval's -1, e.g. no large objects)
        return {"step": step, **{f"eval_{k}": (None if v < 0 else 100 * v) if "AP" in k else v for k, v in s.items()}}

    def model_meta(self) -> dict[str, Any]:
        r = self.r
        return {"name": r.model_name, "size": r.size, "num_classes": r.num_classes, "window": r.window,
                "channels": self.cfg.model.channels, "detections": self.cfg.model.detections,
                "anchors": list(self.cfg.model.anchors),
                "global_attn": list(r.global_attn), "categories": [list(c) for c in r.categories]}


# -- what launch/detect.py runs (train/entry.py) -------------------------------------------------
CONFIG, resolve, STAGE, USER_ERRORS = DetectConfig, resolve_detect, DetectStage, ()
