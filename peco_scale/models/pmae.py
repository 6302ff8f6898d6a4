"""Perceptual MAE's objective (Tukra et al., "Improving Visual Representation Learning through
Perceptual Understanding"): MAE's pixel loss + lambda x a perceptual loss between the
reconstructed image and the input [+ an adversarial term from a discriminator trained alongside].

- The reconstruction is the MAE's prediction at the masked patches with the input's own patches
  pasted back at the visible ones (de-normalised per patch when the pixel loss is normalised), so
  only the masked patches carry gradient, and it flows back through the decoder into the encoder.
- The perceptual term is stage 1's (PeCo eq. 4): unit-normalised features of the same frozen
  network, compared at the same layers. Unlike the paper's public code, which computes its
  perceptual features under ``no_grad``, the term here is differentiable in the reconstruction.
- The adversarial term is the hinge loss of stage 1's patch discriminator on the reconstruction;
  with the multi-scale decoder the discriminator also reads the decoder's 1/2, 1/4, 1/8-scale
  images (MSG-GAN), real images being average-pooled to the same sizes.

Images on the way in are the ImageNet-normalised patch view; the perceptual network and the
discriminator read [-1, 1] images, as in stage 1.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

from .discriminator import hinge_g_loss, image_pyramid
from .mae import paste_prediction


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """ImageNet-normalised [B, 3, H, W] -> the same images in [-1, 1] (fp32)."""
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD, device=images.device).view(1, 3, 1, 1)
    return (images.float() * std + mean) * 2 - 1


def reconstructions(images: torch.Tensor, mask: torch.Tensor, out: dict[str, Any], patch: int,
                    grid: tuple[int, int], norm_pix: bool) -> list[torch.Tensor]:
    """The MAE's images in [-1, 1]: full size first, then one per ``out["scales"]`` entry (the
    multi-scale decoder's predictions at 1/s, pasted into the average-pooled input)."""
    mask = mask.flatten(1).bool()
    fakes = [to_unit_range(paste_prediction(images, mask, out["pred"], patch, grid, norm_pix))]
    scales = out.get("scales", {})
    for s in sorted(scales):  # 1/2 first, as the discriminator reads them
        pred = scales[s]
        small = F.avg_pool2d(images.float(), s)
        fakes.append(to_unit_range(paste_prediction(small, mask, pred, patch // s, grid, norm_pix)))
    return fakes


class PerceptualMAELoss(nn.Module):
    """``forward(images, mask, out, disc=None, disc_weight=0)`` -> dict with ``loss`` (MAE's loss
    + ``perceptual_weight`` x perceptual [+ ``disc_weight`` x hinge generator loss]), the detached
    parts (``mae_loss``, ``percep_loss``, ``g_loss``) and ``fakes`` (the reconstructions the
    discriminator is trained on, not detached). ``perceptual`` is a frozen
    :class:`~.perceptual.PerceptualLoss`, or None for no perceptual term (``percep_loss`` 0: MAE
    with a discriminator only); ``out`` is :class:`~.mae.MAETask`'s output."""

    def __init__(self, perceptual: nn.Module, perceptual_weight: float, *, patch: int, grid: tuple[int, int],
                 norm_pix: bool) -> None:
        super().__init__()
        self.perceptual, self.weight = perceptual, perceptual_weight
        self.patch, self.grid, self.norm_pix = patch, tuple(grid), norm_pix

    def forward(self, images: torch.Tensor, mask: torch.Tensor, out: dict[str, Any], disc: nn.Module | None = None,
                disc_weight: float = 0.0) -> dict[str, Any]:
        fakes = reconstructions(images, mask, out, self.patch, self.grid, self.norm_pix)
        real = to_unit_range(images)
        percep = self.perceptual(real, fakes[0]) if self.perceptual is not None else real.new_zeros(())
        loss = out["loss"].float() + self.weight * percep
        parts = {"mae_loss": out["loss"].detach().float(), "percep_loss": percep.detach()}
        if disc is not None:
            g = hinge_g_loss(disc(fakes if len(fakes) > 1 else fakes[0]).float())
            loss = loss + disc_weight * g
            parts["g_loss"] = g.detach()
        return {"loss": loss, **parts, "fakes": fakes, "real": real}


def real_images(real: torch.Tensor, num_scales: int) -> list[torch.Tensor] | torch.Tensor:
    """The discriminator's real input: the [-1, 1] image alone, or with its 1/2 ... 1/2**num_scales poolings."""
    return image_pyramid(real, tuple(2**i for i in range(1, num_scales + 1))) if num_scales else real
