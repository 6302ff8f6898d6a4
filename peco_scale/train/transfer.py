"""What the transfer stages (fine-tune, segment, detect) share: a pre-trained ViT inside a task
model, loaded from ``model.init`` (a stage-2 run/checkpoint, an exported backbone or a timm file;
'' = random init), trained by AdamW with layer-wise lr decay under DeepSpeed, evaluated on
held-out data with the best checkpoint kept (:class:`~.trainer.EvalStage`).

A stage sets ``vit_path`` (where the ViT sits in its model: '' when the model is the ViT) and
builds its model in ``build_models`` with :meth:`TransferStage.pretrained` and
:meth:`TransferStage.load_vit`; the resolved config ``self.r`` carries ``model_name``,
``drop_path`` and ``layer_decay``.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

from ..engine import ds
from ..engine.weights import load_pretrained
from ..models.transfer import adapt_state_dict, init_layer_scale, layer_decay_groups, scale_residual_stream
from .trainer import EvalStage, use_bf16


def seed_everything(seed: int) -> None:
    """Seed torch, numpy and random (drop path, mixup/cutmix, augmentation in the main process)."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


class TransferStage(EvalStage):
    vit_path = ""  # the ViT's attribute path inside self.model ('' = the model is the ViT)

    def pretrained(self) -> tuple[dict[str, torch.Tensor], dict[str, Any], float | None]:
        """(state dict, info, layer-scale init) of ``model.init``: layer scale is kept when the
        weights have gammas (stage-2 checkpoints); random init uses the preset's."""
        init = self.cfg.model.init
        sd, info = load_pretrained(init) if init else ({}, {"kind": "random"})
        layer_scale = init_layer_scale(self.r.model_name, sd)
        info["layer_scale"] = layer_scale is not None
        return sd, info, layer_scale

    def load_vit(self, vit: torch.nn.Module, sd: dict[str, torch.Tensor], info: dict[str, Any]) -> None:
        """Load the pre-trained weights into ``vit`` (position embeddings resized; only the head
        and fc_norm may stay missing), then scale its residual stream by ``model.stream_scale``."""
        if sd:
            weights = adapt_state_dict(sd, vit, source=f"model.init '{self.cfg.model.init}'")
            missing, unexpected = vit.load_state_dict(weights, strict=False)
            assert not unexpected and all(k.startswith(("head.", "fc_norm.")) for k in missing), (missing, unexpected)
            info["loaded"] = len(weights)
            if self.cfg.model.stream_scale != 1:
                scale_residual_stream(vit, self.cfg.model.stream_scale)
                info["stream_scale"] = self.cfg.model.stream_scale

    def seed_rank(self, seed: int) -> None:
        seed_everything(seed)  # per rank, saved on checkpoints

    def build_engines(self) -> dict[str, Any]:
        """AdamW over layer-decay groups of ``self.model``, wrapped by DeepSpeed."""
        o, device = self.cfg.optim, self.device
        self.bf16 = use_bf16(self.cfg.train.precision, self.ds_dict, device)
        self.dtype = torch.bfloat16 if self.bf16 else torch.float32
        self.ds_cfg = self.ds_config(self.bf16)
        groups = layer_decay_groups(self.model, o.weight_decay, self.r.layer_decay, vit=self.vit_path)
        for g in groups:
            g.pop("names")
        self.n_groups = len(groups)
        optimizer = torch.optim.AdamW(groups, lr=self.schedule.base_lr, betas=tuple(o.betas), eps=o.eps,
                                      fused=device.type == "cuda")
        return {"model": ds.initialize(self.model.to(device), optimizer, self.ds_cfg)}

    def model_meta(self) -> dict[str, Any]:
        """What rebuilds the task model (saved as ``model`` in each checkpoint's state)."""
        raise NotImplementedError

    def client_state(self) -> dict[str, Any]:
        return {"model": {**self.model_meta(), "layer_scale": self.info["layer_scale"]},
                "init": {"path": self.cfg.model.init, "kind": self.info["kind"]}, "best": self.best}

    def transfer_text(self) -> str:
        """The shared tail of the run's description line: initialisation, layer decay, drop path,
        ZeRO stage, precision and learning rate."""
        r, m = self.r, self.cfg.model
        scaled = f", stream x{self.info['stream_scale']:g}" if "stream_scale" in self.info else ""
        return (f"from {m.init or 'random init'} ({self.info['kind']}{scaled}); layer decay {r.layer_decay:.2f} over "
                f"{self.n_groups} groups, drop path {r.drop_path:.2f}; ZeRO "
                f"{self.ds_cfg['zero_optimization'].get('stage', 0)}, {'bf16' if self.bf16 else 'fp32'}; lr "
                f"{self.schedule.base_lr:.3g} ({self.cfg.optim.schedule})")
