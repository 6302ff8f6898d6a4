"""Stage 1, the perceptual tokenizer: a VQ-VAE with an EMA codebook (+ an optional patch
discriminator) trained with pixel + perceptual loss under DeepSpeed ZeRO 0-2.

Codebook randomness (k-means init, dead-code restarts) is drawn on rank 0 and broadcast; the
k-means pool gathered before the init is per-rank state saved in checkpoints. At the end rank 0
writes ``<run>/tokenizer.safetensors``, the artifact stage 2 loads.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..config import to_dict
from ..data.backends import AugmentSpec, make_loader
from ..engine import dist as pdist
from ..engine import ds
from ..engine.common import autocast
from ..engine.logger import log
from ..engine.stage1_config import Stage1Config, validate_stage1
from ..losses import PeCoLoss
from ..models.artifact import save_tokenizer
from ..models.discriminator import PatchDiscriminator, hinge_d_loss
from ..models.perceptual import PerceptualLoss
from ..models.tokenizer import VQTokenizer
from .trainer import Schedule, Stage, Trainer, schedule_from


def _adam(params, lr: float, betas, weight_decay: float, device: torch.device) -> torch.optim.Adam:
    return torch.optim.Adam(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay, fused=device.type == "cuda")


class TokenizerStage(Stage):
    name = "tokenizer"
    cfg: Stage1Config

    def check(self, world: int) -> None:
        validate_stage1(self.cfg)
        self.grad_accum = self.cfg.train.grad_accum
        self.global_batch = self.cfg.train.batch_size * self.grad_accum * world

    def build_loader(self):
        d, t = self.cfg.data, self.cfg.train
        spec = AugmentSpec(d.img_size, "stage1", scale=(d.min_crop_scale, 1.0), jitter=0.0)
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu"
        return make_loader(d.backend, d.path, spec, batch_size=t.batch_size, rank=int(os.environ.get("RANK", "0")),
                           world_size=int(os.environ.get("WORLD_SIZE", "1")), seed=t.seed, workers=d.workers,
                           device=device)

    def make_schedule(self, batches_per_epoch: int) -> Schedule:
        o = self.cfg.optim
        return schedule_from(batches_per_epoch, self.grad_accum, self.global_batch, self.cfg.train, o, self.cfg.data.path,
                             base_lr=o.lr, floor=o.lr * o.min_lr_ratio, kind=o.schedule, warmup=o.warmup_steps)

    def build_models(self) -> None:
        cfg = self.cfg
        self.model = VQTokenizer(cfg.model, cfg.quantizer)
        perceptual = None
        if cfg.loss.perceptual_weight == 0:
            log.info("perceptual loss: off (loss.perceptual_weight=0, a plain VQ-VAE)")
        else:
            p = cfg.perceptual
            perceptual = PerceptualLoss(p.arch, list(p.layers) or None, p.weights)
            log.info("perceptual loss: %s, weight %g", perceptual.description, cfg.loss.perceptual_weight)
        self.criterion = PeCoLoss(cfg.loss.pixel, cfg.loss.perceptual_weight, perceptual).to(self.device)

    def build_engines(self) -> dict[str, Any]:
        cfg, t, device = self.cfg, self.cfg.train, self.device
        ds_cfg = ds.load_ds_config(t.deepspeed_config, micro_batch=t.batch_size, grad_accum=t.grad_accum,
                                   world_size=self.world, grad_clip=t.grad_clip,
                                   zero_stage=None if t.zero_stage < 0 else t.zero_stage, allowed_stages=(0, 1, 2))
        o = cfg.optim
        engines = {"model": ds.initialize(self.model.to(device), _adam(self.model.parameters(), o.lr, o.betas,
                                                                        o.weight_decay, device), ds_cfg)}
        if cfg.disc.enabled:
            disc = PatchDiscriminator(cfg.model.in_channels, cfg.disc.channels, cfg.disc.n_layers).to(device)
            engines["disc"] = ds.initialize(disc, _adam(disc.parameters(), cfg.disc.lr, o.betas, 0.0, device), ds_cfg)
        return engines

    def describe(self) -> str:
        n = sum(p.numel() for p in self.model.parameters())
        return (f"tokenizer '{self.cfg.model.preset}': {n / 1e6:.2f}M params, {self.model.downsample}x downsample, "
                f"{self.model.quantizer.extra_repr()}")

    def micro_step(self, batch: dict[str, Any], step: int) -> dict[str, torch.Tensor]:
        """Generator forward + backward (+ optimizer step at the accumulation boundary), then the
        discriminator's, once ``disc.start_step`` is reached."""
        cfg, device, engine = self.cfg, self.device, self.engines["model"]
        disc_engine = self.engines.get("disc") if step >= cfg.disc.start_step else None
        x = batch["image"].to(device, non_blocking=True)
        disc = disc_engine.module if disc_engine is not None else None
        if disc is not None:
            disc.requires_grad_(False)  # the generator's adversarial term must not train the critic
        with autocast(device, cfg.train.precision):
            out = engine(x)
            parts = self.criterion(x, out, disc=disc, disc_weight=cfg.disc.weight)
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

    def finish_row(self, row: dict[str, Any], step_values: dict[str, float]) -> dict[str, Any]:
        row["codebook_usage"] = step_values["codebook_usage"]  # already a windowed statistic
        row["codebook_in_sync"] = pdist.same_on_all_ranks(self.engines["model"].module.quantizer.codebook)
        if not row["codebook_in_sync"]:
            raise RuntimeError(f"codebooks differ across ranks at step {row['step']}: a codebook update was not "
                               f"all-reduced or broadcast")
        return row

    def rank_state(self) -> dict[str, Any] | None:
        pool = self.engines["model"].module.quantizer.init_pool
        return {"kmeans_pool": pool} if pool else None

    def load_state(self, saved: dict[str, Any], folder: Path) -> None:
        pool = self.ckpt.load_rank_state(folder, "kmeans_pool")
        if pool is not None:  # saved before the k-means init had gathered enough vectors
            self.engines["model"].module.quantizer.load_init_pool(pool)

    def finish(self, summary: dict[str, Any]) -> dict[str, Any]:
        artifact = self.run_dir / "tokenizer.safetensors"
        if self.rank == 0:
            perceptual = self.criterion.perceptual
            save_tokenizer(self.engines["model"].module, artifact,
                           extra={"step": summary["steps"], "config": to_dict(self.cfg),
                                  "perceptual": perceptual.description if perceptual is not None else "off"})
        pdist.barrier()
        return {**summary, "artifact": str(artifact)}


def train_tokenizer(cfg: Stage1Config) -> dict[str, Any]:
    """Run stage 1 as configured; returns a summary (paths, final metrics). All ranks call it."""
    return Trainer(TokenizerStage(cfg)).run()
