"""The PeCo stage-1 objective (paper eq. 5): pixel + lambda * perceptual + commitment [+ GAN]."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .models.discriminator import hinge_g_loss


class PeCoLoss(nn.Module):
    """Combines the tokenizer's outputs into one scalar and the parts that are logged.

    ``perceptual`` is a frozen :class:`~peco_scale.models.perceptual.PerceptualLoss`, or
    None when ``perceptual_weight`` is 0 (a plain VQ-VAE, the paper's lambda = 0 row).
    """

    def __init__(self, pixel: str, perceptual_weight: float, perceptual: nn.Module | None):
        super().__init__()
        self.pixel = pixel
        self.perceptual_weight = perceptual_weight
        self.perceptual = perceptual

    def forward(self, x: torch.Tensor, out: dict[str, torch.Tensor],
                disc: nn.Module | None = None, disc_weight: float = 0.0) -> dict[str, torch.Tensor]:
        """x: [B, 3, H, W] input, ``out`` the tokenizer's dict -> dict with ``loss`` and parts."""
        x_rec = out["x_rec"].float()
        x = x.float()
        rec = F.mse_loss(x_rec, x) if self.pixel == "l2" else F.l1_loss(x_rec, x)
        loss = rec + out["commit_loss"]
        parts = {"rec_loss": rec.detach(), "commit_loss": out["commit_loss"].detach()}
        if self.perceptual is not None:
            percep = self.perceptual(x, x_rec)
            loss = loss + self.perceptual_weight * percep
            parts["percep_loss"] = percep.detach()
        else:
            parts["percep_loss"] = torch.zeros((), device=x.device)
        if disc is not None:
            g = hinge_g_loss(disc(x_rec))
            loss = loss + disc_weight * g
            parts["g_loss"] = g.detach()
        return {"loss": loss, **parts}
