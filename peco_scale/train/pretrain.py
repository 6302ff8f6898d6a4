"""Stage 2, masked image modeling under DeepSpeed ZeRO 0-3, with one of two targets
(``model.task``): ``peco``, a ViT predicts the frozen tokenizer's token ids at block-masked
patches (cross-entropy on masked positions only); ``mae``, a ViT encodes the visible patches
of a random mask and a light decoder predicts the pixels of the masked ones (models/mae.py);
``perceptual_mae``, mae plus a perceptual loss on the reconstruction through stage 1's frozen
network and, with ``disc.enabled``, a patch discriminator (multi-scale with ``disc.multiscale``)
trained alongside with Adam (betas 0.5, 0.9) at ``disc.lr`` from ``disc.start_step``, in fp32
under ZeRO 0-2 whatever the backbone's stage (models/pmae.py).

Each sample's crop, jitter, flip and mask are functions of (seed, epoch, index); stochastic depth
draws from per-rank RNG saved in every checkpoint. A checkpoint records the tokenizer's sha256:
resuming with another tokenizer, or another task, is refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..config import ConfigError
from ..data import AugmentSpec
from ..engine import ds
from ..models.artifact import load_tokenizer, tokenizer_identity
from ..models.discriminator import MultiScalePatchDiscriminator, PatchDiscriminator, hinge_d_loss
from ..models.mae import MAETask
from ..models.mim import MIMTask
from ..models.perceptual import PerceptualLoss
from ..models.pmae import PerceptualMAELoss, real_images
from ..models.vit import VIT_PRESETS, MaskedViT, param_groups
from ..models.cost import mae_train_flops, mim_train_flops
from .pretrain_config import PretrainConfig, resolve_pretrain
from ..pictures import GridRows, mae_rows, peco_rows
from .trainer import Stage, use_bf16

PICTURE_ROWS = 8  # images per picture


class PretrainStage(Stage):
    name = "pretrain"
    cfg: PretrainConfig
    resolver = staticmethod(resolve_pretrain)

    def check(self, world: int) -> None:
        super().check(world)
        self.peco, self.pmae = self.r.task == "peco", self.r.task == "perceptual_mae"
        self.token_id = tokenizer_identity(self.cfg.tokenizer.path) if self.peco else ""

    def build_loader(self):
        d, r = self.cfg.data, self.r
        spec = AugmentSpec(r.img_size, "pretrain", scale=(d.min_crop_scale, 1.0), hflip=d.hflip, jitter=d.jitter,
                           tokenizer_size=r.tokenizer_img_size, mask=dict(r.mask))
        return self.make_loader(spec, r.batch_size)

    def check_resume(self, folder: Path, state: dict[str, Any], world: int) -> None:
        task = state.get("model", {}).get("task", "peco")
        if task != self.r.task:
            raise ConfigError(f"checkpoint {folder} is a model.task={task} run, this run is model.task={self.r.task}; "
                              f"resume with --task {task} or start a new output_dir")
        saved = state.get("tokenizer", {}).get("sha256")
        if self.peco and saved and saved != self.token_id:
            raise ConfigError(f"checkpoint {folder} was trained with tokenizer {state['tokenizer'].get('path')} "
                              f"(sha256 {saved[:12]}...), but the given tokenizer's sha256 is {self.token_id[:12]}...; "
                              f"resume with the original tokenizer or start a new output_dir")
        super().check_resume(folder, state, world)

    def build_models(self) -> None:
        """Backbone + head around the frozen tokenizer (peco), or backbone + pixel decoder (mae)."""
        m, r = self.cfg.model, self.r
        backbone = MaskedViT(VIT_PRESETS[r.model_name], r.img_size, drop_path=m.drop_path,
                             layer_scale=None if m.layer_scale < 0 else m.layer_scale,
                             grad_checkpointing=m.grad_checkpointing)
        if not self.peco:
            a = self.cfg.mae
            self.task = MAETask(backbone, decoder_dim=a.decoder_dim, decoder_depth=a.decoder_depth,
                                decoder_heads=a.decoder_heads, norm_pix=a.norm_pix_loss, num_masked=r.num_masked,
                                scales=r.scales)
            if self.pmae:
                pc = self.cfg.perceptual
                net = PerceptualLoss(pc.arch, list(pc.layers) or None, pc.weights) if a.perceptual_weight else None
                self.criterion = PerceptualMAELoss(net, a.perceptual_weight, patch=backbone.preset.patch_size,
                                                   grid=r.grid, norm_pix=a.norm_pix_loss).to(self.device)
            self.flops_per_image = mae_train_flops(VIT_PRESETS[r.model_name], r.img_size, num_masked=r.num_masked,
                                                   decoder_dim=a.decoder_dim, decoder_depth=a.decoder_depth,
                                                   checkpointing=m.grad_checkpointing)["model"]
            return
        tokenizer = load_tokenizer(self.cfg.tokenizer.path, self.device, self.cfg.train.kernels)
        if tokenizer.quant_cfg.codebook_size != r.vocab:
            raise ConfigError(f"tokenizer codebook has {tokenizer.quant_cfg.codebook_size} codes but the head "
                              f"expects {r.vocab}")
        self.task = MIMTask(backbone, tokenizer, kernels=self.cfg.train.kernels).to_device(self.device)
        self.flops_per_image = mim_train_flops(VIT_PRESETS[r.model_name], r.img_size, vocab=r.vocab,
                                               num_masked=r.num_masked, checkpointing=m.grad_checkpointing)["model"]

    def build_engines(self) -> dict[str, Any]:
        o, device = self.cfg.optim, self.device
        self.bf16 = use_bf16(self.cfg.train.precision, self.ds_dict, device)
        self.dtype = torch.bfloat16 if self.bf16 else torch.float32
        self.ds_cfg = self.ds_config(self.bf16)
        optimizer = torch.optim.AdamW(param_groups(self.task, o.weight_decay), lr=o.lr, betas=tuple(o.betas),
                                      eps=o.eps, fused=device.type == "cuda")
        engines = {"model": ds.initialize(self.task.to(device), optimizer, self.ds_cfg)}
        d = self.cfg.disc
        if self.pmae and d.enabled:
            cls = MultiScalePatchDiscriminator if d.multiscale else PatchDiscriminator
            disc = cls(3, d.channels, d.n_layers).to(device)
            t = self.cfg.train
            disc_cfg = ds.finalize_ds_config(self.ds_dict, micro_batch=t.batch_size, grad_accum=self.grad_accum,
                                             world_size=self.world, grad_clip=o.grad_clip, bf16=False,
                                             zero_stage=min(2, self.ds_cfg["zero_optimization"].get("stage", 0)))
            adam = torch.optim.Adam(disc.parameters(), lr=d.lr, betas=(0.5, 0.9), fused=device.type == "cuda")
            engines["disc"] = ds.initialize(disc, adam, disc_cfg)
        return engines

    def describe(self) -> str:
        r, o, zero = self.r, self.cfg.optim, self.ds_cfg["zero_optimization"]
        n = sum(getattr(p, "ds_numel", p.numel()) for p in self.task.parameters())  # ZeRO-3: the full size
        if self.peco:
            target = (f"{r.num_masked} block-masked, head {r.vocab}-way; tokenizer {self.cfg.tokenizer.path} "
                      f"({r.tokenizer_img_size} px view)")
        else:
            a, d = self.cfg.mae, self.cfg.disc
            target = (f"task {r.task}: {r.num_masked} masked at random, encoder on the other "
                      f"{r.grid[0] * r.grid[1] - r.num_masked}, decoder {a.decoder_depth} x {a.decoder_dim}, "
                      f"{'normalised ' if a.norm_pix_loss else ''}pixel loss"
                      + (" (tokenizer.path ignored)" if self.cfg.tokenizer.path else ""))
            if self.pmae:
                net = self.criterion.perceptual
                target += (f" + {a.perceptual_weight:g} x perceptual ({net.description})" if net is not None
                           else " (no perceptual term: mae.perceptual_weight=0)")
                if d.enabled:
                    nd = sum(p.numel() for p in self.engines["disc"].module.parameters())
                    kind = f"multi-scale (1/{', 1/'.join(map(str, r.scales))}) patch" if d.multiscale else "patch"
                    target += (f" + {d.weight:g} x hinge GAN from step {d.start_step} ({kind} discriminator, "
                               f"{nd / 1e6:.2f}M params, lr {d.lr:g})")
        text = (f"{r.model_name} at {r.img_size} px: {n / 1e6:.1f}M trainable params, grid {r.grid[0]}x{r.grid[1]}, "
                f"{target}; ZeRO {zero.get('stage', 0)}, {'bf16' if self.bf16 else 'fp32'}, "
                f"lr {self.schedule.base_lr:.3g} ({o.lr:.3g} at batch {o.base_batch})")
        if zero.get("stage") == 3:
            from deepspeed.utils.z3_leaf_module import get_z3_leaf_modules

            text += (f"; ZeRO-3 leaf blocks {len(get_z3_leaf_modules(self.engines['model'].module))} (each gathered "
                     f"whole), persistence threshold {zero.get('stage3_param_persistence_threshold')}, prefetch "
                     f"bucket {zero.get('stage3_prefetch_bucket_size')}")
        return text

    def micro_step(self, batch: dict[str, Any], step: int) -> dict[str, torch.Tensor]:
        if self.pmae:
            return self.perceptual_mae_step(batch, step)
        device, engine = self.device, self.engines["model"]
        inputs = [batch["patch"].to(device, self.dtype, non_blocking=True)]
        if self.peco:  # peco: (patch view, tokenizer view, mask); mae: (patch view, mask)
            inputs.append(batch["tokenizer"].to(device, non_blocking=True))
        out = engine(*inputs, batch["mask"].to(device, non_blocking=True))
        engine.backward(out["loss"])
        engine.step()
        return {k: out[k].detach() for k in ("loss", "mlm_acc") if k in out}

    def perceptual_mae_step(self, batch: dict[str, Any], step: int) -> dict[str, torch.Tensor]:
        """The MAE's step on its loss + the perceptual [+ adversarial] terms, then, from
        ``disc.start_step``, the discriminator's on the detached reconstructions."""
        device, engine, d = self.device, self.engines["model"], self.cfg.disc
        disc_engine = self.engines.get("disc") if step >= d.start_step else None
        disc = disc_engine.module if disc_engine is not None else None
        if disc is not None:
            disc.requires_grad_(False)  # the generator's adversarial term must not train the critic
        images, mask = batch["patch"].to(device, self.dtype, non_blocking=True), batch["mask"].to(device, non_blocking=True)
        parts = self.criterion(images, mask, engine(images, mask), disc=disc, disc_weight=d.weight)
        engine.backward(parts["loss"])
        engine.step()
        stats = {k: parts[k].detach() for k in ("loss", "mae_loss", "percep_loss", "g_loss") if k in parts}
        if disc_engine is not None:
            disc.requires_grad_(True)
            fakes = [f.detach() for f in parts["fakes"]]
            d_loss = hinge_d_loss(disc_engine(real_images(parts["real"], len(self.r.scales))),
                                  disc_engine(fakes if len(fakes) > 1 else fakes[0]))
            disc_engine.backward(d_loss)
            disc_engine.step()
            stats["d_loss"] = d_loss.detach()
        return stats

    def picture(self, batch: dict[str, Any]) -> GridRows:
        """peco: input | masked input | prediction | tokenizer reconstruction; the MAE tasks: input |
        masked input | prediction (``peco_scale.pictures``), on the batch's first images."""
        n, module = min(PICTURE_ROWS, len(batch["patch"])), self.engines["model"].module
        if not self.peco:
            return mae_rows(module, batch["patch"][:n], batch["mask"][:n])
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.head.parameters())):  # read outside its forward
            return peco_rows(module.backbone, module.head, module.tokenizer, batch["patch"][:n],
                             batch["tokenizer"][:n], batch["mask"][:n])

    def client_state(self) -> dict[str, Any]:
        model = {"name": self.r.model_name, "img_size": self.r.img_size, "task": self.r.task}
        if not self.peco:
            return {"model": model}
        return {"tokenizer": {"sha256": self.token_id, "path": str(self.cfg.tokenizer.path)}, "model": model}

    @classmethod
    def report(cls, summary: dict[str, Any]) -> None:
        final = summary["final"]
        acc = f", mlm_acc {final['mlm_acc']:.3f}" if "mlm_acc" in final else ""
        print(f"metrics: {summary['metrics']} (last: loss {final.get('loss', float('nan')):.4f}{acc})")
        print(f"checkpoint: {summary['checkpoint']}")


# -- what launch/pretrain.py runs (train/entry.py) -----------------------------------------------
CONFIG, resolve, STAGE, USER_ERRORS = PretrainConfig, resolve_pretrain, PretrainStage, ()
