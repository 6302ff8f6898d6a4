"""Stage 2, masked image modeling: a ViT predicts the frozen tokenizer's token ids at
block-masked patches (cross-entropy on masked positions only), under DeepSpeed ZeRO 0-3.

Each sample's crop, jitter, flip and mask are functions of (seed, epoch, index); stochastic depth
draws from per-rank RNG saved in every checkpoint. A checkpoint records the tokenizer's sha256:
resuming with another tokenizer is refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..config import ConfigError
from ..data import AugmentSpec
from ..engine import ds
from ..models.artifact import load_tokenizer, tokenizer_identity
from ..models.mim import MIMTask
from ..models.vit import VIT_PRESETS, MaskedViT, param_groups
from ..models.cost import mim_train_flops
from .pretrain_config import PretrainConfig, resolve_pretrain
from .trainer import Stage, use_bf16


class PretrainStage(Stage):
    name = "pretrain"
    cfg: PretrainConfig
    resolver = staticmethod(resolve_pretrain)

    def check(self, world: int) -> None:
        super().check(world)
        self.token_id = tokenizer_identity(self.cfg.tokenizer.path)

    def build_loader(self):
        d, r = self.cfg.data, self.r
        spec = AugmentSpec(r.img_size, "pretrain", scale=(d.min_crop_scale, 1.0), hflip=d.hflip, jitter=d.jitter,
                           tokenizer_size=r.tokenizer_img_size,
                           mask=dict(grid=r.grid, num_masked=r.num_masked, min_block=r.min_block,
                                     min_aspect=self.cfg.mask.min_aspect))
        return self.make_loader(spec, r.batch_size)

    def check_resume(self, folder: Path, state: dict[str, Any], world: int) -> None:
        saved = state.get("tokenizer", {}).get("sha256")
        if saved and saved != self.token_id:
            raise ConfigError(f"checkpoint {folder} was trained with tokenizer {state['tokenizer'].get('path')} "
                              f"(sha256 {saved[:12]}...), but the given tokenizer's sha256 is {self.token_id[:12]}...; "
                              f"resume with the original tokenizer or start a new output_dir")
        super().check_resume(folder, state, world)

    def build_models(self) -> None:
        """Backbone + head around the frozen tokenizer."""
        m, r = self.cfg.model, self.r
        backbone = MaskedViT(VIT_PRESETS[r.model_name], r.img_size, drop_path=m.drop_path,
                             layer_scale=None if m.layer_scale < 0 else m.layer_scale,
                             grad_checkpointing=m.grad_checkpointing)
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
        return {"model": ds.initialize(self.task.to(device), optimizer, self.ds_cfg)}

    def describe(self) -> str:
        r, o, zero = self.r, self.cfg.optim, self.ds_cfg["zero_optimization"]
        n = sum(p.numel() for p in self.task.parameters())
        text = (f"{r.model_name} at {r.img_size} px: {n / 1e6:.1f}M trainable params, grid {r.grid[0]}x{r.grid[1]}, "
                f"{r.num_masked} masked, head {r.vocab}-way; tokenizer {self.cfg.tokenizer.path} "
                f"({r.tokenizer_img_size} px view); ZeRO {zero.get('stage', 0)}, {'bf16' if self.bf16 else 'fp32'}, "
                f"lr {self.schedule.base_lr:.3g} ({o.lr:.3g} at batch {o.base_batch})")
        if zero.get("stage") == 3:
            from deepspeed.utils.z3_leaf_module import get_z3_leaf_modules

            text += (f"; ZeRO-3 leaf blocks {len(get_z3_leaf_modules(self.engines['model'].module))} (each gathered "
                     f"whole), persistence threshold {zero.get('stage3_param_persistence_threshold')}, prefetch "
                     f"bucket {zero.get('stage3_prefetch_bucket_size')}")
        return text

    def micro_step(self, batch: dict[str, Any], step: int) -> dict[str, torch.Tensor]:
        device, engine = self.device, self.engines["model"]
        out = engine(batch["patch"].to(device, self.dtype, non_blocking=True),
                     batch["tokenizer"].to(device, non_blocking=True), batch["mask"].to(device, non_blocking=True))
        engine.backward(out["loss"])
        engine.step()
        return {"loss": out["loss"].detach(), "mlm_acc": out["mlm_acc"].detach()}

    def client_state(self) -> dict[str, Any]:
        return {"tokenizer": {"sha256": self.token_id, "path": str(self.cfg.tokenizer.path)},
                "model": {"name": self.r.model_name, "img_size": self.r.img_size}}

    @classmethod
    def report(cls, summary: dict[str, Any]) -> None:
        final = summary["final"]
        print(f"metrics: {summary['metrics']} (last: loss {final.get('loss', float('nan')):.4f}, "
              f"mlm_acc {final.get('mlm_acc', float('nan')):.3f})")
        print(f"checkpoint: {summary['checkpoint']}")


# -- what launch/pretrain.py runs (train/entry.py) -----------------------------------------------
CONFIG, resolve, STAGE, USER_ERRORS = PretrainConfig, resolve_pretrain, PretrainStage, ()
