"""Export a stage-2 checkpoint's backbone, or a fine-tuned classifier, for timm; or a fine-tuned
segmenter / detector whole.

    python -m peco_scale.tools.export runs/pretrain [--out backbone.safetensors] [--keep_layer_scale]
    python -m peco_scale.tools.export runs/finetune [--best] [--ema] [--out classifier.safetensors]
    python -m peco_scale.tools.export runs/segment [--best] [--out segmenter.safetensors]
    python -m peco_scale.tools.export runs/detect [--best] [--out detector.safetensors]

Consolidates a DeepSpeed checkpoint (any ZeRO stage; ZeRO 1-3 through DeepSpeed's
``zero_to_fp32`` from the fp32 master weights) into one fp32 state dict in timm's layout. The
backbone file loads with ``strict=True`` into ``timm.create_model(timm_name, pretrained=False,
**timm_kwargs)`` (both printed and stored in the file's metadata). The MIM head and mask token
go to a separate ``<out>.mim.safetensors`` (an MAE run's decoder and mask token to
``<out>.mae.safetensors``). Layer scale is folded into the projections by
default, so the plain timm architecture computes the same features; ``--keep_layer_scale``
keeps the gammas (then pass ``init_values`` to timm as printed).

A fine-tuning checkpoint exports whole (backbone + ``fc_norm`` + head) to
``<run>/classifier.safetensors``, loadable into ``timm.create_model(name, pretrained=False,
num_classes=N, global_pool="avg")``; ``--best`` takes the checkpoint named by
``checkpoints/best`` instead of the newest, ``--ema`` its EMA weights.

A segmentation or detection checkpoint exports its whole model (ViT, neck or pyramid, heads;
fp32, the names of :class:`~peco_scale.models.dense.Segmenter` / torchvision's Mask R-CNN) to
``<run>/segmenter.safetensors`` or ``<run>/detector.safetensors``, with the architecture in the
metadata: :func:`load_dense` rebuilds the model and loads it with ``strict=True``.

Exit status 0 on success; bad input prints one ``error:`` line to stderr and exits 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..config import ConfigError
from ..engine.weights import (FORMAT, checkpoint_folder, checkpoint_state,  # noqa: F401 - consolidate: public here too
                              consolidate)
from ..models.vit import VIT_PRESETS, export_timm_state_dict, timm_spec


def _best_folder(path: Path) -> Path:
    for root in (path, path / "checkpoints"):
        if (root / "best").is_file():
            folder = root / (root / "best").read_text().strip()
            if (folder / "COMPLETE").is_file():
                return folder
    raise ConfigError(f"'{path}' has no checkpoints/best naming a complete checkpoint; pass the run folder of a "
                      f"fine-tuning run (best is written at its evaluations) or drop --best")


def _save(target: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
    os.replace(tmp, target)


def export_classifier(folder: Path, state: dict[str, Any], out: str | Path | None, *, fold_layer_scale: bool,
                      ema: bool) -> dict[str, Any]:
    """Write a fine-tuned classifier (timm layout, with its head) from a fine-tuning checkpoint."""
    from ..models.transfer import classifier_timm_spec

    mod = state["model"]
    if ema:
        if not (folder / "ema.safetensors").is_file():
            raise ConfigError(f"checkpoint {folder} has no ema.safetensors (the run had model.ema false); drop --ema")
        from safetensors.torch import load_file

        full = load_file(str(folder / "ema.safetensors"))
    else:
        full = consolidate(folder)
    sd = export_timm_state_dict(full, fold_layer_scale=fold_layer_scale)
    keep_ls = mod.get("layer_scale") and not fold_layer_scale
    timm_name, kwargs = classifier_timm_spec(mod["name"], int(mod["img_size"]), int(mod["num_classes"]),
                                             VIT_PRESETS[mod["name"]].layer_scale if keep_ls else None)
    out = Path(out) if out else folder.parent.parent / "classifier.safetensors"
    meta = {"format": FORMAT, "kind": "finetune", "timm_name": timm_name, "timm_kwargs": json.dumps(kwargs),
            "preset": mod["name"], "step": str(state["step"]), "source": str(folder), "ema": str(bool(ema)),
            "classes": json.dumps(mod.get("classes", []))}
    _save(out, sd, meta)
    return {"backbone": str(out), "mim": None, "timm_name": timm_name, "timm_kwargs": kwargs, "step": state["step"]}


DENSE_FILES = {"segment": "segmenter.safetensors", "detect": "detector.safetensors"}
DENSE_FORMAT = "peco-dense/1"  # metadata "format" of an exported segmenter or detector


def export_dense(folder: Path, state: dict[str, Any], out: str | Path | None) -> dict[str, Any]:
    """Write a fine-tuned segmenter or detector whole (fp32) with what rebuilds it in its metadata."""
    full = consolidate(folder)
    out = Path(out) if out else folder.parent.parent / DENSE_FILES[state["kind"]]
    meta = {"format": DENSE_FORMAT, "kind": state["kind"], "model": json.dumps(state["model"]),
            "step": str(state["step"]), "source": str(folder)}
    _save(out, full, meta)
    return {"backbone": str(out), "mim": None, "kind": state["kind"], "step": state["step"]}


def load_dense(path: str | Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """(model in eval mode, its ``model`` metadata) of an exported segmenter or detector, loaded strictly."""
    from ..models.dense import build_dense

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != DENSE_FORMAT:
            raise ConfigError(f"'{path}' is not a peco-scale segmenter/detector export (format {meta.get('format')!r})")
        sd = {k: f.get_tensor(k) for k in f.keys()}
    mod = json.loads(meta["model"])
    model = build_dense(meta["kind"], mod, layer_scale=VIT_PRESETS[mod["name"]].layer_scale if mod["layer_scale"] else None)
    model.load_state_dict(sd, strict=True)
    return model.eval(), mod


def export_checkpoint(path: str | Path, out: str | Path | None = None, *, fold_layer_scale: bool = True,
                      best: bool = False, ema: bool = False) -> dict[str, Any]:
    """Write the backbone (+ head file) of a checkpoint; returns paths and the timm spec."""
    folder = _best_folder(Path(path)) if best else checkpoint_folder(Path(path))
    state = checkpoint_state(folder)
    if "model" not in state:
        raise ConfigError(f"checkpoint {folder} is not a stage-2 (pretrain) or fine-tuning checkpoint")
    if state.get("kind") == "finetune":
        return export_classifier(folder, state, out, fold_layer_scale=fold_layer_scale, ema=ema)
    if state.get("kind") in DENSE_FILES:
        if ema:
            raise ConfigError(f"checkpoint {folder} is a {state['kind']} checkpoint, which keeps no EMA; drop --ema")
        return export_dense(folder, state, out)
    if ema:
        raise ConfigError(f"checkpoint {folder} is a pre-training checkpoint, which keeps no EMA; drop --ema")
    name, img_size = state["model"]["name"], int(state["model"]["img_size"])
    full = consolidate(folder)
    backbone = {k[len("backbone."):]: v for k, v in full.items() if k.startswith("backbone.")}
    extra = {k: v for k, v in full.items() if not k.startswith("backbone.")}
    extra["backbone.mask_token"] = backbone.pop("mask_token")
    preset = VIT_PRESETS[name]
    timm_name, kwargs = timm_spec(preset, img_size)
    sd = export_timm_state_dict(backbone, fold_layer_scale=fold_layer_scale)
    if not fold_layer_scale and preset.layer_scale > 0:
        kwargs["init_values"] = preset.layer_scale
    task = state["model"].get("task", "peco")
    out = Path(out) if out else folder.parent.parent / "backbone.safetensors"
    head_out = out.with_name(out.name.replace(".safetensors", "") + (".mim" if task == "peco" else f".{task}")
                             + ".safetensors")
    meta = {"format": FORMAT, "timm_name": timm_name, "timm_kwargs": json.dumps(kwargs), "preset": name,
            "step": str(state["step"]), "source": str(folder), "task": task,
            "tokenizer_sha256": state.get("tokenizer", {}).get("sha256", "")}
    for target, tensors in ((out, sd), (head_out, extra)):
        _save(target, tensors, meta)
    return {"backbone": str(out), "mim": str(head_out), "head": str(head_out), "timm_name": timm_name,
            "timm_kwargs": kwargs, "step": state["step"], "task": task}


def read_backbone(path: str | Path) -> tuple[dict[str, torch.Tensor], str, dict[str, Any]]:
    """(state dict, timm name, timm kwargs) of an exported backbone file."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ConfigError(f"'{path}' is not a peco-scale backbone export (format {meta.get('format')!r})")
        sd = {k: f.get_tensor(k) for k in f.keys()}
    return sd, meta["timm_name"], json.loads(meta["timm_kwargs"])


def create_timm_model(path: str | Path, **overrides: Any) -> torch.nn.Module:
    """Build the timm model named in an export and load its weights with strict=True."""
    import timm

    sd, name, kwargs = read_backbone(path)
    model = timm.create_model(name, pretrained=False, **{**kwargs, **overrides})
    model.load_state_dict(sd, strict=True)
    return model


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m peco_scale.tools.export", description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", help="run folder, its checkpoints/ folder, or a step_XXXXXXXX folder")
    ap.add_argument("--out", default=None, help="output .safetensors (default: <run>/backbone.safetensors)")
    ap.add_argument("--keep_layer_scale", action="store_true", help="keep the layer-scale gammas instead of folding them")
    ap.add_argument("--best", action="store_true", help="fine-tuning runs: the checkpoint named by checkpoints/best")
    ap.add_argument("--ema", action="store_true", help="fine-tuning runs: export the EMA weights")
    args = ap.parse_args(argv)
    try:
        res = export_checkpoint(args.checkpoint, args.out, fold_layer_scale=not args.keep_layer_scale,
                                best=args.best, ema=args.ema)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if "kind" in res:
        print(f"{res['kind']} model (step {res['step']}): {res['backbone']}")
        print(f"load: model, meta = peco_scale.tools.export.load_dense('{res['backbone']}')")
        return 0
    kw = ", ".join(f"{k}={v!r}" for k, v in res["timm_kwargs"].items())
    if res["mim"]:
        what = "MIM head + mask token" if res["task"] == "peco" else f"{res['task']} decoder + mask token"
        print(f"backbone (step {res['step']}): {res['backbone']}\n{what}: {res['head']}")
    else:
        print(f"classifier (step {res['step']}): {res['backbone']}")
    print(f"load: timm.create_model('{res['timm_name']}', pretrained=False, {kw}).load_state_dict("
          f"safetensors.torch.load_file('{res['backbone']}'), strict=True)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
