"""The stage-2 backbone: timm's VisionTransformer with a BEiT-style mask token.

The backbone *is* a ``timm.models.vision_transformer.VisionTransformer`` (subclass), so its
state dict uses timm's keys; only ``mask_token`` is extra, and ``export_timm_state_dict``
drops it (and can fold layer scale into the projections) so that
``timm.create_model(<timm_name>, pretrained=False, **timm_kwargs)`` loads it with strict=True.

Attention is timm's, which calls ``F.scaled_dot_product_attention`` (flash/efficient kernels
on GPU). ``set_grad_checkpointing()`` is the activation-checkpointing switch.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from timm.layers import resample_abs_pos_embed, trunc_normal_
from timm.models._manipulate import checkpoint_seq
from timm.models.vision_transformer import Block, VisionTransformer

from ..config import ConfigError


@dataclass(frozen=True)
class ViTPreset:
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    layer_scale: float  # BEiT: 0.1 for B and smaller, 1e-5 for L/H
    timm_name: str  # the timm architecture whose weights layout this preset matches
    mlp_ratio: float = 4.0

    @property
    def timm_overrides(self) -> dict[str, Any]:
        """kwargs needed on top of ``timm_name`` when the preset is not one of timm's sizes."""
        return {}


# Paper sizes (docs/method.md) plus small presets for CPU tests and the demo. Names follow
# timm without the resolution suffix; the resolution is --img_size (or a _224/_448 suffix).
VIT_PRESETS: dict[str, ViTPreset] = {
    "vit_pico_patch16": ViTPreset(16, 128, 4, 4, 0.1, "vit_tiny_patch16_224"),
    "vit_pico_patch8": ViTPreset(8, 128, 4, 4, 0.1, "vit_tiny_patch16_224"),
    "vit_tiny_patch16": ViTPreset(16, 192, 12, 3, 0.1, "vit_tiny_patch16_224"),
    "vit_small_patch16": ViTPreset(16, 384, 12, 6, 0.1, "vit_small_patch16_224"),
    "vit_base_patch16": ViTPreset(16, 768, 12, 12, 0.1, "vit_base_patch16_224"),
    "vit_large_patch16": ViTPreset(16, 1024, 24, 16, 1e-5, "vit_large_patch16_224"),
    "vit_huge_patch14": ViTPreset(14, 1280, 32, 16, 1e-5, "vit_huge_patch14_224"),
}

# timm's own sizes of the architectures named above, to know which kwargs an export must pass
_TIMM_SIZES = {
    "vit_tiny_patch16_224": (16, 192, 12, 3), "vit_small_patch16_224": (16, 384, 12, 6),
    "vit_base_patch16_224": (16, 768, 12, 12), "vit_large_patch16_224": (16, 1024, 24, 16),
    "vit_huge_patch14_224": (14, 1280, 32, 16),
}


def parse_model_name(name: str, img_size: int | None = None) -> tuple[str, ViTPreset, int]:
    """'vit_huge_patch14' or 'vit_huge_patch14_448' -> (preset name, preset, img_size).

    An explicit ``img_size`` wins over a suffix; neither means 224.
    """
    m = re.fullmatch(r"(.+?)(?:_(\d+))?", name)
    base, suffix = (m.group(1), m.group(2)) if m else (name, None)
    if base not in VIT_PRESETS:
        base, suffix = name, None
    if base not in VIT_PRESETS:
        raise ConfigError(f"unknown model '{name}'; choose one of {', '.join(VIT_PRESETS)} "
                          f"(optionally with a resolution suffix, e.g. vit_huge_patch14_448)")
    size = img_size if img_size else int(suffix) if suffix else 224
    return base, VIT_PRESETS[base], size


def timm_spec(preset: ViTPreset, img_size: int) -> tuple[str, dict[str, Any]]:
    """(timm model name, kwargs) that build the same backbone in timm with num_classes=0."""
    kwargs: dict[str, Any] = {"img_size": img_size, "num_classes": 0}
    ref = _TIMM_SIZES[preset.timm_name]
    mine = (preset.patch_size, preset.embed_dim, preset.depth, preset.num_heads)
    for key, a, b in zip(("patch_size", "embed_dim", "depth", "num_heads"), mine, ref):
        if a != b:
            kwargs[key] = a
    return preset.timm_name, kwargs


class MaskedViT(VisionTransformer):
    """timm ViT (class token, absolute position embeddings, layer scale) + a mask token.

    ``forward_masked(x, mask)`` replaces the embeddings of masked patches by the mask token
    before position embeddings are added (BEiT), runs the blocks and returns the normalised
    patch tokens [B, N, D] (class token dropped).
    """

    def __init__(self, preset: ViTPreset, img_size: int = 224, *, drop_path: float = 0.1,
                 layer_scale: float | None = None, grad_checkpointing: bool = False):
        if img_size % preset.patch_size:
            raise ConfigError(f"img_size={img_size} is not divisible by the patch size {preset.patch_size}; "
                              f"use {img_size // preset.patch_size * preset.patch_size or preset.patch_size} "
                              f"or {(img_size // preset.patch_size + 1) * preset.patch_size}")
        ls = preset.layer_scale if layer_scale is None else layer_scale
        super().__init__(img_size=img_size, patch_size=preset.patch_size, embed_dim=preset.embed_dim,
                         depth=preset.depth, num_heads=preset.num_heads, mlp_ratio=preset.mlp_ratio,
                         qkv_bias=True, init_values=ls if ls > 0 else None, drop_path_rate=drop_path,
                         num_classes=0, global_pool="token", fix_init=True)
        self.preset = preset
        self.mask_token = nn.Parameter(torch.zeros(1, 1, preset.embed_dim))
        trunc_normal_(self.mask_token, std=0.02)
        self.set_grad_checkpointing(grad_checkpointing)

    @property
    def grid_size(self) -> tuple[int, int]:
        return tuple(self.patch_embed.grid_size)

    @property
    def num_patches(self) -> int:
        return self.patch_embed.num_patches

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return super().no_weight_decay() | {"mask_token"}

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, *, keep: torch.Tensor | None = None,
                ) -> torch.Tensor:
        """x [B, 3, H, W], mask bool [B, N] or [B, h, w] (True = masked) -> patch tokens [B, N, D].

        With ``keep`` (MAE: int64 [B, N_visible], the indices of the visible patches) the masked
        patches are dropped instead of replaced (``mask`` is then ignored) and the result is
        [B, 1 + N_visible, D], class token first.

        This is ``forward`` (not a side method) so that wrappers that hook module calls, such
        as ZeRO-3's parameter gathering, see the backbone's own parameters being used.
        """
        if keep is not None:
            return self.forward_visible(x, keep)
        return self.forward_masked(x, mask)

    def forward_visible(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        x = self._pos_embed(self.patch_embed(x))  # position embeddings on every patch, then drop
        p = self.num_prefix_tokens
        visible = torch.gather(x[:, p:], 1, keep[..., None].expand(-1, -1, x.shape[-1]))
        x = self.norm_pre(torch.cat([x[:, :p], visible], dim=1))
        if self.grad_checkpointing and self.training:
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        return self.norm(x)

    def forward_masked(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = self.patch_embed(x)  # [B, N, D]
        if mask is not None:
            w = mask.flatten(1).unsqueeze(-1).to(x.dtype)
            x = x * (1.0 - w) + self.mask_token.to(x.dtype) * w
        x = self.norm_pre(self._pos_embed(x))
        if self.grad_checkpointing and self.training:
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        return self.norm(x)[:, self.num_prefix_tokens:]


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay on weight matrices; none on norms, biases, layer scales, tokens and
    position embeddings (BEiT/MAE rule: 1-D params and the model's ``no_weight_decay`` names)."""
    skip: set[str] = set()
    for name, mod in model.named_modules():
        if hasattr(mod, "no_weight_decay"):
            prefix = f"{name}." if name else ""
            skip |= {prefix + n for n in mod.no_weight_decay()}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") or name in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]


def export_timm_state_dict(model: MaskedViT | dict[str, torch.Tensor], *, fold_layer_scale: bool = True,
                           ) -> dict[str, torch.Tensor]:
    """fp32 backbone state dict in timm's layout, without the mask token.

    With ``fold_layer_scale`` the per-channel gammas are multiplied into ``attn.proj`` and
    ``mlp.fc2`` (gamma * (W x + b) == (gamma W) x + gamma b), so the result loads into the
    plain timm architecture (no ``init_values``) and computes the same features.
    """
    sd = model.state_dict() if isinstance(model, nn.Module) else dict(model)
    out = {k: v.detach().float().clone() for k, v in sd.items() if k != "mask_token"}
    if fold_layer_scale:
        for key in [k for k in out if k.endswith(".ls1.gamma") or k.endswith(".ls2.gamma")]:
            gamma = out.pop(key).double()
            proj = key[: -len("ls1.gamma")] + ("attn.proj" if ".ls1." in key else "mlp.fc2")
            out[f"{proj}.weight"] = (out[f"{proj}.weight"].double() * gamma[:, None]).float()
            out[f"{proj}.bias"] = (out[f"{proj}.bias"].double() * gamma).float()
    return out


def resize_pos_embed(pos_embed: torch.Tensor, new_grid: tuple[int, int], num_prefix_tokens: int = 1) -> torch.Tensor:
    """Bicubic resize of [1, prefix + h*w, D] position embeddings to ``new_grid`` (timm's resampler)."""
    n = pos_embed.shape[1] - num_prefix_tokens
    side = math.isqrt(n)
    if side * side != n:
        raise ConfigError(f"position embeddings of {n} patches are not a square grid; cannot resize to {new_grid}")
    return resample_abs_pos_embed(pos_embed, list(new_grid), [side, side], num_prefix_tokens=num_prefix_tokens)


__all__ = ["Block", "MaskedViT", "VIT_PRESETS", "ViTPreset", "export_timm_state_dict", "param_groups",
           "parse_model_name", "resize_pos_embed", "timm_spec"]
