"""Reading weights this project did not just write: checkpoint folders (consolidated to one fp32
state dict), exported backbones and timm checkpoint files, without running code from any of them.

A checkpoint folder's pickles are verified by ``checkpoint.verify_pickles`` before DeepSpeed's
``zero_to_fp32`` (which unpickles freely) reads the ZeRO shards; plain files are read with
``checkpoint.safe_load``. :func:`load_pretrained` returns weights in timm's layout from:

- a stage-2 run (its folder, ``checkpoints/`` or a ``step_XXXXXXXX`` folder): the ZeRO checkpoint
  is consolidated (fp32 master weights); layer-scale gammas are kept;
- an export of ``python -m peco_scale.tools.export`` (``backbone.safetensors``; gammas folded);
- a timm checkpoint file (``.safetensors``, ``.pth``/``.pt``/``.bin``; a ``model``,
  ``state_dict`` or ``module`` entry is unwrapped).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..config import ConfigError
from ..models.vit import export_timm_state_dict
from .checkpoint import UnsafeCheckpoint, find_resume, safe_load, verify_pickles

FORMAT = "peco-backbone/1"  # metadata "format" of an exported backbone or classifier


def checkpoint_folder(path: Path) -> Path:
    """A step folder, a run's checkpoints/ folder, or a run folder -> the step folder."""
    if (path / "COMPLETE").is_file():
        return path
    for root in (path, path / "checkpoints"):
        found = find_resume(root) if root.is_dir() else None
        if found is not None:
            return found
    raise ConfigError(f"'{path}' holds no complete checkpoint; pass a run folder, its checkpoints/ folder, or a "
                      f"step_XXXXXXXX folder with a COMPLETE marker")


def checkpoint_state(folder: Path) -> dict[str, Any]:
    """The ``state.json`` of a checkpoint step folder. A folder without it (e.g. one that holds only a
    COMPLETE marker) or with an unreadable one is a ConfigError naming the folder and what is missing."""
    path = folder / "state.json"
    if not path.is_file():
        missing = ["state.json"] + ([] if (folder / "model").is_dir() else ["the 'model' engine folder"])
        rest = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
        held = "only a COMPLETE marker" if rest == ["COMPLETE"] else f"{', '.join(rest) or 'nothing'}"
        raise ConfigError(f"checkpoint folder '{folder}' is missing {' and '.join(missing)} (it holds {held}); "
                          f"pass a step_XXXXXXXX folder that was saved whole, or its run folder")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"checkpoint folder '{folder}': cannot read state.json ({exc})") from None


def consolidate(folder: Path, engine: str = "model") -> dict[str, torch.Tensor]:
    """fp32 state dict of the engine ``engine`` saved in a checkpoint step folder."""
    tag_dir = folder / engine
    if not tag_dir.is_dir():
        raise ConfigError(f"checkpoint {folder} has no '{engine}' engine folder")
    verify_pickles(folder)
    if any(tag_dir.glob("*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        sd = get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=engine)
    else:  # ZeRO stage 0: the module's weights are in the model-states file
        files = sorted(tag_dir.glob("mp_rank_*_model_states.pt"))
        if not files:
            raise ConfigError(f"no DeepSpeed model states in {tag_dir}")
        sd = safe_load(files[0])["module"]
    return {k: v.float() for k, v in sd.items()}



def _unwrap(obj: Any) -> dict[str, torch.Tensor]:
    for key in ("model", "state_dict", "module"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            return _unwrap(obj[key])
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConfigError("the checkpoint file holds no tensor state dict (looked at the top level and under "
                          "'model', 'state_dict', 'module')")
    return obj


def load_pretrained(source: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """State dict in timm's layout + info (``kind``, and ``preset``/``img_size`` when known)."""
    path = Path(source)
    if not path.exists():
        raise ConfigError(f"pretrained weights '{source}' do not exist; pass a stage-2 run folder, an exported "
                          f"backbone.safetensors or a timm checkpoint file")
    if path.is_dir():
        folder = checkpoint_folder(path)
        state = checkpoint_state(folder)
        if "model" not in state:
            raise ConfigError(f"checkpoint {folder} is not a stage-2 (pretrain) or fine-tune checkpoint")
        full = consolidate(folder)
        if state.get("kind") == "finetune":
            sd = full
        else:
            sd = {k[len("backbone."):]: v for k, v in full.items() if k.startswith("backbone.")}
            sd = export_timm_state_dict(sd, fold_layer_scale=False)
        return sd, {"kind": state.get("kind", "pretrain"), "preset": state["model"]["name"],
                    "img_size": int(state["model"]["img_size"]), "source": str(folder)}
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            sd = {k: f.get_tensor(k) for k in f.keys()}
        if meta.get("format") == FORMAT:
            return sd, {"kind": "export", "preset": meta.get("preset"), "source": str(path)}
        return sd, {"kind": "timm", "source": str(path)}
    try:
        obj = safe_load(path)
    except UnsafeCheckpoint:
        raise
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
        raise ConfigError(f"cannot read '{source}' as a torch checkpoint ({type(exc).__name__}: {exc}); pass a "
                          f".safetensors/.pth file with a ViT state dict") from None
    try:
        sd = _unwrap(obj)
    except ConfigError as exc:
        raise ConfigError(f"'{source}': {exc}") from None
    return {k.removeprefix("module.").removeprefix("backbone."): v for k, v in sd.items()}, {"kind": "timm",
                                                                                              "source": str(path)}
