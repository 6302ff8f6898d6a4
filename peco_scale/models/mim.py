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
from peco_kernels import masked_linear_cross_entropy
from timm.layers import trunc_normal_

from .tokenizer import VQTokenizer
from .vit import MaskedViT


class MIMHead(nn.Module):
    """Linear ``embed_dim -> vocab`` classifier + cross-entropy at masked positions only, through
    ``peco_kernels.masked_linear_cross_entropy`` (fused Triton, or its torch reference)."""

    def __init__(self, embed_dim: int, vocab: int, kernels: str = "auto"):
        super().__init__()
        self.kernels = kernels  # a peco_kernels backend, checked once where the config is resolved
        self.weight = nn.Parameter(torch.empty(vocab, embed_dim))
        self.bias = nn.Parameter(torch.zeros(vocab))
        trunc_normal_(self.weight, std=0.02)

    def forward(self, hidden: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # targets come from the tokenizer, whose codebook size was checked against the head at start-up
        return masked_linear_cross_entropy(hidden, self.weight, self.bias, targets, mask, backend=self.kernels,
                                           return_accuracy=True, validate=False)


class MIMTask(nn.Module):
    """Masked image modeling over a frozen tokenizer's ids.

    ``forward(patch_view, tokenizer_view, mask)`` -> dict(loss, mlm_acc). The token grid of
    the tokenizer view must equal the backbone's patch grid.
    """

    def __init__(self, backbone: MaskedViT, tokenizer: VQTokenizer, *, kernels: str = "auto"):
        super().__init__()
        self.backbone = backbone
        vocab = tokenizer.quant_cfg.codebook_size
        self.head = MIMHead(backbone.embed_dim, vocab, kernels)
        tokenizer.requires_grad_(False).eval()
        tokenizer.quantizer.kernels = kernels  # the target lookup uses the same backend choice
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
