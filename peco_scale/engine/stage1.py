"""Stage-1 training loop: the perceptual tokenizer under DeepSpeed (ZeRO 0-2), 1..N ranks.

Determinism for exact resume: the data order is a function of (seed, epoch), augmentation
of (seed, epoch, index) (see ShardedSampler), codebook randomness is drawn on rank 0 from
its RNG, which is checkpointed. So step s's batch is fixed by s alone, and a resumed run
reproduces the uninterrupted run's losses.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..config import ConfigError, to_dict
from ..data.backends import AugmentSpec, make_loader
from ..losses import PeCoLoss
from ..models.artifact import save_tokenizer
from ..models.discriminator import PatchDiscriminator, hinge_d_loss
from ..models.perceptual import PerceptualLoss
from ..models.tokenizer import VQTokenizer
from . import dist as pdist
from . import ds, preempt
from .checkpoint import CheckpointManager, find_resume
from .common import Window, autocast, lr_at, optimizer_steps, stop_if_weights_nonfinite
from .logger import MetricsLogger, log
from .preempt import Interrupted
from .stage1_config import Stage1Config, validate_stage1


def _build_perceptual(cfg: Stage1Config) -> PerceptualLoss | None:
    if cfg.loss.perceptual_weight == 0:
        log.info("perceptual loss: off (loss.perceptual_weight=0, a plain VQ-VAE)")
        return None
    p = cfg.perceptual
    loss = PerceptualLoss(p.arch, list(p.layers) or None, p.weights)
    log.info("perceptual loss: %s, weight %g", loss.description, cfg.loss.perceptual_weight)
    return loss


def _adam(params, lr: float, betas, weight_decay: float, device: torch.device) -> torch.optim.Adam:
    return torch.optim.Adam(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay,
                            fused=device.type == "cuda")


def train_tokenizer(cfg: Stage1Config) -> dict[str, Any]:
    """Run stage 1 as configured; returns a summary (paths, final metrics). All ranks call it."""
    validate_stage1(cfg)
    # fails fast on a missing/empty dataset, before DeepSpeed starts
    loader = _build_loader(cfg)
    t = cfg.train
    ckpt = CheckpointManager(Path(t.output_dir) / "checkpoints", keep_last=t.keep_last)
    rank, world, device = pdist.init_distributed()
    torch.manual_seed(t.seed + rank)
    run_dir = Path(t.output_dir)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=1))
    log.info("data: %s backend on %s, %d batches per rank and epoch; world size %d on %s",
             cfg.data.backend, cfg.data.path, loader.batches_per_epoch, world, device)

    # -- data --------------------------------------------------------------------------
    steps_per_epoch = loader.batches_per_epoch // t.grad_accum
    if steps_per_epoch == 0:
        raise ConfigError(f"{cfg.data.path} gives {loader.batches_per_epoch} batches per rank, fewer than "
                          f"train.grad_accum={t.grad_accum}; lower train.batch_size or grad_accum")
    total_steps = t.max_steps if t.max_steps > 0 else t.epochs * steps_per_epoch

    # -- model, loss, engines ----------------------------------------------------------
    torch.manual_seed(t.seed)  # identical init on every rank
    model = VQTokenizer(cfg.model, cfg.quantizer)
    criterion = PeCoLoss(cfg.loss.pixel, cfg.loss.perceptual_weight, _build_perceptual(cfg)).to(device)
    torch.manual_seed(t.seed + rank)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("tokenizer '%s': %.2fM params, %dx downsample, %s", cfg.model.preset,
             n_params / 1e6, model.downsample, model.quantizer.extra_repr())
    zero = None if t.zero_stage < 0 else t.zero_stage
    ds_cfg = ds.load_ds_config(t.deepspeed_config, micro_batch=t.batch_size, grad_accum=t.grad_accum,
                               world_size=world, grad_clip=t.grad_clip, zero_stage=zero, allowed_stages=(0, 1, 2))
    engine = ds.initialize(model.to(device), _adam(model.parameters(), cfg.optim.lr, cfg.optim.betas,
                                                   cfg.optim.weight_decay, device), ds_cfg)
    engines = {"model": engine}
    disc_engine = None
    if cfg.disc.enabled:
        disc = PatchDiscriminator(cfg.model.in_channels, cfg.disc.channels, cfg.disc.n_layers).to(device)
        disc_engine = ds.initialize(disc, _adam(disc.parameters(), cfg.disc.lr, cfg.optim.betas, 0.0, device), ds_cfg)
        engines["disc"] = disc_engine
        n_params += sum(p.numel() for p in disc.parameters())
    ckpt.check_output(n_params, device)

    # -- resume ------------------------------------------------------------------------
    start_step, wandb_id = 0, None
    if t.resume:
        folder = find_resume(ckpt.root) if t.resume == "auto" else Path(t.resume)
        if folder is not None:
            state = ckpt.load(folder, engines)
            pool = ckpt.load_rank_state(folder, "kmeans_pool")
            if pool is not None:  # saved before the k-means init had gathered enough vectors
                engine.module.quantizer.load_init_pool(pool)
            start_step, wandb_id = state["step"], state.get("wandb_id")
            log.info("resumed from %s at step %d", folder, start_step)
        else:
            log.info("resume=auto: no complete checkpoint in %s, starting fresh", ckpt.root)
    wandb_cfg = None
    if t.wandb:
        wandb_cfg = {"project": t.wandb_project, "dir": str(run_dir), "config": to_dict(cfg), "name": run_dir.name,
                     "id": wandb_id}
    metrics = MetricsLogger(run_dir, rank, total_steps, start_step, wandb_cfg=wandb_cfg)
    metrics.truncate_after(start_step)

    # -- loop --------------------------------------------------------------------------
    summary = _loop(cfg, engine, disc_engine, criterion, loader, device, steps_per_epoch,
                    start_step, total_steps, metrics, ckpt, engines)
    stopped = summary.pop("stopped") if summary["steps"] < total_steps else None
    metrics.close(preempted=bool(stopped))
    if stopped:
        pdist.barrier()
        raise Interrupted(stopped, summary["steps"], total_steps, find_resume(ckpt.root))
    artifact = run_dir / "tokenizer.safetensors"
    if rank == 0:
        save_tokenizer(engine.module, artifact, extra={"step": total_steps, "config": to_dict(cfg),
                                                       "perceptual": criterion.perceptual.description
                                                       if criterion.perceptual is not None else "off"})
    pdist.barrier()
    summary.update(artifact=str(artifact), metrics=str(run_dir / "metrics.jsonl"), run_dir=str(run_dir))
    return summary


def _build_loader(cfg: Stage1Config):
    """This rank's stage-1 loader (folder, ffcv or dali): one random-resized crop + flip in [-1, 1]."""
    import os

    d = cfg.data
    spec = AugmentSpec(d.img_size, "stage1", scale=(d.min_crop_scale, 1.0), jitter=0.0)
    device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu"
    return make_loader(d.backend, d.path, spec, batch_size=cfg.train.batch_size, rank=int(os.environ.get("RANK", "0")),
                       world_size=int(os.environ.get("WORLD_SIZE", "1")), seed=cfg.train.seed, workers=d.workers,
                       device=device)


def _loop(cfg, engine, disc_engine, criterion, loader, device, steps_per_epoch,
          start_step, total_steps, metrics, ckpt, engines) -> dict[str, Any]:
    t = cfg.train
    world = pdist.world_size()
    engine.train()
    step, last = start_step, {}
    skipped_total = 0.0
    window = Window()
    o = cfg.optim
    stopping = None
    stop = preempt.current()
    for step, epoch, micro_batches in optimizer_steps(loader, start_step, total_steps, steps_per_epoch,
                                                      t.grad_accum):
        lr = lr_at(step, o.lr, warmup=o.warmup_steps, total=total_steps, schedule=o.schedule,
                   floor=o.lr * o.min_lr_ratio)
        for group in engine.optimizer.param_groups:
            group["lr"] = lr
        use_disc = disc_engine is not None and step >= cfg.disc.start_step
        acc: dict[str, torch.Tensor] = {}
        for batch in micro_batches:
            x = batch["image"].to(device, non_blocking=True)
            skipped_total += batch["skipped"]
            parts = _micro_step(cfg, engine, disc_engine if use_disc else None, criterion, x, device)
            for k, v in parts.items():
                acc[k] = acc.get(k, 0.0) + v / t.grad_accum
        acc_f = {k: float(v) for k, v in acc.items()}  # one host sync per step, not per micro-batch
        stopping = stop.check(acc_f["loss"], step + 1, ckpt.root, device)
        step += 1
        window.add(acc_f, t.batch_size * t.grad_accum * world)
        metrics.advance()
        if step % t.log_every == 0 or step == total_steps or stopping:
            # losses: means over the steps since the last row and over ranks
            means = window.means(device, {"skipped_images": skipped_total})
            means["codebook_usage"] = acc_f["codebook_usage"]  # already a windowed statistic
            last = {"step": step, "epoch": epoch, **means, "lr": lr,
                    "grad_norm": engine.get_global_grad_norm(),
                    "images_per_s": window.images / window.elapsed(),
                    "codebook_in_sync": pdist.same_on_all_ranks(engine.module.quantizer.codebook)}
            if not last["codebook_in_sync"]:
                raise RuntimeError(f"codebooks differ across ranks at step {step}: a codebook update "
                                   f"was not all-reduced or broadcast")
            metrics.log(last)
            window.reset()
        if step % t.ckpt_every == 0 or step == total_steps or stopping:
            stop_if_weights_nonfinite(engine.module, step, ckpt.root, device)
            pool = engine.module.quantizer.init_pool
            ckpt.save(engines, step, {"config": to_dict(cfg), "wandb_id": metrics.wandb_id},
                      rank_state={"kmeans_pool": pool} if pool else None)
        if stopping:
            break
    return {"final": last, "steps": step, "stopped": stopping}


def _micro_step(cfg, engine, disc_engine, criterion, x: torch.Tensor, device) -> dict[str, torch.Tensor]:
    """Forward + backward (+ optimizer step at the accumulation boundary) for one micro-batch."""
    disc = disc_engine.module if disc_engine is not None else None
    if disc is not None:
        disc.requires_grad_(False)  # the generator's adversarial term must not train the critic
    with autocast(device, cfg.train.precision):
        out = engine(x)
        parts = criterion(x, out, disc=disc, disc_weight=cfg.disc.weight)
    engine.backward(parts["loss"])
    engine.step()
    stats = {k: v.detach() for k, v in parts.items()}
    stats["codebook_usage"] = out["codebook_usage"]
    stats["perplexity"] = out["perplexity"]
    if disc_engine is not None:
        disc.requires_grad_(True)
        with autocast(device, cfg.train.precision):
            d_loss = hinge_d_loss(disc_engine(x), disc_engine(out["x_rec"].detach()))
        disc_engine.backward(d_loss)
        disc_engine.step()
        stats["d_loss"] = d_loss.detach()
    return stats
