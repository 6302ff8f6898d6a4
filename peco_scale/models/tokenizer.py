"""The stage-1 VQ-VAE: conv encoder -> EMA quantizer -> conv decoder (Taming-style blocks).

Presets (``TOKENIZER_PRESETS``): ``default`` is the paper's network (64 channels doubled at
each of 4 downsamples, 2 residual blocks per resolution, one attention block at the lowest
resolution, 16x), ``lite`` halves the channels, ``tiny`` is sized for CPU tests and the demo.
An 8x variant drops one stage (``model.ch_mult`` with 4 entries).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import field
from .quantizer import EMAVectorQuantizer, QuantizerConfig


@dataclass
class TokenizerModelConfig:
    """Tokenizer architecture."""

    preset: str = field("default", "named preset: default (paper), lite (half channels), tiny (tests/demo)")
    in_channels: int = field(3, "image channels")
    base_channels: int = field(64, "channels of the first stage; doubled by ch_mult at each downsample")
    ch_mult: tuple[int, ...] = field((1, 2, 4, 8, 16), "channel multiplier per resolution; len-1 downsamples")
    num_res_blocks: int = field(2, "residual blocks per resolution")
    attn_at_lowest: bool = field(True, "one self-attention block at the lowest resolution")
    decoder_channel_scale: float = field(1.0, "decoder width relative to the encoder (paper Table 7: 0.5 loses nothing)")
    dropout: float = field(0.0, "dropout inside residual blocks")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


# Each preset is a set of overrides on the defaults (model and quantizer sections).
TOKENIZER_PRESETS: dict[str, dict[str, object]] = {
    "default": {},
    "lite": {"model.base_channels": 32},
    "tiny": {
        "model.base_channels": 16,
        "model.ch_mult": (1, 2, 2, 4, 4),
        "model.num_res_blocks": 1,
        "quantizer.codebook_size": 1024,
        "quantizer.dim": 16,
        "quantizer.dead_code_steps": 30,
        "quantizer.usage_window": 50,
    },
}


def _norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=min(32, ch // 4 if ch % 32 else 32), num_channels=ch, eps=1e-6)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv x2 with a (1x1 if needed) skip. x: [B, C_in, H, W] -> [B, C_out, H, W]."""

    def __init__(self, c_in: int, c_out: int, dropout: float):
        super().__init__()
        self.norm1, self.conv1 = _norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = _norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.drop = nn.Dropout(dropout)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.drop(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention (SDPA). x: [B, C, H, W] -> same."""

    def __init__(self, ch: int):
        super().__init__()
        self.norm = _norm(ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(-1, -2).unbind(1)  # [B, HW, C]
        out = F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)).squeeze(1)
        return x + self.proj(out.transpose(1, 2).reshape(b, c, h, w))


def _mid_block(c: int, cfg: TokenizerModelConfig) -> nn.Sequential:
    """ResBlock [+ attention] + ResBlock at the lowest resolution (encoder and decoder alike)."""
    attn = [AttnBlock(c)] if cfg.attn_at_lowest else []
    return nn.Sequential(ResBlock(c, c, cfg.dropout), *attn, ResBlock(c, c, cfg.dropout))


class Encoder(nn.Module):
    """Image [B, 3, H, W] -> latent [B, D, H/f, W/f] with f = 2**(len(ch_mult)-1)."""

    def __init__(self, cfg: TokenizerModelConfig, z_dim: int):
        super().__init__()
        chs = [cfg.base_channels * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(cfg.in_channels, chs[0], 3, padding=1)
        layers: list[nn.Module] = []
        c = chs[0]
        for level, c_out in enumerate(chs):
            for _ in range(cfg.num_res_blocks):
                layers.append(ResBlock(c, c_out, cfg.dropout))
                c = c_out
            if level < len(chs) - 1:
                layers.append(nn.Conv2d(c, c, 3, stride=2, padding=1))  # downsample
        self.down = nn.Sequential(*layers)
        self.mid = _mid_block(c, cfg)
        self.norm_out = _norm(c)
        self.conv_out = nn.Conv2d(c, z_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.down(self.conv_in(x)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent [B, D, h, w] -> image [B, 3, h*f, w*f]; the encoder mirrored."""

    def __init__(self, cfg: TokenizerModelConfig, z_dim: int):
        super().__init__()
        chs = [max(8, int(cfg.base_channels * m * cfg.decoder_channel_scale)) for m in cfg.ch_mult]
        c = chs[-1]
        self.conv_in = nn.Conv2d(z_dim, c, 3, padding=1)
        self.mid = _mid_block(c, cfg)
        layers: list[nn.Module] = []
        for level in reversed(range(len(chs))):
            for _ in range(cfg.num_res_blocks):
                layers.append(ResBlock(c, chs[level], cfg.dropout))
                c = chs[level]
            if level > 0:
                layers += [nn.Upsample(scale_factor=2.0, mode="nearest"), nn.Conv2d(c, c, 3, padding=1)]
        self.up = nn.Sequential(*layers)
        self.norm_out = _norm(c)
        self.conv_out = nn.Conv2d(c, cfg.in_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.up(self.mid(self.conv_in(z)))
        return self.conv_out(F.silu(self.norm_out(h)))


class VQTokenizer(nn.Module):
    """The PeCo tokenizer. Images are normalised to [-1, 1]."""

    def __init__(self, model: TokenizerModelConfig, quantizer: QuantizerConfig, kernels: str = "auto"):
        super().__init__()
        self.model_cfg, self.quant_cfg = model, quantizer
        self.encoder = Encoder(model, quantizer.dim)
        self.quantizer = EMAVectorQuantizer(quantizer, kernels)
        self.decoder = Decoder(model, quantizer.dim)

    @property
    def downsample(self) -> int:
        return self.model_cfg.downsample

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x: [B, 3, H, W] -> dict(``x_rec`` [B, 3, H, W], ``indices`` [B, H/f, W/f],
        ``commit_loss``, and the quantizer's statistics in training)."""
        q = self.quantizer(self.encoder(x))
        q["x_rec"] = self.decoder(q.pop("z_q"))
        return q

    @torch.no_grad()
    def tokenize(self, x: torch.Tensor) -> torch.Tensor:
        """Token ids: [B, 3, H, W] -> int64 [B, H/f, W/f]."""
        return self.quantizer.encode_indices(self.encoder(x))

    @torch.no_grad()
    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Images from token ids: [B, h, w] -> [B, 3, h*f, w*f]."""
        return self.decoder(self.quantizer.lookup(indices))
