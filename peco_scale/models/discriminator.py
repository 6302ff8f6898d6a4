"""Patch discriminator (pix2pix / Taming NLayerDiscriminator) and hinge losses (paper Table 10)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PatchDiscriminator(nn.Module):
    """x: [B, 3, H, W] in [-1, 1] -> patch logits [B, 1, H', W'] (one per receptive field)."""

    def __init__(self, in_channels: int = 3, channels: int = 64, n_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        c = channels
        for i in range(1, n_layers + 1):
            c_out = channels * min(2**i, 8)
            stride = 2 if i < n_layers else 1
            layers += [nn.Conv2d(c, c_out, 4, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.LeakyReLU(0.2)]
            c = c_out
        layers.append(nn.Conv2d(c, 1, 4, 1, 1))
        self.net = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss: mean(relu(1 - real)) / 2 + mean(relu(1 + fake)) / 2."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator side of the hinge loss: -mean(fake logits)."""
    return -logits_fake.mean()


class MultiScalePatchDiscriminator(nn.Module):
    """MSG-GAN's multi-scale input on the patch discriminator: ``forward([x, x/2, x/4, ...])``
    takes the image at full resolution and at 1/2 ... 1/2**n_layers of it (``scales``); each
    coarser image enters through a 1x1 conv (LeakyReLU) and is concatenated to the features at
    its resolution, so the discriminator judges every scale the generator emits. Same layer
    widths, hinge losses and patch logits [B, 1, H', W'] as :class:`PatchDiscriminator`."""

    def __init__(self, in_channels: int = 3, channels: int = 64, n_layers: int = 3):
        super().__init__()
        self.scales = tuple(2**i for i in range(1, n_layers + 1))
        self.first = nn.Sequential(nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2))
        self.from_rgb, self.stages = nn.ModuleList(), nn.ModuleList()
        c = channels
        for i in range(1, n_layers + 1):  # stage i reads features at 1/2**i and the image at that scale
            self.from_rgb.append(nn.Sequential(nn.Conv2d(in_channels, c, 1), nn.LeakyReLU(0.2)))
            c_out = channels * min(2**i, 8)
            stride = 2 if i < n_layers else 1
            self.stages.append(nn.Sequential(nn.Conv2d(2 * c, c_out, 4, stride, 1, bias=False), nn.BatchNorm2d(c_out),
                                             nn.LeakyReLU(0.2)))
            c = c_out
        self.last = nn.Conv2d(c, 1, 4, 1, 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)

    def forward(self, images: list[torch.Tensor]) -> torch.Tensor:
        if len(images) != len(self.scales) + 1:
            raise ValueError(f"expected the image at full size and at 1/{', 1/'.join(map(str, self.scales))}, got "
                             f"{len(images)} images")
        h = self.first(images[0])
        for img, rgb, stage in zip(images[1:], self.from_rgb, self.stages):
            if img.shape[-2:] != h.shape[-2:]:
                raise ValueError(f"image of {tuple(img.shape[-2:])} px where the features are {tuple(h.shape[-2:])}")
            h = stage(torch.cat([h, rgb(img)], dim=1))
        return self.last(h)


def image_pyramid(x: torch.Tensor, scales: tuple[int, ...]) -> list[torch.Tensor]:
    """``[x] + [avg_pool(x, s) for s in scales]``: the real images' side of the multi-scale input."""
    return [x] + [F.avg_pool2d(x, s) for s in scales]
