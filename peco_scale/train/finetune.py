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
from ..engine import ds
from ..engine.ema import ShardedEMA
from ..engine.logger import log
from ..engine.weights import load_pretrained
from ..models.transfer import adapt_state_dict, build_classifier, has_layer_scale, layer_decay_groups
from ..models.vit import VIT_PRESETS
from ..models.cost import vit_forward_flops
from .finetune_config import FinetuneConfig, resolve_finetune
from .trainer import EvalStage, use_bf16


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


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


class FinetuneStage(EvalStage):
    name = "finetune"
    best_metric = "top1"
    cfg: FinetuneConfig

    def check(self, world: int) -> None:
        self.r = resolve_finetune(self.cfg, world)
        self.grad_accum, self.global_batch = self.r.grad_accum, self.r.global_batch

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
        """The classifier with the pretrained weights of ``model.init``."""
        cfg, r = self.cfg, self.r
        sd, info = (load_pretrained(cfg.model.init) if cfg.model.init else ({}, {"kind": "random"}))
        preset = VIT_PRESETS[r.model_name]
        # keep layer scale when the weights have gammas (stage-2 checkpoints; random init uses the preset's)
        layer_scale = preset.layer_scale if (has_layer_scale(sd) or not sd) and preset.layer_scale > 0 else None
        model = build_classifier(r.model_name, r.img_size, r.num_classes, drop_path=r.drop_path,
                                 layer_scale=layer_scale)
        if sd:
            weights = adapt_state_dict(sd, model, source=f"model.init '{cfg.model.init}'")
            missing, unexpected = model.load_state_dict(weights, strict=False)
            assert not unexpected and all(k.startswith(("head.", "fc_norm.")) for k in missing), (missing, unexpected)
            info["loaded"] = len(weights)
        with torch.no_grad():
            torch.nn.init.trunc_normal_(model.head.weight, std=2e-5)
            torch.nn.init.zeros_(model.head.bias)
        info["layer_scale"] = layer_scale is not None
        self.model, self.info = model, info
        self.flops_per_image = 3 * vit_forward_flops(preset, r.img_size)  # forward + backward (2x), per image

    def seed_rank(self, seed: int) -> None:
        seed_everything(seed)  # drop path (torch), mixup/cutmix (numpy, random): per rank, saved on checkpoints

    def build_engines(self) -> dict[str, Any]:
        o, device = self.cfg.optim, self.device
        self.bf16 = use_bf16(self.cfg.train.precision, self.ds_dict, device)
        self.dtype = torch.bfloat16 if self.bf16 else torch.float32
        self.ds_cfg = self.ds_config(self.bf16)
        groups = layer_decay_groups(self.model, o.weight_decay, self.r.layer_decay)
        for g in groups:
            g.pop("names")
        self.n_groups = len(groups)
        optimizer = torch.optim.AdamW(groups, lr=self.schedule.base_lr, betas=tuple(o.betas), eps=o.eps,
                                      fused=device.type == "cuda")
        engine = ds.initialize(self.model.to(device), optimizer, self.ds_cfg)
        self.ema = ShardedEMA(engine.module, self.cfg.model.ema_decay) if self.cfg.model.ema else None
        self.mixup, self.criterion = build_criterion(self.cfg, self.r.num_classes)
        return {"model": engine}

    def checkpoint_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters()) * (5 if self.ema is not None else 4) // 4  # EMA: +4 B

    def describe(self) -> str:
        r, d, m = self.r, self.cfg.data, self.cfg.model
        return (f"fine-tune {r.model_name} at {r.img_size} px, {r.num_classes} classes, from "
                f"{m.init or 'random init'} ({self.info['kind']}); layer decay {r.layer_decay:.2f} over "
                f"{self.n_groups} groups, drop path {r.drop_path:.2f}, mixup {d.mixup:.2g} cutmix {d.cutmix:.2g} "
                f"smoothing {d.smoothing:.2g}; ZeRO {self.ds_cfg['zero_optimization'].get('stage', 0)}, "
                f"{'bf16' if self.bf16 else 'fp32'}; lr {self.schedule.base_lr:.3g}")

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

    def evaluate(self, step: int, stopping: bool) -> tuple[dict[str, Any] | None, bool]:
        per_epoch, total = self.schedule.steps_per_epoch, self.schedule.total
        epoch_done = step % per_epoch == 0
        if not ((epoch_done and (step // per_epoch) % self.cfg.train.eval_every == 0) or step == total):
            return None, False
        engine = self.engines["model"]
        res = evaluate(engine, self.eval_loader, self.device, self.dtype)
        row = {"step": step, "epoch": step / per_epoch, "eval_top1": res["top1"], "eval_top5": res["top5"],
               "eval_loss": res["loss"], "eval_images": res["images"], "eval_skipped": res["skipped"]}
        if self.ema is not None:
            with self.ema.swapped():
                res_ema = evaluate(engine, self.eval_loader, self.device, self.dtype)
            row.update(ema_eval_top1=res_ema["top1"], ema_eval_top5=res_ema["top5"], ema_eval_loss=res_ema["loss"])
        improved = self.record_eval(row, res["top1"], step)
        log.info("eval at step %d (epoch %.2f): top-1 %.2f%%, top-5 %.2f%%, loss %.4f on %d images%s; best %.2f%%",
                 step, row["epoch"], res["top1"], res["top5"], res["loss"], res["images"],
                 f"; EMA top-1 {row['ema_eval_top1']:.2f}%" if self.ema is not None else "", self.best["top1"])
        return row, improved

    def client_state(self) -> dict[str, Any]:
        r = self.r
        return {"model": {"name": r.model_name, "img_size": r.img_size, "num_classes": r.num_classes,
                          "classes": r.classes, "layer_scale": self.info["layer_scale"]},
                "init": {"path": self.cfg.model.init, "kind": self.info["kind"]}, "best": self.best}

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


def report(summary: dict[str, Any]) -> None:
    ev = summary["eval"]
    print(f"metrics: {summary['metrics']}")
    if ev:
        print(f"eval: top-1 {ev['eval_top1']:.2f}% top-5 {ev['eval_top5']:.2f}% on {ev['eval_images']} images, "
              f"chance {100.0 / summary['num_classes']:.2f}% (best top-1 {summary['best']['top1']:.2f}% at step "
              f"{summary['best']['step']})")
    print(f"checkpoint: {summary['checkpoint']}")
