"""Stage 3: fine-tuning a pre-trained backbone for classification, under DeepSpeed ZeRO 0-3.

BEiT/PeCo recipe (docs/method.md): average-pooled features -> fc_norm -> linear head (timm's
VisionTransformer, so checkpoints are timm state dicts), layer-wise lr decay (each AdamW group
carries ``lr_scale``; the schedule sets ``lr = schedule(step) x lr_scale``), linear warm-up then
cosine, timm's Mixup/CutMix with label smoothing (SoftTargetCrossEntropy), stochastic depth,
optional EMA of the weights (``ema.py``: partitioned like the weights under ZeRO-3). The head
starts at trunc_normal(std=2e-5) with zero bias (MAE).

Every ``train.eval_every`` epochs and at the end, the held-out set is evaluated (top-1/top-5,
loss; and the EMA weights' when enabled) and written to metrics.jsonl. Checkpoints: every
``train.ckpt_every`` steps, at the end, and whenever top-1 improves; ``checkpoints/best`` names
the best one (never pruned) and ``latest`` the newest. Resume is exact: the data position is a
function of the step, and each rank's RNG (drop path, mixup: numpy + torch) and EMA partition
are saved in every checkpoint.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..config import ConfigError, to_dict
from ..data.backends import AugmentSpec, make_loader
from ..data.eval import EvalLoader
from ..models.transfer import (adapt_state_dict, build_classifier, has_layer_scale, layer_decay_groups,
                               load_pretrained)
from ..models.vit import VIT_PRESETS
from ..plan import vit_forward_flops
from . import dist as pdist
from . import ds, preempt
from .checkpoint import CheckpointManager, check_writable, find_resume
from .common import Window, lr_at, optimizer_steps, progress_row, step_schedule, stop_if_weights_nonfinite
from .ema import ShardedEMA
from .finetune_config import FinetuneConfig, FinetuneResolved, resolve_finetune
from .logger import MetricsLogger, log
from .preempt import Interrupted
from .stage2 import _check_resume_compatible, _wandb_cfg, use_bf16


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def build_model(cfg: FinetuneConfig, r: FinetuneResolved) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The classifier with the pretrained weights of ``model.init`` (identical on every rank)."""
    sd, info = (load_pretrained(cfg.model.init) if cfg.model.init else ({}, {"kind": "random"}))
    preset = VIT_PRESETS[r.model_name]
    # keep layer scale when the weights have gammas (stage-2 checkpoints; random init uses the preset's)
    layer_scale = preset.layer_scale if (has_layer_scale(sd) or not sd) and preset.layer_scale > 0 else None
    model = build_classifier(r.model_name, r.img_size, r.num_classes, drop_path=r.drop_path, layer_scale=layer_scale)
    if sd:
        weights = adapt_state_dict(sd, model, source=f"model.init '{cfg.model.init}'")
        missing, unexpected = model.load_state_dict(weights, strict=False)
        assert not unexpected and all(k.startswith(("head.", "fc_norm.")) for k in missing), (missing, unexpected)
        info["loaded"] = len(weights)
    with torch.no_grad():
        torch.nn.init.trunc_normal_(model.head.weight, std=2e-5)
        torch.nn.init.zeros_(model.head.bias)
    info["layer_scale"] = layer_scale is not None
    return model, info


def build_train_loader(cfg: FinetuneConfig, r: FinetuneResolved):
    d = cfg.data
    spec = AugmentSpec(r.img_size, "finetune", scale=(d.min_crop_scale, 1.0), hflip=d.hflip, jitter=d.jitter)
    device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu"
    return make_loader(d.backend, d.path, spec, batch_size=r.batch_size, rank=int(os.environ.get("RANK", "0")),
                       world_size=r.world_size, seed=cfg.train.seed, workers=d.workers, device=device)


def build_criterion(cfg: FinetuneConfig, num_classes: int):
    """(mixup or None, loss(logits, targets)) -- timm's Mixup/CutMix + soft-target CE, or (smoothed) CE."""
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
        k = min(5, logits.shape[1])
        topk = logits.topk(k, dim=1).indices
        hit = topk == y[:, None]
        loss = F.cross_entropy(logits, y, reduction="none")
        v = valid.double()
        sums += torch.stack([v.sum(), (hit[:, 0].double() * v).sum(), (hit.any(1).double() * v).sum(),
                             (loss.double() * v).sum(), torch.tensor(float(batch["skipped"]), device=device,
                                                                     dtype=torch.float64)])
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(sums)
    engine.train(was_training)
    n = max(1.0, float(sums[0]))
    return {"top1": 100.0 * float(sums[1]) / n, "top5": 100.0 * float(sums[2]) / n, "loss": float(sums[3]) / n,
            "images": int(sums[0]), "skipped": int(sums[4])}


def finetune(cfg: FinetuneConfig, ds_dict: dict[str, Any]) -> dict[str, Any]:
    """Run fine-tuning as configured; returns a summary. All ranks call it."""
    r = resolve_finetune(cfg)
    t, o, d, m = cfg.train, cfg.optim, cfg.data, cfg.model
    loader = build_train_loader(cfg, r)  # fails fast on bad data, before the process group starts
    ckpt = CheckpointManager(Path(t.output_dir) / "checkpoints", keep_last=t.keep_last)
    resume_from = None
    if t.resume:
        resume_from = find_resume(ckpt.root) if t.resume == "auto" else Path(t.resume)
        if resume_from is not None:
            _check_resume_compatible(resume_from, "", r.world_size)
    check_writable(Path(t.output_dir))
    rank, world, device = pdist.init_distributed()
    if world != r.world_size:
        r = resolve_finetune(cfg, world)
    run_dir = Path(t.output_dir)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=1))

    steps_per_epoch, total_steps, warmup, base_lr = step_schedule(loader.batches_per_epoch, r.grad_accum,
                                                                  r.global_batch, t, o, d.path)
    eval_loader = EvalLoader(d.val_path, r.img_size, batch_size=r.eval_batch_size, rank=rank, world_size=world,
                             workers=min(d.workers, 4), crop_pct=d.eval_crop_pct, device=str(device))

    torch.manual_seed(t.seed)  # identical init on every rank
    model, info = build_model(cfg, r)
    seed_everything(t.seed + rank)  # drop path (torch), mixup/cutmix (numpy, random): per rank, saved on checkpoints
    bf16 = use_bf16(cfg, ds_dict, device)
    zero = None if t.zero_stage < 0 else t.zero_stage
    ds_cfg = ds.finalize_ds_config(ds_dict, micro_batch=r.batch_size, grad_accum=r.grad_accum, world_size=world,
                                   grad_clip=o.grad_clip, zero_stage=zero, bf16=bf16)
    ckpt.check_output(sum(p.numel() for p in model.parameters()) * (5 if m.ema else 4) // 4, device)  # EMA: +4 B
    groups = layer_decay_groups(model, o.weight_decay, r.layer_decay)
    for g in groups:
        g.pop("names")
    optimizer = torch.optim.AdamW(groups, lr=base_lr, betas=tuple(o.betas), eps=o.eps, fused=device.type == "cuda")
    log.info("fine-tune %s at %d px, %d classes, from %s (%s); layer decay %.2f over %d groups, drop path %.2f, "
             "mixup %.2g cutmix %.2g smoothing %.2g; %d steps/epoch at global batch %d; ZeRO %d, %s; lr %.3g",
             r.model_name, r.img_size, r.num_classes, m.init or "random init", info["kind"], r.layer_decay,
             len(groups), r.drop_path, d.mixup, d.cutmix, d.smoothing, steps_per_epoch, r.global_batch,
             ds_cfg["zero_optimization"].get("stage", 0), "bf16" if bf16 else "fp32", base_lr)
    engine = ds.initialize(model.to(device), optimizer, ds_cfg)
    engines = {"model": engine}
    ema = ShardedEMA(engine.module, m.ema_decay) if m.ema else None
    mixup, criterion = build_criterion(cfg, r.num_classes)
    preset = VIT_PRESETS[r.model_name]
    flops = 3 * vit_forward_flops(preset, r.img_size)  # forward + backward (2x), per image

    start_step, wandb_id, best = 0, None, {"top1": -1.0, "step": 0}
    if resume_from is not None:
        saved = ckpt.load(resume_from, engines)
        start_step, wandb_id, best = saved["step"], saved.get("wandb_id"), saved.get("best", best)
        if ema is not None:
            ema_state = ckpt.load_rank_state(resume_from, "ema")
            if ema_state is None:
                raise ConfigError(f"checkpoint {resume_from} has no EMA state; resume without --model.ema or "
                                  f"start a new output_dir")
            ema.load_state_dict(ema_state)
        log.info("resumed from %s at step %d", resume_from, start_step)
    elif t.resume:
        log.info("resume=auto: no complete checkpoint in %s, starting fresh", ckpt.root)
    metrics = MetricsLogger(run_dir, rank, total_steps, start_step, wandb_cfg=_wandb_cfg(cfg, run_dir, wandb_id))
    metrics.truncate_after(start_step)

    state = {"config": to_dict(cfg), "world_size": world, "kind": "finetune",
             "model": {"name": r.model_name, "img_size": r.img_size, "num_classes": r.num_classes,
                       "classes": r.classes, "layer_scale": info["layer_scale"]},
             "init": {"path": m.init, "kind": info["kind"]}}
    dtype = torch.bfloat16 if bf16 else torch.float32
    engine.train()
    step, last, last_eval, skipped = start_step, {}, {}, 0
    window = Window()

    def save(at: int) -> None:
        stop_if_weights_nonfinite(engine.module, at, ckpt.root, device)
        rank_state = {"ema": ema.state_dict()} if ema is not None else None
        folder = ckpt.save(engines, at, {**state, "best": best, "wandb_id": metrics.wandb_id}, rank_state=rank_state)
        if ema is not None:
            full = ema.full_state_dict()  # collective
            if rank == 0:
                from safetensors.torch import save_file

                tmp = folder / f".ema.safetensors.tmp{os.getpid()}"
                save_file({k: v.contiguous() for k, v in full.items()}, str(tmp))
                os.replace(tmp, folder / "ema.safetensors")
            pdist.barrier()
        if best["step"] == at:
            ckpt.mark_best(folder.name)

    stopping = None
    stop = preempt.current()
    for step, epoch, micro_batches in optimizer_steps(loader, start_step, total_steps, steps_per_epoch,
                                                      r.grad_accum):
        lr = lr_at(step, base_lr, warmup=warmup, total=total_steps, floor=min(o.min_lr, base_lr))
        for group in engine.optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        acc = {"loss": 0.0, "train_top1": 0.0}
        for batch in micro_batches:
            skipped += batch["skipped"]
            x, y = batch["image"].to(device, non_blocking=True), batch["label"].to(device, non_blocking=True)
            target = y
            if mixup is not None:
                x, target = mixup(x, y)
            logits = engine(x.to(dtype))
            loss = criterion(logits.float(), target)
            engine.backward(loss)
            engine.step()
            acc["loss"] = acc["loss"] + loss.detach() / r.grad_accum
            acc["train_top1"] = acc["train_top1"] + (logits.detach().argmax(1) == y).float().mean() * 100 / r.grad_accum
        if ema is not None:
            ema.update()
        acc_f = {k: float(v) for k, v in acc.items()}
        stopping = stop.check(acc_f["loss"], step + 1, ckpt.root, device)
        step += 1
        window.add(acc_f, r.global_batch)
        metrics.advance()
        if step % t.log_every == 0 or step == total_steps or stopping:
            last = progress_row(window, device, step=step, epoch=epoch, skipped=skipped, lr=lr,
                                grad_norm=engine.get_global_grad_norm(), flops_per_image=flops)
            metrics.log(last)
        epoch_done = step % steps_per_epoch == 0
        if (epoch_done and (step // steps_per_epoch) % t.eval_every == 0) or step == total_steps:
            res = evaluate(engine, eval_loader, device, dtype)
            last_eval = {"step": step, "epoch": step / steps_per_epoch, "eval_top1": res["top1"],
                         "eval_top5": res["top5"], "eval_loss": res["loss"], "eval_images": res["images"],
                         "eval_skipped": res["skipped"]}
            if ema is not None:
                with ema.swapped():
                    res_ema = evaluate(engine, eval_loader, device, dtype)
                last_eval.update(ema_eval_top1=res_ema["top1"], ema_eval_top5=res_ema["top5"],
                                 ema_eval_loss=res_ema["loss"])
            improved = res["top1"] > best["top1"]
            if improved:
                best = {"top1": res["top1"], "step": step}
            last_eval["best_top1"] = best["top1"]
            metrics.log(last_eval)
            log.info("eval at step %d (epoch %.2f): top-1 %.2f%%, top-5 %.2f%%, loss %.4f on %d images%s; best %.2f%%",
                     step, last_eval["epoch"], res["top1"], res["top5"], res["loss"], res["images"],
                     f"; EMA top-1 {last_eval['ema_eval_top1']:.2f}%" if ema is not None else "", best["top1"])
            if improved and step % t.ckpt_every and step != total_steps and not stopping:
                save(step)
        if step % t.ckpt_every == 0 or step == total_steps or stopping:
            save(step)
        if stopping:
            break
    metrics.close(preempted=bool(stopping) and step < total_steps)
    pdist.barrier()
    if stopping and step < total_steps:
        raise Interrupted(stopping, step, total_steps, find_resume(ckpt.root))
    return {"final": last, "eval": last_eval, "best": best, "steps": step, "num_classes": r.num_classes,
            "run_dir": str(run_dir),
            "metrics": str(run_dir / "metrics.jsonl"), "checkpoint": str(find_resume(ckpt.root))}
