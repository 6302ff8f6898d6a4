"""Stage 1, the perceptual tokenizer: a VQ-VAE with an EMA codebook (+ an optional patch
discriminator) trained with pixel + perceptual loss under DeepSpeed ZeRO 0-2.

Codebook randomness (k-means init, dead-code restarts) is drawn on rank 0 and broadcast; the
k-means pool gathered before the init is per-rank state saved in checkpoints. At the end rank 0
writes ``<run>/tokenizer.safetensors``, the artifact stage 2 loads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..config import to_dict
from ..data import AugmentSpec
from ..engine import dist as pdist
from ..engine import ds
from ..engine.common import autocast
from ..engine.logger import log
from ..losses import PeCoLoss
from ..models.artifact import save_tokenizer
from ..models.discriminator import PatchDiscriminator, hinge_d_loss
from ..models.perceptual import PerceptualLoss, PerceptualWeightsError
from ..models.tokenizer import VQTokenizer
from ..pictures import GridRows, tokenizer_rows
from .tokenizer_config import TokenizerConfig, resolve_tokenizer
from .trainer import Stage


def _adam(params, lr: float, o, weight_decay: float, device: torch.device) -> torch.optim.Adam:
    return torch.optim.Adam(params, lr=lr, betas=tuple(o.betas), eps=o.eps, weight_decay=weight_decay,
                            fused=device.type == "cuda")


class TokenizerStage(Stage):
    name = "tokenizer"
    cfg: TokenizerConfig

    def check(self, world: int) -> None:
        self.grad_accum = resolve_tokenizer(self.cfg, world)
        self.global_batch = self.cfg.train.batch_size * self.grad_accum * world

    def build_loader(self):
        d = self.cfg.data
        spec = AugmentSpec(d.img_size, "tokenizer", scale=(d.min_crop_scale, 1.0), hflip=d.hflip, jitter=d.jitter)
        return self.make_loader(spec, self.cfg.train.batch_size)

    def build_models(self) -> None:
        cfg = self.cfg
        self.model = VQTokenizer(cfg.model, cfg.quantizer, cfg.train.kernels)
        perceptual = None
        if cfg.loss.perceptual_weight == 0:
            log.info("perceptual loss: off (loss.perceptual_weight=0, a plain VQ-VAE)")
        else:
            p = cfg.perceptual
            perceptual = PerceptualLoss(p.arch, list(p.layers) or None, p.weights)
            log.info("perceptual loss: %s, weight %g", perceptual.description, cfg.loss.perceptual_weight)
        self.criterion = PeCoLoss(cfg.loss.pixel, cfg.loss.perceptual_weight, perceptual).to(self.device)

    def build_engines(self) -> dict[str, Any]:
        cfg, device = self.cfg, self.device
        ds_cfg = self.ds_config(bf16=False)  # precision is torch autocast (train.precision)
        o = cfg.optim
        engines = {"model": ds.initialize(self.model.to(device), _adam(self.model.parameters(), o.lr, o,
                                                                        o.weight_decay, device), ds_cfg)}
        if cfg.disc.enabled:
            disc = PatchDiscriminator(cfg.model.in_channels, cfg.disc.channels, cfg.disc.n_layers).to(device)
            engines["disc"] = ds.initialize(disc, _adam(disc.parameters(), cfg.disc.lr, o, 0.0, device), ds_cfg)
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

    def picture(self, batch: dict[str, Any]) -> GridRows:
        """input | reconstruction (the decode of its own token ids) of the batch's first 8 images, with PSNR."""
        return tokenizer_rows(self.engines["model"].module, batch["image"][:8])

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

    @classmethod
    def report(cls, summary: dict[str, Any]) -> None:
        final = summary["final"]
        print(f"tokenizer artifact: {summary['artifact']}")
        print(f"metrics: {summary['metrics']} (last: loss {final.get('loss', float('nan')):.4f}, "
              f"codebook usage {final.get('codebook_usage', float('nan')):.1%})")


# -- what launch/train_tokenizer.py runs (train/entry.py) --------------------------------------
CONFIG, resolve, STAGE, USER_ERRORS = TokenizerConfig, resolve_tokenizer, TokenizerStage, (PerceptualWeightsError,)
