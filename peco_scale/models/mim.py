"""The stage-2 task: predict a frozen tokenizer's token ids at masked patches.

``MIMTask`` owns the frozen tokenizer but does not register it as a sub-module: the tokenizer
is not trained, so it must not be partitioned by ZeRO-3, handed to the optimizer, or written
into training checkpoints (its sha256 identifies it instead). It is moved to the device with
``MIMTask.to_device`` and, on GPU, its encoder runs in bf16 while the nearest-code search
stays in fp32.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_

from ..config import ConfigError
from .tokenizer import VQTokenizer
from .vit import MaskedViT

HEAD_IMPLS = ("torch",)  # the fused Triton head (peco_kernels) is added with the kernels


def masked_linear_cross_entropy_reference(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                          targets: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-PyTorch head + loss: mean cross-entropy and accuracy over the rows where ``mask``.

    hidden [B, L, H] (or [N, H]), weight [V, H], bias [V] | None, targets int64 and mask bool
    shaped like hidden without its last dim. Logits exist only for the selected rows and are
    computed in the input dtype, then the softmax in fp32.
    """
    rows = hidden[mask]
    tgt = targets[mask]
    logits = F.linear(rows, weight, bias).float()
    loss = F.cross_entropy(logits, tgt)
    with torch.no_grad():
        acc = (logits.argmax(dim=-1) == tgt).float().mean()
    return loss, acc


class MIMHead(nn.Module):
    """Linear ``embed_dim -> vocab`` classifier applied at masked positions only."""

    def __init__(self, embed_dim: int, vocab: int, impl: str = "torch"):
        super().__init__()
        if impl not in HEAD_IMPLS:
            raise ConfigError(f"model.head_impl='{impl}' is not available; choose one of {', '.join(HEAD_IMPLS)}")
        self.impl = impl
        self.weight = nn.Parameter(torch.empty(vocab, embed_dim))
        self.bias = nn.Parameter(torch.zeros(vocab))
        trunc_normal_(self.weight, std=0.02)

    def forward(self, hidden: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return masked_linear_cross_entropy_reference(hidden, self.weight, self.bias, targets, mask)


class MIMTask(nn.Module):
    """Masked image modeling over a frozen tokenizer's ids.

    ``forward(patch_view, tokenizer_view, mask)`` -> dict(loss, mlm_acc). The token grid of
    the tokenizer view must equal the backbone's patch grid.
    """

    def __init__(self, backbone: MaskedViT, tokenizer: VQTokenizer, *, head_impl: str = "torch"):
        super().__init__()
        self.backbone = backbone
        vocab = tokenizer.quant_cfg.codebook_size
        self.head = MIMHead(backbone.embed_dim, vocab, head_impl)
        tokenizer.requires_grad_(False).eval()
        object.__setattr__(self, "tokenizer", tokenizer)  # deliberately not a sub-module (see module doc)

    @property
    def vocab(self) -> int:
        return self.head.weight.shape[0]

    @property
    def tokenizer_img_size(self) -> int:
        """Tokenizer input side whose token grid equals the patch grid."""
        return self.backbone.grid_size[0] * self.tokenizer.downsample

    def to_device(self, device: torch.device) -> "MIMTask":
        """Move the frozen tokenizer (the trainable part is moved by its wrapper)."""
        tok = self.tokenizer.to(device)
        if device.type == "cuda":
            tok.encoder.to(torch.bfloat16)
        return self

    @torch.no_grad()
    def targets(self, tokenizer_view: torch.Tensor) -> torch.Tensor:
        """Token ids [B, h*w] of the tokenizer view (frozen, no grad)."""
        enc = self.tokenizer.encoder
        dtype = next(enc.parameters()).dtype
        ids = self.tokenizer.tokenize(tokenizer_view.to(dtype))
        return ids.flatten(1)

    def forward(self, patch_view: torch.Tensor, tokenizer_view: torch.Tensor, mask: torch.Tensor) -> dict[str, Any]:
        mask = mask.flatten(1).bool()
        targets = self.targets(tokenizer_view)
        if targets.shape != mask.shape:
            raise ValueError(f"token grid of {targets.shape[1]} ids != patch grid of {mask.shape[1]} patches; "
                             f"the tokenizer view must be {self.tokenizer_img_size} px")
        hidden = self.backbone(patch_view, mask)
        loss, acc = self.head(hidden, targets, mask)
        return {"loss": loss, "mlm_acc": acc}
