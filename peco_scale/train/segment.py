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

import os
from typing import Any

import torch
import torch.nn.functional as F

from ..data.segmentation import SegAugment, SegmentationLoader, eval_samples
from ..engine import dist as pdist
from ..engine import ds
from ..engine.logger import log
from ..engine.weights import load_pretrained
from ..metrics.segmentation import confusion_matrix, segmentation_scores
from ..models.cost import vit_forward_flops
from ..models.dense import Segmenter, segmentation_loss, slide_logits
from ..models.transfer import adapt_state_dict, has_layer_scale, layer_decay_groups
from ..models.vit import VIT_PRESETS
from .finetune import seed_everything
from .segment_config import SegmentConfig, resolve_segment
from .trainer import EvalStage, use_bf16


class SegmentStage(EvalStage):
    name = "segment"
    best_metric = "mIoU"
    cfg: SegmentConfig

    def check(self, world: int) -> None:
        self.r = resolve_segment(self.cfg, world)
        self.grad_accum, self.global_batch = self.r.grad_accum, self.r.global_batch

    def build_loader(self):
        d, r = self.cfg.data, self.r
        aug = SegAugment(crop=r.crop, ratio_range=(d.ratio_min, d.ratio_max), cat_max_ratio=d.cat_max_ratio,
                         hflip=d.hflip, photometric=d.photometric)
        return SegmentationLoader(d.path, "training", r.num_classes, aug, batch_size=r.batch_size,
                                  rank=int(os.environ.get("RANK", "0")), world_size=r.world_size,
                                  seed=self.cfg.train.seed, workers=d.workers, device=self.loader_device(),
                                  reduce_zero_label=d.reduce_zero_label)

    def build_models(self) -> None:
        cfg, r = self.cfg, self.r
        sd, info = load_pretrained(cfg.model.init) if cfg.model.init else ({}, {"kind": "random"})
        preset = VIT_PRESETS[r.model_name]
        layer_scale = preset.layer_scale if (has_layer_scale(sd) or not sd) and preset.layer_scale > 0 else None
        model = Segmenter(r.model_name, r.crop, r.num_classes, blocks=r.blocks, drop_path=r.drop_path,
                          layer_scale=layer_scale, channels=cfg.model.channels)
        if sd:
            vit = model.backbone.vit
            weights = adapt_state_dict(sd, vit, source=f"model.init '{cfg.model.init}'")
            missing, unexpected = vit.load_state_dict(weights, strict=False)
            assert not unexpected and all(k.startswith(("head.", "fc_norm.")) for k in missing), (missing, unexpected)
            info["loaded"] = len(weights)
        info["layer_scale"] = layer_scale is not None
        self.model, self.info = model, info
        self.flops_per_image = 3 * vit_forward_flops(preset, r.crop)  # the backbone's share, forward + backward

    def seed_rank(self, seed: int) -> None:
        seed_everything(seed)

    def build_engines(self) -> dict[str, Any]:
        o, device = self.cfg.optim, self.device
        self.bf16 = use_bf16(self.cfg.train.precision, self.ds_dict, device)
        self.dtype = torch.bfloat16 if self.bf16 else torch.float32
        self.ds_cfg = self.ds_config(self.bf16)
        groups = layer_decay_groups(self.model, o.weight_decay, self.r.layer_decay, vit="backbone.vit")
        for g in groups:
            g.pop("names")
        self.n_groups = len(groups)
        optimizer = torch.optim.AdamW(groups, lr=self.schedule.base_lr, betas=tuple(o.betas), eps=o.eps,
                                      fused=device.type == "cuda")
        return {"model": ds.initialize(self.model.to(device), optimizer, self.ds_cfg)}

    def describe(self) -> str:
        r, m = self.r, self.cfg.model
        return (f"segment: {r.model_name} blocks {list(r.blocks)} + UperNet ({m.channels} ch) at {r.crop} px, "
                f"{r.num_classes} classes, from {m.init or 'random init'} ({self.info['kind']}); layer decay "
                f"{r.layer_decay:.2f} over {self.n_groups} groups, drop path {r.drop_path:.2f}; ZeRO "
                f"{self.ds_cfg['zero_optimization'].get('stage', 0)}, {'bf16' if self.bf16 else 'fp32'}; "
                f"lr {self.schedule.base_lr:.3g} ({self.cfg.optim.schedule})")

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
        counts = torch.tensor([passes, images], dtype=torch.int64, device=self.device)
        most = counts.clone()
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(most, op=torch.distributed.ReduceOp.MAX)
        empty = torch.zeros(1 + d.eval_flip, 3, r.crop, r.crop, device=self.device)
        for _ in range(int(most[0]) - passes):
            forward(empty)
        total = torch.cat([conf.flatten().to(self.device), counts[1:]])
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(total)
        engine.train(was_training)
        scores = segmentation_scores(total[:-1].cpu().reshape(r.num_classes, r.num_classes))
        scores["images"] = int(total[-1])
        return scores

    def evaluate(self, step: int, stopping: bool) -> tuple[dict[str, Any] | None, bool]:
        if stopping or not (step % self.cfg.train.eval_every == 0 or step == self.schedule.total):
            return None, False
        s = self.score()
        row = {"step": step, "eval_mIoU": 100 * s["mIoU"], "eval_aAcc": 100 * s["aAcc"], "eval_mAcc": 100 * s["mAcc"],
               "eval_images": s["images"], "eval_IoU": {k: round(100 * v, 3) for k, v in s["IoU"].items()}}
        improved = self.record_eval(row, row["eval_mIoU"], step)
        log.info("eval at step %d: mIoU %.2f%%, aAcc %.2f%%, mAcc %.2f%% on %d images; best mIoU %.2f%%", step,
                 row["eval_mIoU"], row["eval_aAcc"], row["eval_mAcc"], s["images"], self.best["mIoU"])
        return row, improved

    def client_state(self) -> dict[str, Any]:
        r = self.r
        return {"model": {"name": r.model_name, "crop": r.crop, "num_classes": r.num_classes, "blocks": list(r.blocks),
                          "channels": self.cfg.model.channels, "layer_scale": self.info["layer_scale"]},
                "init": {"path": self.cfg.model.init, "kind": self.info["kind"]}, "best": self.best}


# -- what launch/segment.py runs (train/entry.py) ------------------------------------------------
CONFIG, resolve, STAGE, USER_ERRORS = SegmentConfig, resolve_segment, SegmentStage, ()


def report(summary: dict[str, Any]) -> None:
    ev = summary["eval"]
    print(f"metrics: {summary['metrics']}")
    if ev:
        print(f"eval: mIoU {ev['eval_mIoU']:.2f}% aAcc {ev['eval_aAcc']:.2f}% mAcc {ev['eval_mAcc']:.2f}% on "
              f"{ev['eval_images']} images (best mIoU {summary['best']['mIoU']:.2f}% at step {summary['best']['step']})")
    print(f"checkpoint: {summary['checkpoint']}")


