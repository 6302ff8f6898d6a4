"""The MAE-family stage-2 tasks: a ViT encoder over the visible patches only, a light decoder
that predicts the pixels of the masked patches (He et al., "Masked Autoencoders Are Scalable
Vision Learners").

- The encoder is the PeCo backbone class (:class:`~.vit.MaskedViT`, timm's layout), run with
  ``visible_only=True``: position embeddings are added to every patch, then only the visible
  patches (and the class token) go through the blocks - MAE's speed-up. It exports to timm
  exactly like the PeCo backbone.
- The decoder embeds the encoder's tokens to ``decoder_dim``, puts a shared mask token at every
  masked position, adds fixed 2-D sine-cosine position embeddings (MAE's), runs ``depth`` timm
  blocks and predicts ``patch * patch * 3`` values per patch.
- The loss is the mean squared error over the masked patches only, against the input's patches
  (patchified as MAE does: rows, columns, channels innermost), each target patch normalised by
  its own mean and (unbiased) variance when ``norm_pix`` (MAE's default).

Masks come from the data pipeline (``masking.RandomMaskGenerator``: exactly ``num_masked`` per
image), so every image keeps the same number of visible patches.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block

from .vit import MaskedViT


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, N, patch * patch * C], patches in row-major order, each flattened as
    (row, column, channel) like MAE's ``patchify``."""
    b, c, h, w = images.shape
    gh, gw = h // patch, w // patch
    x = images.reshape(b, c, gh, patch, gw, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, gh * gw, patch * patch * c)


def unpatchify(patches: torch.Tensor, patch: int, grid: tuple[int, int], channels: int = 3) -> torch.Tensor:
    """Inverse of :func:`patchify`: [B, N, patch * patch * C] -> [B, C, H, W]."""
    b = patches.shape[0]
    gh, gw = grid
    x = patches.reshape(b, gh, gw, patch, patch, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, channels, gh * patch, gw * patch)


def mae_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, *, norm_pix: bool = True) -> torch.Tensor:
    """MAE's loss: per-patch MSE averaged over the masked patches (``mask`` [B, N], True =
    masked). With ``norm_pix`` each target patch is normalised by its mean and unbiased variance
    (+1e-6), as MAE's ``norm_pix_loss``."""
    target = target.float()
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1e-6) ** 0.5
    per_patch = (pred.float() - target).pow(2).mean(dim=-1)
    m = mask.to(per_patch.dtype)
    return (per_patch * m).sum() / m.sum()


def visible_indices(mask: torch.Tensor, num_masked: int | None = None) -> torch.Tensor:
    """Indices [B, N_visible] of the unmasked patches of ``mask`` ([B, N] or [B, h, w], True =
    masked; ``num_masked`` in every image, read from the first image when None), ascending.
    Sorting instead of boolean indexing keeps the shapes static: with ``num_masked`` given there
    is no device sync."""
    mask = mask.flatten(1)
    num_visible = mask.shape[1] - (int(mask[0].sum()) if num_masked is None else num_masked)
    order = torch.argsort(mask.to(torch.int8), dim=1, stable=True)
    return order[:, :num_visible]


def sincos_pos_embed(dim: int, grid: tuple[int, int], cls_token: bool = True) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embeddings [1 + N, dim] (a zero row for the class token):
    half of the channels encode the row, half the column, each as sin/cos of the position times
    ``1 / 10000 ** (2i / (dim / 2))``."""
    if dim % 4:
        raise ValueError(f"decoder width {dim} must be a multiple of 4 for 2-D sine-cosine embeddings")
    gh, gw = grid
    rows, cols = torch.meshgrid(torch.arange(gh, dtype=torch.float64), torch.arange(gw, dtype=torch.float64),
                                indexing="ij")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))

    def encode(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.reshape(-1, 1) * omega[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    emb = torch.cat([encode(cols), encode(rows)], dim=1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim, dtype=emb.dtype), emb])
    return emb.float()


class MAEDecoder(nn.Module):
    """Encoder tokens of the visible patches (+ class token) -> per-patch pixel predictions."""

    def __init__(self, grid: tuple[int, int], patch: int, encoder_dim: int, *, dim: int = 512, depth: int = 8,
                 num_heads: int = 16, mlp_ratio: float = 4.0, channels: int = 3, scales: tuple[int, ...] = ()) -> None:
        super().__init__()
        self.grid, self.patch, self.scales = tuple(grid), patch, tuple(scales)
        if any(patch % s for s in self.scales) or len(self.scales) >= depth:
            raise ValueError(f"scales {self.scales} must divide the patch size {patch} and number fewer than the "
                             f"decoder's {depth} blocks")
        self.embed = nn.Linear(encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos_embed", sincos_pos_embed(dim, self.grid)[None], persistent=False)
        self.blocks = nn.Sequential(*[Block(dim, num_heads, mlp_ratio, qkv_bias=True) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.pred = nn.Linear(dim, patch * patch * channels)
        # multi-scale outputs (MSG-GAN): the image at 1/scales[k] is read after block depth - 2 - k
        self.scale_heads = nn.ModuleList(nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, (patch // s) ** 2 * channels))
                                         for s in self.scales)
        trunc_normal_(self.mask_token, std=0.02)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):  # MAE: xavier-uniform linears, zero biases
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"mask_token"}

    def forward(self, latent: torch.Tensor, keep: torch.Tensor, num_patches: int,
                ) -> torch.Tensor | tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """latent [B, 1 + N_visible, D] (class token first) of the patches ``keep`` [B, N_visible]
        -> [B, N, p*p*C]; with ``scales``, also {s: [B, N, (p/s)^2*C]}."""
        x = self.embed(latent)
        b, d = x.shape[0], x.shape[-1]
        full = self.mask_token.to(x.dtype).expand(b, num_patches, d)
        full = full.scatter(1, keep[..., None].expand(-1, -1, d), x[:, 1:])  # visible tokens back in place
        x = torch.cat([x[:, :1], full], dim=1) + self.pos_embed.to(x.dtype)
        if not self.scales:
            return self.pred(self.norm(self.blocks(x))[:, 1:])
        taps = {len(self.blocks) - 2 - k: (s, head) for k, (s, head) in enumerate(zip(self.scales, self.scale_heads))}
        small = {}
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in taps:
                s, head = taps[i]
                small[s] = head(x[:, 1:])
        return self.pred(self.norm(x)[:, 1:]), small


def paste_prediction(images: torch.Tensor, mask: torch.Tensor, pred: torch.Tensor, patch: int,
                     grid: tuple[int, int], norm_pix: bool) -> torch.Tensor:
    """The predicted image in the input's space (fp32): ``pred`` at the masked patches
    (de-normalised by each input patch's own mean and unbiased variance when ``norm_pix``, as
    MAE's visualisation does), the input's own patches at the visible ones. Gradient reaches
    ``pred`` at the masked patches only."""
    mask = mask.flatten(1).bool()
    target = patchify(images.float(), patch)
    pred = pred.float()
    if norm_pix:
        pred = pred * (target.var(dim=-1, keepdim=True) + 1e-6) ** 0.5 + target.mean(dim=-1, keepdim=True)
    return unpatchify(torch.where(mask[..., None], pred, target), patch, grid, images.shape[1])


class MAETask(nn.Module):
    """Masked autoencoder: ``forward(images, mask)`` -> dict(loss, pred [B, N, p*p*3]) and, with
    a multi-scale decoder (``scales``), ``scales`` {s: [B, N, (p/s)^2*3]} (no loss of their own:
    they exist for a discriminator, as MSG-GAN's).

    ``images`` is the ImageNet-normalised patch view (MAE's target space), ``mask`` bool
    [B, h, w] or [B, N] with ``num_masked`` masked patches in every image.
    """

    def __init__(self, backbone: MaskedViT, *, decoder_dim: int = 512, decoder_depth: int = 8,
                 decoder_heads: int = 16, norm_pix: bool = True, num_masked: int | None = None,
                 scales: tuple[int, ...] = ()) -> None:
        super().__init__()
        self.num_masked = num_masked  # masked patches per image (static shapes); None = read each mask
        self.backbone = backbone
        self.patch = backbone.preset.patch_size
        self.norm_pix = norm_pix
        self.decoder = MAEDecoder(backbone.grid_size, self.patch, backbone.embed_dim, dim=decoder_dim,
                                  depth=decoder_depth, num_heads=decoder_heads, scales=scales)

    def predict(self, images: torch.Tensor, mask: torch.Tensor) -> Any:
        """Per-patch predictions [B, N, p*p*3] (in the normalised-patch space when ``norm_pix``);
        with scales, (predictions, {s: predictions at 1/s})."""
        keep = visible_indices(mask, self.num_masked)
        latent = self.backbone(images, keep=keep)
        return self.decoder(latent, keep, mask.flatten(1).shape[1])

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> dict[str, Any]:
        pred = self.predict(images, mask)
        out: dict[str, Any] = {}
        if self.decoder.scales:
            pred, out["scales"] = pred
        loss = mae_loss(pred, patchify(images, self.patch), mask.flatten(1).bool(), norm_pix=self.norm_pix)
        return {"loss": loss, "pred": pred, **out}

    def reconstruct(self, images: torch.Tensor, mask: torch.Tensor, pred: torch.Tensor | None = None) -> torch.Tensor:
        """:func:`paste_prediction` of this model's prediction (computed when ``pred`` is None)."""
        if pred is None:
            pred = self.forward(images, mask)["pred"]
        return paste_prediction(images, mask, pred, self.patch, self.backbone.grid_size, self.norm_pix)
