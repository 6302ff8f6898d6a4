"""Stage-2 training loop: masked image modeling over a frozen tokenizer, under DeepSpeed ZeRO 0-3.

Same determinism contract as stage 1: the data order is a function of (seed, epoch), each
sample's crop, jitter, flip and mask of (seed, epoch, index), and the model's own randomness
(stochastic depth) comes from per-rank RNG saved in every checkpoint. A resumed run therefore
reproduces the uninterrupted run's losses.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..config import ConfigError, to_dict
from ..data.backends import AugmentSpec, make_loader
from ..models.artifact import load_tokenizer, tokenizer_identity
from ..models.mim import MIMTask
from ..models.vit import MaskedViT, VIT_PRESETS, param_groups
from ..plan import mim_train_flops
from . import dist as pdist
from . import ds, preempt
from .checkpoint import CheckpointManager, check_writable, find_resume
from .common import Window, lr_at, optimizer_steps, progress_row, step_schedule, stop_if_weights_nonfinite
from .logger import MetricsLogger, log
from .preempt import Interrupted
from .stage2_config import Resolved, Stage2Config, resolve_stage2


def build_task(cfg: Stage2Config, r: Resolved, device: torch.device) -> MIMTask:
    """Backbone + head (identical init on every rank) around the frozen tokenizer."""
    m = cfg.model
    backbone = MaskedViT(VIT_PRESETS[r.model_name], r.img_size, drop_path=m.drop_path,
                         layer_scale=None if m.layer_scale < 0 else m.layer_scale,
                         grad_checkpointing=m.grad_checkpointing)
    tokenizer = load_tokenizer(cfg.tokenizer.path, device)
    if tokenizer.quant_cfg.codebook_size != r.vocab:
        raise ConfigError(f"tokenizer codebook has {tokenizer.quant_cfg.codebook_size} codes but the head expects {r.vocab}")
    return MIMTask(backbone, tokenizer, kernels=m.kernels).to_device(device)


def build_optimizer(task: MIMTask, cfg: Stage2Config, device: torch.device) -> torch.optim.AdamW:
    o = cfg.optim
    return torch.optim.AdamW(param_groups(task, o.weight_decay), lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                             fused=device.type == "cuda")


def use_bf16(cfg: Stage2Config, ds_dict: dict[str, Any], device: torch.device) -> bool:
    p = cfg.train.precision
    if p == "auto":
        return device.type == "cuda" and bool(ds_dict.get("bf16", {}).get("enabled", False))
    return p == "bf16"


def _check_resume_compatible(folder: Path, token_id: str, world: int) -> None:
    """Refuse, before any launch cost, a checkpoint from another tokenizer or world size."""
    state = json.loads((folder / "state.json").read_text())
    saved = state.get("tokenizer", {}).get("sha256")
    if saved and saved != token_id:
        raise ConfigError(f"checkpoint {folder} was trained with tokenizer {state['tokenizer'].get('path')} "
                          f"(sha256 {saved[:12]}...), but the given tokenizer's sha256 is {token_id[:12]}...; resume with "
                          f"the original tokenizer or start a new output_dir")
    saved_world = state.get("world_size")
    if saved_world and saved_world != world:
        raise ConfigError(f"checkpoint {folder} was written by {saved_world} ranks but this run has {world}; ZeRO's "
                          f"partitioned optimizer state cannot be re-split: resume on {saved_world} ranks, or convert "
                          f"it to a universal checkpoint with DeepSpeed's ds_to_universal.py first")


def build_loader(cfg: Stage2Config, r: Resolved):
    """This rank's stage-2 loader (folder, ffcv or dali): both views of one crop + the block mask."""
    import os

    d = cfg.data
    spec = AugmentSpec(r.img_size, "stage2", scale=(d.min_crop_scale, 1.0), hflip=d.hflip, jitter=d.jitter,
                       tokenizer_size=r.tokenizer_img_size,
                       mask=dict(grid=r.grid, num_masked=r.num_masked, min_block=r.min_block,
                                 min_aspect=cfg.mask.min_aspect))
    device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu"
    return make_loader(d.backend, d.path, spec, batch_size=r.batch_size, rank=int(os.environ.get("RANK", "0")),
                       world_size=r.world_size, seed=cfg.train.seed, workers=d.workers, device=device)


def pretrain(cfg: Stage2Config, ds_dict: dict[str, Any]) -> dict[str, Any]:
    """Run stage 2 as configured; returns a summary. All ranks call it."""
    r = resolve_stage2(cfg)
    t, o = cfg.train, cfg.optim
    loader = build_loader(cfg, r)  # fails fast on a missing/empty dataset, before the process group starts
    token_id = tokenizer_identity(cfg.tokenizer.path)
    ckpt = CheckpointManager(Path(t.output_dir) / "checkpoints", keep_last=t.keep_last)
    resume_from = None
    if t.resume:
        resume_from = find_resume(ckpt.root) if t.resume == "auto" else Path(t.resume)
        if resume_from is not None:
            _check_resume_compatible(resume_from, token_id, r.world_size)
    check_writable(Path(t.output_dir))
    rank, world, device = pdist.init_distributed()
    if world != r.world_size:
        r = resolve_stage2(cfg, world)
    torch.manual_seed(t.seed + rank)
    run_dir = Path(t.output_dir)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=1))

    steps_per_epoch, total_steps, warmup, base_lr = step_schedule(loader.batches_per_epoch, r.grad_accum,
                                                                  r.global_batch, t, o, cfg.data.path)
    log.info("data: %s backend on %s; %d steps/epoch at global batch %d (%d x %d accum x %d ranks)",
             cfg.data.backend, cfg.data.path, steps_per_epoch, r.global_batch, r.batch_size, r.grad_accum, world)

    torch.manual_seed(t.seed)  # identical init on every rank
    task = build_task(cfg, r, device)
    torch.manual_seed(t.seed + rank)
    bf16 = use_bf16(cfg, ds_dict, device)
    zero = None if t.zero_stage < 0 else t.zero_stage
    ds_cfg = ds.finalize_ds_config(ds_dict, micro_batch=r.batch_size, grad_accum=r.grad_accum, world_size=world,
                                   grad_clip=o.grad_clip, zero_stage=zero, bf16=bf16)
    n_params = sum(p.numel() for p in task.parameters())
    ckpt.check_output(n_params, device)
    log.info("%s at %d px: %.1fM trainable params, grid %dx%d, %d masked, head %d-way; tokenizer %s (%d px view); "
             "ZeRO %d, %s, lr %.3g (%.3g at batch %d)", r.model_name, r.img_size, n_params / 1e6, *r.grid,
             r.num_masked, r.vocab, cfg.tokenizer.path, r.tokenizer_img_size,
             ds_cfg["zero_optimization"].get("stage", 0), "bf16" if bf16 else "fp32", base_lr, o.lr, o.base_batch)
    engine = ds.initialize(task.to(device), build_optimizer(task, cfg, device), ds_cfg)
    engines = {"model": engine}
    if ds_cfg["zero_optimization"].get("stage") == 3:
        from deepspeed.utils.z3_leaf_module import get_z3_leaf_modules

        log.info("ZeRO-3 leaf blocks %d (each gathered whole), persistence threshold %s, prefetch bucket %s",
                 len(get_z3_leaf_modules(engine.module)),
                 ds_cfg["zero_optimization"].get("stage3_param_persistence_threshold"),
                 ds_cfg["zero_optimization"].get("stage3_prefetch_bucket_size"))
    flops = mim_train_flops(VIT_PRESETS[r.model_name], r.img_size, vocab=r.vocab, num_masked=r.num_masked,
                            checkpointing=cfg.model.grad_checkpointing)["model"]

    start_step, wandb_id = 0, None
    if resume_from is not None:
        saved = ckpt.load(resume_from, engines)
        start_step, wandb_id = saved["step"], saved.get("wandb_id")
        log.info("resumed from %s at step %d", resume_from, start_step)
    elif t.resume:
        log.info("resume=auto: no complete checkpoint in %s, starting fresh", ckpt.root)
    metrics = MetricsLogger(run_dir, rank, total_steps, start_step, wandb_cfg=_wandb_cfg(cfg, run_dir, wandb_id))
    metrics.truncate_after(start_step)

    state = {"config": to_dict(cfg), "world_size": world, "tokenizer": {"sha256": token_id, "path": str(cfg.tokenizer.path)},
             "model": {"name": r.model_name, "img_size": r.img_size}}
    dtype = torch.bfloat16 if bf16 else torch.float32
    engine.train()
    step, last, skipped = start_step, {}, 0
    window = Window()
    stopping = None
    stop = preempt.current()
    for step, epoch, micro_batches in optimizer_steps(loader, start_step, total_steps, steps_per_epoch,
                                                      r.grad_accum):
        lr = lr_at(step, base_lr, warmup=warmup, total=total_steps, floor=min(o.min_lr, base_lr))
        for group in engine.optimizer.param_groups:
            group["lr"] = lr
        acc = {"loss": 0.0, "mlm_acc": 0.0}
        for batch in micro_batches:
            skipped += batch["skipped"]
            out = engine(batch["patch"].to(device, dtype, non_blocking=True),
                         batch["tokenizer"].to(device, non_blocking=True),
                         batch["mask"].to(device, non_blocking=True))
            engine.backward(out["loss"])
            engine.step()
            for k in acc:  # device tensors: no host sync inside the accumulation loop
                acc[k] = acc[k] + out[k].detach() / r.grad_accum
        acc_f = {k: float(v) for k, v in acc.items()}
        stopping = stop.check(acc_f["loss"], step + 1, ckpt.root, device)
        step += 1
        window.add(acc_f, r.global_batch)
        metrics.advance()
        if step % t.log_every == 0 or step == total_steps or stopping:
            last = progress_row(window, device, step=step, epoch=epoch, skipped=skipped, lr=lr,
                                grad_norm=engine.get_global_grad_norm(), flops_per_image=flops)
            metrics.log(last)
        if step % t.ckpt_every == 0 or step == total_steps or stopping:
            stop_if_weights_nonfinite(engine.module, step, ckpt.root, device)
            ckpt.save(engines, step, {**state, "wandb_id": metrics.wandb_id})
        if stopping:
            break
    metrics.close(preempted=bool(stopping) and step < total_steps)
    pdist.barrier()
    if stopping and step < total_steps:
        raise Interrupted(stopping, step, total_steps, find_resume(ckpt.root))
    return {"final": last, "steps": step, "run_dir": str(run_dir), "metrics": str(run_dir / "metrics.jsonl"),
            "checkpoint": str(find_resume(ckpt.root))}


def _wandb_cfg(cfg: Stage2Config, run_dir: Path, run_id: str | None) -> dict[str, Any] | None:
    if not cfg.train.wandb:
        return None
    return {"project": cfg.train.wandb_project, "dir": str(run_dir), "config": to_dict(cfg),
            "name": run_dir.name, "id": run_id}

