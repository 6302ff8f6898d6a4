"""Analytic FLOPs of the ViT backbone and the MIM head (1 multiply-accumulate = 2 FLOPs).

The trainer's MFU and ``tflops_per_gpu`` columns and ``tools/plan`` use these counts; the
tests check them against ``torch.utils.flop_counter.FlopCounterMode`` (``count_forward_flops``)
and against the table in docs/method.md.
"""

from __future__ import annotations

from typing import Any, Callable

from ..config import ConfigError
from ..data.masking import default_num_masked
from .vit import ViTPreset


# ----------------------------------------------------------------------------- shapes

def grid(preset: ViTPreset, img_size: int) -> tuple[int, int]:
    """(patches N, tokens T = N + class token). Raises ConfigError if the patch does not divide."""
    if img_size <= 0 or img_size % preset.patch_size:
        p = preset.patch_size
        raise ConfigError(f"img_size={img_size} is not a positive multiple of the patch size {p}; "
                          f"use {max(img_size // p, 1) * p} or {(max(img_size // p, 0) + 1) * p}")
    n = (img_size // preset.patch_size) ** 2
    return n, n + 1


def hidden_dim(preset: ViTPreset) -> int:
    return int(preset.embed_dim * preset.mlp_ratio)  # as timm's Block


# ----------------------------------------------------------------------------- FLOPs

def _forward_macs(preset: ViTPreset, img_size: int, num_tokens: int | None = None) -> tuple[float, float]:
    """(patch-embedding MACs, MACs of all blocks) for one image."""
    n, t = grid(preset, img_size)
    t = t if num_tokens is None else num_tokens
    d, h, p = preset.embed_dim, hidden_dim(preset), preset.patch_size
    patch = n * 3 * p * p * d
    block = t * (3 * d * d + d * d + 2 * d * h) + 2 * t * t * d  # qkv, proj, fc1+fc2; q@k^T and attn@v
    return float(patch), float(preset.depth * block)


def vit_forward_flops(preset: ViTPreset, img_size: int, *, num_tokens: int | None = None) -> float:
    """Forward FLOPs of the backbone for one image (1 MAC = 2 FLOPs).

    Counts the patch-embedding convolution over all N patches and, per block, the qkv, proj,
    fc1 and fc2 matmuls over all T tokens (N patches + class token) plus attention scores and
    the weighted sum (2 * T^2 * D MACs). Norms, softmax, GELU, biases, residual adds and layer
    scale (O(T*D) each) are ignored. ``num_tokens`` overrides T in the blocks (e.g. an
    MAE-style encoder over visible tokens); the patch embedding still covers all N patches.
    Reproduces docs/method.md (L/16@224: 61.6 GMACs ... H/14@448: 731.7 GMACs).
    """
    patch, blocks = _forward_macs(preset, img_size, num_tokens)
    return 2.0 * (patch + blocks)


def head_flops(embed_dim: int, vocab: int, num_masked: int) -> float:
    """Forward FLOPs of the linear MIM head on the masked positions of one image: 2*M*D*V."""
    return 2.0 * num_masked * embed_dim * vocab


def mim_train_flops(preset: ViTPreset, img_size: int, *, vocab: int = 8192, num_masked: int | None = None,
                    checkpointing: bool = False, tokenizer_forward_flops: float = 0.0,
                    head_recompute: bool = False) -> dict[str, float]:
    """FLOPs of one training image, by convention:

    - ``model``: 3 x (backbone + head) forward (forward + backward = 2x forward). These are the
      FLOPs for MFU and ``tflops_per_gpu``; by convention they do NOT count recomputation.
    - ``hardware``: what the GPU actually runs: ``model`` plus, with activation checkpointing,
      one more forward of the blocks (timm's ``checkpoint_seq`` reruns the blocks only, not the
      patch embedding), plus one more head forward if the head recomputes its logits in
      backward (``head_recompute``, e.g. Cut Cross-Entropy: 8NHV instead of 6NHV).
    - ``tokenizer``: forward only (frozen, no backward); the caller passes its FLOPs.
    - ``total``: ``hardware`` + ``tokenizer``.
    ``num_masked`` defaults to BEiT's ratio (75 of 196 patches).
    """
    n, _ = grid(preset, img_size)
    m = default_num_masked(n) if num_masked is None else num_masked
    patch, blocks = _forward_macs(preset, img_size)
    backbone = 2.0 * (patch + blocks)
    head = head_flops(preset.embed_dim, vocab, m)
    model = 3.0 * (backbone + head)
    hardware = model + (2.0 * blocks if checkpointing else 0.0) + (head if head_recompute else 0.0)
    return {"backbone_forward": backbone, "head_forward": head, "model": model, "hardware": hardware,
            "tokenizer": float(tokenizer_forward_flops), "total": hardware + float(tokenizer_forward_flops)}


def mae_train_flops(preset: ViTPreset, img_size: int, *, num_masked: int, decoder_dim: int = 512,
                    decoder_depth: int = 8, checkpointing: bool = False) -> dict[str, float]:
    """FLOPs of one MAE training image, with :func:`mim_train_flops`'s conventions: the encoder
    runs its blocks over the visible patches + class token only (the patch embedding covers all
    patches); the decoder embeds those tokens, then runs ``decoder_depth`` blocks of width
    ``decoder_dim`` (MLP 4x) over all patches + class token, and predicts ``patch**2 * 3`` values
    per patch. ``model`` = 3 x forward; ``hardware`` adds one block forward of the encoder with
    activation checkpointing."""
    n, t = grid(preset, img_size)
    visible = t - num_masked
    patch, blocks = _forward_macs(preset, img_size, visible)
    dd = decoder_dim
    decoder = visible * preset.embed_dim * dd + decoder_depth * (t * (4 * dd * dd + 8 * dd * dd) + 2 * t * t * dd) \
        + n * dd * preset.patch_size ** 2 * 3
    encoder_fwd, decoder_fwd = 2.0 * (patch + blocks), 2.0 * decoder
    model = 3.0 * (encoder_fwd + decoder_fwd)
    hardware = model + (2.0 * blocks if checkpointing else 0.0)
    return {"backbone_forward": encoder_fwd, "decoder_forward": decoder_fwd, "model": model, "hardware": hardware,
            "total": hardware}


def count_forward_flops(module: Callable[..., Any], *inputs: Any, **kwargs: Any) -> float:
    """FLOPs of ``module(*inputs, **kwargs)`` measured by ``torch.utils.flop_counter.FlopCounterMode``.

    ``module`` may be any callable (e.g. ``model.forward_masked``). SDPA is forced onto its math
    path: FlopCounterMode has no formula for the CPU flash kernel and would count zero
    attention FLOPs; the math path runs the same two matmuls as bmm. Works on the meta device.
    """
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]), counter:
        module(*inputs, **kwargs)
    return float(counter.get_total_flops())
