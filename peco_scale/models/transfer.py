"""Stage 3 building blocks: the classifier, pretrained-weight loading and layer-wise lr decay.

The classifier is timm's own ``VisionTransformer`` with ``global_pool="avg"`` (mean of the patch
tokens, then ``fc_norm``; the final per-token ``norm`` is an identity), as BEiT/MAE fine-tune.
Its state dict is timm's, so a fine-tuned model exports to ``timm.create_model(name,
num_classes=N, global_pool="avg")`` with ``strict=True``.

Pretrained weights are read by ``peco_scale.engine.weights.load_pretrained``. The pretrained ``norm``, ``head`` and ``mask_token`` are dropped (the head and ``fc_norm`` start
fresh, as in BEiT/MAE); position embeddings are resized bicubically when the grid differs.
Anything else that does not fit the chosen architecture is one error line listing the keys.
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.nn as nn

from ..config import ConfigError
from .vit import VIT_PRESETS, resize_pos_embed, timm_spec

# BEiT v2 / EVA practice (docs/method.md): 0.65 for B (and the small presets), 0.75 L, 0.8 H
LAYER_DECAY = {"vit_large_patch16": 0.75, "vit_huge_patch14": 0.8}
# stochastic depth while fine-tuning: 0.1 for B and smaller, 0.2 L, 0.3 H (BEiT/EVA recipes)
DROP_PATH = {"vit_large_patch16": 0.2, "vit_huge_patch14": 0.3}
_FRESH = ("head.", "fc_norm.")  # initialised by the classifier, never taken from a checkpoint
_DROPPED = ("norm.", "head.", "mask_token")  # pre-training parts the avg-pool classifier does not use


def default_layer_decay(name: str) -> float:
    return LAYER_DECAY.get(name, 0.65)


def default_drop_path(name: str) -> float:
    return DROP_PATH.get(name, 0.1)


def build_classifier(name: str, img_size: int, num_classes: int, *, drop_path: float,
                     layer_scale: float | None = None) -> nn.Module:
    """timm VisionTransformer of preset ``name`` with a ``num_classes`` head on average pooling."""
    import timm

    timm_name, kwargs = classifier_timm_spec(name, img_size, num_classes, layer_scale)
    return timm.create_model(timm_name, pretrained=False, drop_path_rate=drop_path, **kwargs)


def classifier_timm_spec(name: str, img_size: int, num_classes: int, layer_scale: float | None = None,
                         ) -> tuple[str, dict[str, Any]]:
    """(timm name, kwargs) of the avg-pool classifier of preset ``name``: what an export names."""
    timm_name, kwargs = timm_spec(VIT_PRESETS[name], img_size)
    kwargs.update(num_classes=num_classes, global_pool="avg")
    if layer_scale:
        kwargs["init_values"] = layer_scale
    return timm_name, kwargs


def has_layer_scale(sd: dict[str, torch.Tensor]) -> bool:
    return any(k.endswith(".ls1.gamma") for k in sd)


def init_layer_scale(name: str, sd: dict[str, torch.Tensor]) -> float | None:
    """The layer-scale init a backbone of preset ``name`` is built with to take ``sd``: the preset's
    when the weights have gammas (stage-2 checkpoints) or there are none (random init), else None."""
    preset = VIT_PRESETS[name]
    return preset.layer_scale if (has_layer_scale(sd) or not sd) and preset.layer_scale > 0 else None


def adapt_state_dict(sd: dict[str, torch.Tensor], model: nn.Module, source: str = "checkpoint",
                     ) -> dict[str, torch.Tensor]:
    """Fit a pretrained timm-layout state dict to ``model``: drop the pre-training-only parts,
    resize position embeddings, and refuse (one line, listing keys) anything that does not fit."""
    own = model.state_dict()
    out = {k: v for k, v in sd.items() if not k.startswith(_DROPPED) or k in own and not k.startswith(_FRESH)}
    if ("pos_embed" in out and "pos_embed" in own and out["pos_embed"].shape != own["pos_embed"].shape
            and out["pos_embed"].shape[-1] == own["pos_embed"].shape[-1]):  # another grid: resize (else: listed below)
        out["pos_embed"] = resize_pos_embed(out["pos_embed"], tuple(model.patch_embed.grid_size),
                                            num_prefix_tokens=model.num_prefix_tokens)
    expected = {k for k in own if not k.startswith(_FRESH)}
    missing = sorted(expected - out.keys())
    unexpected = sorted(out.keys() - own.keys())
    shapes = sorted(k for k in out.keys() & own.keys() if out[k].shape != own[k].shape)
    if missing or unexpected or shapes:
        parts = []
        for what, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
            if keys:
                shown = ", ".join(f"{k}{tuple(out[k].shape)}->{tuple(own[k].shape)}" if what == "shape mismatch" else k
                                  for k in keys[:4])
                parts.append(f"{len(keys)} {what} ({shown}{', ...' if len(keys) > 4 else ''})")
        raise ConfigError(f"{source} does not match the model's architecture: {'; '.join(parts)}; choose the "
                          f"--model the checkpoint was trained with")
    return {k: v.to(own[k].dtype) for k, v in out.items() if k in own}


@torch.no_grad()
def scale_residual_stream(vit: nn.Module, factor: float) -> list[str]:
    """Multiply a pre-LayerNorm timm ViT's residual stream by ``factor``, in place, and return the
    names of the parameters changed.

    The stream starts as the embeddings (patch projection, position embedding, class/register
    tokens; or ``norm_pre``'s affine when the ViT has one) and each block adds what its two
    branches write (the layer-scale gammas, or without layer scale ``attn.proj`` and ``mlp.fc2``).
    Every branch reads the stream through a LayerNorm, which ignores its scale, so multiplying
    all of these by ``factor`` multiplies every block's output by ``factor`` and leaves the rest
    of the computation as it was (up to LayerNorm's eps): the final ``norm``/``fc_norm`` sees the
    same features; a dense neck gets the blocks' maps times ``factor`` (its first norm, after a
    conv with bias, takes out nearly all of it). What changes is the parameters' size, and with it
    how far AdamW's steps (of a size set by the lr, not by the weights) move them, relatively.
    """
    if not 0 < factor < float("inf"):
        raise ValueError(f"stream scale {factor} must be positive and finite")
    names = []
    if isinstance(getattr(vit, "norm_pre", None), nn.LayerNorm):
        names += ["norm_pre.weight", "norm_pre.bias"]
    else:
        names += ["patch_embed.proj.weight", "patch_embed.proj.bias", "pos_embed", "cls_token", "reg_token"]
    for i, block in enumerate(vit.blocks):
        if isinstance(getattr(block, "ls1", None), nn.Identity) or not hasattr(block, "ls1"):
            names += [f"blocks.{i}.{m}.{w}" for m in ("attn.proj", "mlp.fc2") for w in ("weight", "bias")]
        else:
            names += [f"blocks.{i}.ls1.gamma", f"blocks.{i}.ls2.gamma"]
    params = dict(vit.named_parameters())
    changed = [n for n in names if params.get(n) is not None]
    for n in changed:
        params[n].mul_(factor)
    return changed


# ----------------------------------------------------------------------------- layer-wise lr decay

_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def layer_id(name: str, num_layers: int) -> int:
    """0 for the embeddings (patch, position, class token), i + 1 for block i, num_layers + 1 for
    everything after the blocks (fc_norm, head)."""
    if name in ("cls_token", "pos_embed", "reg_token", "mask_token") or name.startswith("patch_embed."):
        return 0
    m = _BLOCK.match(name)
    if m:
        return int(m.group(1)) + 1
    return num_layers + 1


def layer_decay_groups(model: nn.Module, weight_decay: float, layer_decay: float,
                       vit: str = "") -> list[dict[str, Any]]:
    """AdamW groups with ``lr_scale = layer_decay ** (num_layers + 1 - layer_id)`` (BEiT), and
    weight decay off for 1-D parameters, biases and the ViT's ``no_weight_decay`` names. ``vit``
    names the ViT submodule when the model wraps one (a segmenter, a detector): its parameters
    decay by depth, every other one (neck, heads) takes the full lr."""
    backbone = model.get_submodule(vit) if vit else model
    prefix = f"{vit}." if vit else ""
    num_layers = len(backbone.blocks)
    skip = set(backbone.no_weight_decay()) if hasattr(backbone, "no_weight_decay") else set()
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for full_name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        inside = full_name.startswith(prefix)
        name = full_name[len(prefix):] if inside else full_name
        lid = layer_id(name, num_layers) if inside else num_layers + 1
        decay = not (p.ndim <= 1 or name.endswith(".bias") or (inside and name in skip))
        g = groups.setdefault((lid, decay), {
            "params": [], "names": [], "weight_decay": weight_decay if decay else 0.0,
            "lr_scale": layer_decay ** (num_layers + 1 - lid), "name": f"layer{lid}_{'decay' if decay else 'no_decay'}"})
        g["params"].append(p)
        g["names"].append(full_name)
    return [groups[k] for k in sorted(groups)]


__all__ = ["adapt_state_dict", "build_classifier", "classifier_timm_spec", "default_drop_path", "default_layer_decay",
           "has_layer_scale", "init_layer_scale", "layer_decay_groups", "layer_id",
           "scale_residual_stream"]
