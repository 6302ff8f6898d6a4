"""Stage 3, fine-tuning a pre-trained backbone for classification, under DeepSpeed ZeRO 0-3.

BEiT/PeCo recipe (docs/method.md): average-pooled features -> fc_norm -> linear head (timm's
VisionTransformer, so checkpoints are timm state dicts), layer-wise lr decay (each AdamW group
carries ``lr_scale``; the trainer sets ``lr = schedule(step) x lr_scale``), warm-up then cosine,
timm's Mixup/CutMix with label smoothing, stochastic depth, optional EMA of the weights (``ema.py``:
partitioned like the weights under ZeRO-3). The head starts at trunc_normal(std=2e-5), zero bias.

Every ``train.eval_every`` epochs and at the end the held-out set is evaluated (top-1/top-5, loss;
and the EMA weights' when enabled) and written to metrics.jsonl; a new best top-1 is checkpointed
and named in ``checkpoints/best`` (never pruned). Each rank's RNG (drop path, mixup: numpy + torch)
and EMA partition are saved in every checkpoint.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..config import ConfigError
from ..data import AugmentSpec
from ..data.eval import EvalLoader
from ..engine import dist as pdist
from ..engine.ema import ShardedEMA
from ..models.transfer import build_classifier
from ..models.vit import VIT_PRESETS
from ..models.cost import vit_forward_flops
from .finetune_config import FinetuneConfig, resolve_finetune
from .transfer import TransferStage


def build_criterion(cfg: FinetuneConfig, num_classes: int):
    """(mixup or None, loss(logits, targets)): timm's Mixup/CutMix + soft-target CE, or (smoothed) CE."""
    d = cfg.data
    if d.mixup > 0 or d.cutmix > 0:
        from timm.data import Mixup
        from timm.loss import SoftTargetCrossEntropy

        return Mixup(mixup_alpha=d.mixup, cutmix_alpha=d.cutmix, label_smoothing=d.smoothing,
                     num_classes=num_classes), SoftTargetCrossEntropy()
    return None, torch.nn.CrossEntropyLoss(label_smoothing=d.smoothing)


@torch.no_grad()
def evaluate(engine, loader: EvalLoader, device: torch.device, dtype: torch.dtype) -> dict[str, float]:
    """Top-1/top-5 (%) and mean cross-entropy over every held-out image (all ranks; padding excluded)."""
    was_training = engine.training
    engine.eval()
    sums = torch.zeros(5, dtype=torch.float64, device=device)  # images, top1, top5, loss, skipped
    for batch in loader:
        logits = engine(batch["image"].to(device, dtype)).float()
        y, valid = batch["label"].to(device), batch["valid"].to(device)
        hit = logits.topk(min(5, logits.shape[1]), dim=1).indices == y[:, None]
        loss = F.cross_entropy(logits, y, reduction="none")
        v = valid.double()
        sums += torch.stack([v.sum(), (hit[:, 0].double() * v).sum(), (hit.any(1).double() * v).sum(),
                             (loss.double() * v).sum(),
                             torch.tensor(float(batch["skipped"]), device=device, dtype=torch.float64)])
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(sums)
    engine.train(was_training)
    n = max(1.0, float(sums[0]))
    return {"top1": 100.0 * float(sums[1]) / n, "top5": 100.0 * float(sums[2]) / n, "loss": float(sums[3]) / n,
            "images": int(sums[0]), "skipped": int(sums[4])}


class FinetuneStage(TransferStage):
    name = "finetune"
    best_metric = "top1"
    EVAL_TEXT = ("top-1 {eval_top1:.2f}% top-5 {eval_top5:.2f}% loss {eval_loss:.4f}"
                 " on {eval_images} images, chance {chance:.2f}%")
    cfg: FinetuneConfig
    resolver = staticmethod(resolve_finetune)

    def build_loader(self):
        d, r = self.cfg.data, self.r
        spec = AugmentSpec(r.img_size, "finetune", scale=(d.min_crop_scale, 1.0), hflip=d.hflip, jitter=d.jitter)
        return self.make_loader(spec, r.batch_size)

    def prepare(self) -> None:
        d, r = self.cfg.data, self.r
        self.eval_loader = EvalLoader(d.val_path, r.img_size, batch_size=r.eval_batch_size, rank=self.rank,
                                      world_size=self.world, workers=min(d.workers, 4), crop_pct=d.eval_crop_pct,
                                      device=str(self.device))

    def build_models(self) -> None:
        """The classifier with the pretrained weights of ``model.init``; a fresh head."""
        r = self.r
        sd, info, layer_scale = self.pretrained()
        model = build_classifier(r.model_name, r.img_size, r.num_classes, drop_path=r.drop_path,
                                 layer_scale=layer_scale)
        self.load_vit(model, sd, info)
        with torch.no_grad():
            torch.nn.init.trunc_normal_(model.head.weight, std=2e-5)
            torch.nn.init.zeros_(model.head.bias)
        self.model, self.info = model, info
        self.flops_per_image = 3 * vit_forward_flops(VIT_PRESETS[r.model_name], r.img_size)  # forward + backward

    def build_engines(self) -> dict[str, Any]:
        engines = super().build_engines()
        self.ema = ShardedEMA(engines["model"].module, self.cfg.model.ema_decay) if self.cfg.model.ema else None
        self.mixup, self.criterion = build_criterion(self.cfg, self.r.num_classes)
        return engines

    def checkpoint_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters()) * (5 if self.ema is not None else 4) // 4  # EMA: +4 B

    def describe(self) -> str:
        r, d = self.r, self.cfg.data
        return (f"fine-tune {r.model_name} at {r.img_size} px, {r.num_classes} classes, mixup {d.mixup:.2g} cutmix "
                f"{d.cutmix:.2g} smoothing {d.smoothing:.2g}, {self.transfer_text()}")

    def micro_step(self, batch: dict[str, Any], step: int) -> dict[str, torch.Tensor]:
        device, engine = self.device, self.engines["model"]
        x, y = batch["image"].to(device, non_blocking=True), batch["label"].to(device, non_blocking=True)
        target = y
        if self.mixup is not None:
            x, target = self.mixup(x, y)
        logits = engine(x.to(self.dtype))
        loss = self.criterion(logits.float(), target)
        engine.backward(loss)
        engine.step()
        return {"loss": loss.detach(), "train_top1": (logits.detach().argmax(1) == y).float().mean() * 100}

    def after_step(self) -> None:
        if self.ema is not None:
            self.ema.update()

    def eval_due(self, step: int, stopping: bool) -> bool:
        per_epoch = self.schedule.steps_per_epoch
        return (step % per_epoch == 0 and (step // per_epoch) % self.cfg.train.eval_every == 0) or \
            step == self.schedule.total

    def eval_row(self, step: int) -> dict[str, Any]:
        engine = self.engines["model"]
        res = evaluate(engine, self.eval_loader, self.device, self.dtype)
        row = {"step": step, "epoch": step / self.schedule.steps_per_epoch, "eval_top1": res["top1"],
               "eval_top5": res["top5"], "eval_loss": res["loss"], "eval_images": res["images"],
               "eval_skipped": res["skipped"]}
        if self.ema is not None:
            with self.ema.swapped():
                res_ema = evaluate(engine, self.eval_loader, self.device, self.dtype)
            row.update(ema_eval_top1=res_ema["top1"], ema_eval_top5=res_ema["top5"], ema_eval_loss=res_ema["loss"])
        return row

    def eval_extra(self, row: dict[str, Any]) -> str:
        return f"; EMA top-1 {row['ema_eval_top1']:.2f}%" if "ema_eval_top1" in row else ""

    def model_meta(self) -> dict[str, Any]:
        r = self.r
        return {"name": r.model_name, "img_size": r.img_size, "num_classes": r.num_classes, "classes": r.classes}

    def rank_state(self) -> dict[str, Any] | None:
        return {"ema": self.ema.state_dict()} if self.ema is not None else None

    def load_state(self, saved: dict[str, Any], folder: Path) -> None:
        super().load_state(saved, folder)
        if self.ema is not None:
            ema_state = self.ckpt.load_rank_state(folder, "ema")
            if ema_state is None:
                raise ConfigError(f"checkpoint {folder} has no EMA state; resume without --model.ema or start a new "
                                  f"output_dir")
            self.ema.load_state_dict(ema_state)

    def after_save(self, folder: Path, step: int) -> None:
        if self.ema is not None:
            full = self.ema.full_state_dict()  # collective
            if self.rank == 0:
                from safetensors.torch import save_file

                tmp = folder / f".ema.safetensors.tmp{os.getpid()}"
                save_file({k: v.contiguous() for k, v in full.items()}, str(tmp))
                os.replace(tmp, folder / "ema.safetensors")
            pdist.barrier()
        super().after_save(folder, step)


# -- what launch/finetune.py runs (train/entry.py) -----------------------------------------------
CONFIG, resolve, STAGE, USER_ERRORS = FinetuneConfig, resolve_finetune, FinetuneStage, ()
